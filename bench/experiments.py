"""Experiment grid: arms x seeds of `rlstream demo`, resumable, summarised as a markdown report.

Each arm is a set of `--set` overrides on one run config (the shipped demo by default); every arm
sets ERPO, the KL term and dynamic sampling explicitly, so arms differ only where they say. A run
lives in `<out>/<arm>/seed<N>/<timestamp>/`; a seed whose folder holds a `summary.json` is done
and skipped, so the grid can be built over several sittings (an interrupted run leaves a folder
without one and is run again). The report has one row per arm (mean ± sample standard deviation
over its finished seeds) and the raw per-run numbers:

- sampled pass@1 and greedy accuracy before and after RL (`eval.samples` samples per problem);
- pass@1/8/64 and the problems solved beyond the base model when `eval.budget_samples` >= 64;
- `signal`: the share of trained groups whose rewards differ (real gradient), from the learner's
  progress rows (ERPO's reactivated all-correct prompts count as signal only when their hotter
  samples differ);
- RL wall time and the completion tokens sampled (DAPO samples more per step: compare arms at
  equal tokens or time with these two columns, not only at equal steps).

Usage:
    python bench/experiments.py [--arms grpo,dapo,...] [--seeds 0,1,2] [--config run.toml]
        [--set KEY=VALUE ...] [--out runs/experiments] [--report runs/experiments/report.md]
    python bench/experiments.py --report-only   # rewrite the report from finished runs
The last line is `RESULT runs=N arms=… <arm>_acc_gain=…`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ERPO_OFF = ["erpo.enabled=false"]
ERPO_ON = ["erpo.enabled=true"]
NO_KL = ['learner.kl.kind="none"']
NO_DYNAMIC = ['learner.dynamic_sampling="off"']

ARMS: dict[str, list[str]] = {
    "grpo": ERPO_OFF + NO_KL + NO_DYNAMIC,
    "dapo": ERPO_OFF + NO_KL + ['learner.dynamic_sampling="zero_variance"'],
    "erpo": ERPO_ON + NO_KL + NO_DYNAMIC,
    "grpo_k3": ERPO_OFF + ['learner.kl.kind="k3"', "learner.kl.coef=0.01"] + NO_DYNAMIC,
    "rapo": ERPO_OFF + ['learner.kl.kind="rapo"', "learner.kl.coef=0.01"] + NO_DYNAMIC,
    "erpo_rapo": ERPO_ON + ['learner.kl.kind="rapo"', "learner.kl.coef=0.01"] + NO_DYNAMIC,
}
"""Arm name -> `--set` overrides (TOML values)."""

COLUMNS = ("acc_before", "acc_after", "greedy_before", "greedy_after", "pass@1", "pass@8", "pass@64",
           "solved_beyond_base", "signal", "rl_s", "tokens")


def seed_sets(seed: int) -> list[str]:
    """Overrides that make a run's seed `seed`: prompt order, learner, held-out set and sampling."""
    return [f"seed={seed}", f"rollout.seed={seed}"]


def finished(out: Path, arm: str, seed: int) -> Path | None:
    """The newest finished run of (arm, seed) under `out`, or None."""
    done = sorted((out / arm / f"seed{seed}").glob("*/summary.json"))
    return done[-1].parent if done else None


def collect(run_dir: Path) -> dict[str, float]:
    """One finished run's numbers (see the module docstring); absent measures are NaN."""
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {k: float(summary[k]) for k in ("acc_before", "acc_after", "greedy_before", "greedy_after", "rl_s")}
    after = summary.get("budget_after", {})
    for k in ("pass@1", "pass@8", "pass@64"):
        row[k] = float(after.get(k, math.nan))
    row["solved_beyond_base"] = float(summary.get("solved_beyond_base", math.nan))
    steps = [json.loads(line) for line in (run_dir / "progress" / "learner.jsonl").read_text().splitlines() if line]
    # Sampled, not trained: each rollout worker's progress rows carry its running total.
    row["tokens"] = 0.0
    for worker in sorted((run_dir / "progress").glob("rollout-*.jsonl")):
        rows = [line for line in worker.read_text().splitlines() if line]
        row["tokens"] += float(json.loads(rows[-1])["tokens"]) if rows else 0.0
    fractions = [1.0 - s["all_correct_frac"] - s["all_wrong_frac"] for s in steps
                 if "all_correct_frac" in s and "all_wrong_frac" in s]
    row["signal"] = statistics.fmean(fractions) if fractions else math.nan
    return row


def aggregate(rows: list[dict[str, float]]) -> dict[str, tuple[float, float, int]]:
    """Per column: (mean, sample standard deviation, runs), over the runs that measured it."""
    out = {}
    for col in COLUMNS:
        values = [r[col] for r in rows if col in r and not math.isnan(r[col])]
        if values:
            out[col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan,
                        len(values))
    return out


def _cell(stat: tuple[float, float, int] | None, col: str) -> str:
    if stat is None:
        return "–"
    mean, sd, _ = stat
    digits = 0 if col in ("rl_s", "tokens", "solved_beyond_base") else 3
    text = f"{mean:,.{digits}f}"
    return text if math.isnan(sd) else f"{text} ± {sd:,.{digits}f}"


def render(runs: dict[str, dict[int, dict[str, float]]], title: str, command: str) -> str:
    """Markdown: the per-arm table (mean ± sd over seeds) and the raw runs."""
    lines = [f"# {title}", "", f"`{command}`", "",
             "Mean ± sample standard deviation over seeds; `signal` is the share of trained groups whose "
             "rewards differ; `tokens` the completion tokens sampled during RL.", "",
             "| arm | seeds | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for arm, by_seed in runs.items():
        stats = aggregate(list(by_seed.values()))
        lines.append(f"| {arm} | {len(by_seed)} | " + " | ".join(_cell(stats.get(c), c) for c in COLUMNS) + " |")
    lines += ["", "## Runs", "", "| arm | seed | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for arm, by_seed in runs.items():
        for seed, row in sorted(by_seed.items()):
            lines.append(f"| {arm} | {seed} | " + " | ".join(
                _cell((row[c], math.nan, 1), c) if c in row and not math.isnan(row[c]) else "–" for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def run_one(config: str | None, sets: list[str], out_dir: Path, log: Path) -> int:
    """`rlstream demo` with `sets` into `out_dir`; its output goes to `log`. Returns its exit code."""
    cmd = [sys.executable, "-m", "services.cli", "demo"] + (["--config", config] if config else [])
    for s in sets + [f'workdir="{out_dir}"']:
        cmd += ["--set", s]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--config", default=None, help="run TOML (default: the shipped demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every arm (TOML syntax), e.g. learner.total_steps=150")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--report", type=Path, default=None, help="markdown report (default: <out>/report.md)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    report = args.report or args.out / "report.md"

    grid = [(arm, seed) for arm in arms for seed in seeds]
    todo = [(arm, seed) for arm, seed in grid if finished(args.out, arm, seed) is None]
    print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} finished, {len(todo)} to run", flush=True)
    failed = []
    if not args.report_only:
        t0 = time.monotonic()
        for i, (arm, seed) in enumerate(todo, 1):
            out_dir = (args.out / arm / f"seed{seed}").resolve()
            t = time.monotonic()
            code = run_one(args.config, ARMS[arm] + seed_sets(seed) + args.set, out_dir, out_dir / "demo.log")
            took = time.monotonic() - t
            state = "done" if code == 0 and finished(args.out, arm, seed) else f"FAILED (exit {code}, see {out_dir / 'demo.log'})"
            if not state.startswith("done"):
                failed.append((arm, seed))
            eta = (time.monotonic() - t0) / i * (len(todo) - i)
            print(f"[{i}/{len(todo)}] {arm} seed {seed}: {state} in {took:.0f} s; about {eta / 60:.0f} min left",
                  flush=True)

    runs: dict[str, dict[int, dict[str, float]]] = {}
    for arm, seed in grid:
        run_dir = finished(args.out, arm, seed)
        if run_dir is not None:
            runs.setdefault(arm, {})[seed] = collect(run_dir)
    command = "python bench/experiments.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render(runs, "Experiment grid", command.strip()))
    print(f"report: {report}", flush=True)
    gains = []
    for arm, by_seed in runs.items():
        stats = aggregate(list(by_seed.values()))
        gains.append(f"{arm}_acc_gain={stats['acc_after'][0] - stats['acc_before'][0]:.4f}")
    print(f"RESULT runs={sum(len(r) for r in runs.values())} failed={len(failed)} arms={','.join(runs)} "
          f"{' '.join(gains)}".strip())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
