"""Experiment grid: arms x seeds of `rlstream demo`, resumable, written up in docs/results.md.

Why one file: one command runs the arms, keeps their records and rebuilds the report from them; the
record format and the report's columns change together.

Each arm is a set of `--set` overrides on one run config (the shipped demo by default); every arm
sets ERPO, the KL term, dynamic sampling and the lag explicitly, so arms differ only where they say.
The comparison arms (grpo ... erpo_rapo) keep the 2 versions of lag the demo had when they were
run; `demo` is the shipped demo (ERPO, 4 versions of lag, unpinned), the throughput claim against `trl`;
`demo_torch` the same with the torch rollout engine (transformers-style sampling, as TRL's `generate`). The
`trl` arm is the outside reference: TRL's GRPOTrainer on the same task (`bench/trl_grpo.py`, needs
`pip install -e .[bench]`). `lockstep` (the rollout waits for each step's weights), `async2` and
`async4` (2 and 4 versions of lag) are GRPO with the learner pinned to one core and the other services
to the other (`demo.cpus`), for the dataflow's timings. A run lives in `<out>/<arm>/seed<N>/<timestamp>/`; a seed whose folder
holds a `summary.json` is done and skipped, so the grid can be built over several sittings (an
interrupted run leaves a folder without one and is run again). Runs of one seed share the base
model's evaluation (`rlstream demo` caches it by model, problems and settings).

Every finished run is also kept as a small record, `<records>/<arm>-seed<N>.json` (docs/experiments/runs/
by default, committed with the report): its row of numbers, its learning curve and its pass@k
curves, with the commit and config it ran at. The report is built from the records, so it can be
rewritten, and the grid resumed, on a clean checkout where the run folders (gigabytes, not
committed) are gone. A record is written once; delete it to run that arm and seed again.

Per run:
- sampled pass@1 and greedy accuracy before and after RL (`eval.samples` samples per problem);
- pass@1/8/64, problems solved beyond the base model, distinct final answers per problem and token
  entropy, from `eval.budget_samples` samples on `eval.budget_problems` problems;
- `signal`: the share of trained groups whose rewards differ (a real gradient), from the learner's
  progress rows; `ra`: the share of scored groups ERPO sampled hotter than `erpo.tau0` (its
  reactivated residual prompts), and `ra_signal` the share of scored groups that were reactivated
  *and* had differing rewards (the signal ERPO bought), from the recorded lake;
- RL wall time and the completion tokens sampled;
- a learning curve: the learner exports the policy every `total_steps / --curve-points` steps and
  the command evaluates each export on the held-out set afterwards (the services are stopped by
  then, so this costs no training time). Arms are compared at an equal budget of sampled tokens
  and of wall time by interpolating these curves (DAPO's over-issuing and ERPO's hotter samples
  change what a step costs).

The report (`<out>/report.md`, and the block between the markers in `--results`, docs/results.md
by default) has the per-arm means ± sample standard deviations, the equal-budget table, paired
per-seed differences for the claims (ERPO vs GRPO, RAPO vs reverse KL, ...), the raw runs and
plots (`--figures`, docs/experiments/ by default).

Usage:
    python bench/experiments.py [--arms grpo,dapo,...] [--seeds 0,1,2] [--config run.toml]
        [--set KEY=VALUE ...] [--out runs/experiments] [--results docs/results.md]
    python bench/experiments.py --report-only   # rewrite the report from the records
The last line is `RESULT runs=N arms=… <arm>_acc_gain=… <arm>_greedy_gain=…`.
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

REPO = Path(__file__).resolve().parents[1]

ERPO_OFF = ["erpo.enabled=false"]
ERPO_ON = ["erpo.enabled=true"]
NO_KL = ['learner.kl.kind="none"']
NO_DYNAMIC = ['learner.dynamic_sampling="off"']
LAG2 = ["learner.staleness.max_versions=2"]
"""Two versions of lag, which the comparison arms keep (the shipped demo runs with 4)."""
PINNED = ['demo.cpus={learner = "0", rollout = "1", reward = "1", recorder = "1"}']
"""The learner on one core, the rest on the other: what asynchrony overlaps shows in the timings."""

ARMS: dict[str, list[str]] = {
    "grpo": ERPO_OFF + NO_KL + NO_DYNAMIC + LAG2,
    "dapo": ERPO_OFF + NO_KL + ['learner.dynamic_sampling="zero_variance"'] + LAG2,
    "erpo": ERPO_ON + NO_KL + NO_DYNAMIC + LAG2,
    "grpo_k3": ERPO_OFF + ['learner.kl.kind="k3"', "learner.kl.coef=0.01"] + NO_DYNAMIC + LAG2,
    "rapo": ERPO_OFF + ['learner.kl.kind="rapo"', "learner.kl.coef=0.01"] + NO_DYNAMIC + LAG2,
    "erpo_rapo": ERPO_ON + ['learner.kl.kind="rapo"', "learner.kl.coef=0.01"] + NO_DYNAMIC + LAG2,
    "trl": ERPO_OFF + NO_KL + NO_DYNAMIC + LAG2,  # TRL is synchronous: the lag is ours, unused
    "lockstep": ERPO_OFF + NO_KL + NO_DYNAMIC + PINNED + ["learner.staleness.max_versions=0",
                                                          "learner.staleness.lockstep=true"],
    "async2": ERPO_OFF + NO_KL + NO_DYNAMIC + PINNED + ["learner.staleness.max_versions=2"],
    "async4": ERPO_OFF + NO_KL + NO_DYNAMIC + PINNED + ["learner.staleness.max_versions=4"],
    "demo": ERPO_ON + NO_KL + NO_DYNAMIC + ["learner.staleness.max_versions=4"],
    "demo_torch": ERPO_ON + NO_KL + NO_DYNAMIC + ["learner.staleness.max_versions=4", 'rollout.engine="torch"'],
}
"""Arm name -> `--set` overrides (TOML values)."""

EXTERNAL = {"trl": REPO / "bench" / "trl_grpo.py"}
"""Arms run by another script (same `--config`/`--set`, `--out` a run folder) instead of the demo."""

GRID_SETS = ["eval.budget_samples=64", "eval.budget_problems=200"]
"""Overrides every arm shares: the sampling-budget measures (pass@k up to 64)."""

PAIRS = [("erpo", "grpo"), ("dapo", "grpo"), ("grpo_k3", "grpo"), ("rapo", "grpo_k3"), ("rapo", "grpo"),
         ("erpo_rapo", "erpo"), ("grpo", "trl"), ("async2", "lockstep"), ("async4", "lockstep"),
         ("demo", "trl"), ("demo", "erpo"), ("demo_torch", "trl"), ("demo_torch", "demo")]
"""(arm, baseline) pairs of the paired per-seed comparison."""

COLUMNS = ("acc_before", "acc_after", "greedy_before", "greedy_after", "pass@1", "pass@8", "pass@64",
           "solved_beyond_base", "distinct", "entropy", "signal", "ra", "ra_signal", "rl_s", "tokens", "traj_s", "train_traj_s")
PAIRED = ("acc_after", "greedy_after", "pass@64", "solved_beyond_base", "distinct")
WHOLE = ("rl_s", "tokens", "solved_beyond_base", "traj_s", "train_traj_s")  # columns shown without decimals
MARK_BEGIN = "<!-- BEGIN experiment grid: written by bench/experiments.py, edits are overwritten -->"
MARK_END = "<!-- END experiment grid -->"


def seed_sets(seed: int) -> list[str]:
    """Overrides that make a run's seed `seed`: prompt order, learner, held-out set and sampling."""
    return [f"seed={seed}", f"rollout.seed={seed}"]


def curve_sets(config: str | None, sets: list[str], points: int) -> list[str]:
    """Overrides that make the learner export the policy `points` times during the run (and keep
    the exports), for the learning curve."""
    from pipeline.config import load_config
    from services.cli import shipped_config

    steps = load_config(Path(config) if config else shipped_config(), sets).learner.total_steps
    every = max(1, steps // points)
    return [f"learner.checkpoint.export_every={every}", f"learner.checkpoint.keep={steps // every + 2}"]


def record_path(records: Path, arm: str, seed: int) -> Path:
    return records / f"{arm}-seed{seed}.json"


def _git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def make_record(run_dir: Path, arm: str, seed: int, curve: list[dict] | None) -> dict:
    """What the report needs of one finished run (module docstring), without the run folder."""
    summary = json.loads((run_dir / "summary.json").read_text())
    config = run_dir / "config.json"
    return {"arm": arm, "seed": seed, "run_dir": str(run_dir), "commit": _git_commit(),
            "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "row": collect(run_dir), "curve": curve,
            "budget_before": summary.get("budget_before", {}), "budget_after": summary.get("budget_after", {}),
            "config": json.loads(config.read_text()) if config.exists() else None}


def load_record(path: Path) -> dict:
    record = json.loads(path.read_text())
    record["row"] = {k: math.nan if v is None else float(v) for k, v in record["row"].items()}
    return record


def save_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record["row"].items()}
    path.write_text(json.dumps(record | {"row": row}, indent=1) + "\n")  # NaN is not JSON: null


def keep_record(records: Path, run_dir: Path, arm: str, seed: int, curve_points: int) -> None:
    """Evaluate the run's learning curve (if it has one) and save its record."""
    curve = write_curve(run_dir) if curve_points and arm not in EXTERNAL else None
    save_record(record_path(records, arm, seed), make_record(run_dir, arm, seed, curve))


def finished(out: Path, arm: str, seed: int) -> Path | None:
    """The newest finished run of (arm, seed) under `out`, or None."""
    done = sorted((out / arm / f"seed{seed}").glob("*/summary.json"))
    return done[-1].parent if done else None


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def sampled_tokens_by(run_dir: Path, t: float) -> float:
    """Completion tokens the rollout workers had sampled by unix time `t` (their running totals)."""
    total = 0.0
    for worker in sorted((run_dir / "progress").glob("rollout-*.jsonl")):
        before = [r["tokens"] for r in _jsonl(worker) if r.get("time", math.inf) <= t]
        total += float(before[-1]) if before else 0.0
    return total


def lake_signal(run_dir: Path, tau0: float) -> dict[str, float]:
    """`ra` and `ra_signal` (module docstring) from the run's recorded scored groups."""
    from pipeline.lake import report as q
    from pipeline.lake.store import read_topic

    g = q.groups(read_topic(run_dir / "lake", "scored"))
    if g.is_empty():
        return {"ra": math.nan, "ra_signal": math.nan}
    hot = (g["temperature"] > tau0 + 1e-6).to_numpy()
    differs = ~(g["all_correct"] | g["all_wrong"]).to_numpy()
    return {"ra": float(hot.mean()), "ra_signal": float((hot & differs).mean())}


def steady_traj_s(steps: list[dict], workers: list[list[dict]], size: float) -> float:
    """Trajectories sampled per second between the learner's first and last progress rows (after
    the services' start-up): the rollout workers' running group totals at those two times."""
    timed = [s["time"] for s in steps if "time" in s]
    if len(timed) < 2 or timed[-1] <= timed[0]:
        return math.nan
    t0, t1 = timed[0], timed[-1]

    def total_at(rows: list[dict], t: float) -> float:
        return max((float(r["groups"]) for r in rows if r["time"] <= t), default=0.0)

    groups = sum(total_at(rows, t1) - total_at(rows, t0) for rows in workers)
    return groups * size / (t1 - t0)


def collect(run_dir: Path) -> dict[str, float]:
    """One finished run's numbers (see the module docstring); absent measures are NaN."""
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {k: float(summary[k]) for k in ("acc_before", "acc_after", "greedy_before", "greedy_after", "rl_s")}
    after = summary.get("budget_after", {})
    for k in ("pass@1", "pass@8", "pass@64"):
        row[k] = float(after.get(k, math.nan))
    row["distinct"] = float(after.get("distinct_answers", math.nan))
    row["entropy"] = float(after.get("entropy", math.nan))
    row["solved_beyond_base"] = float(summary.get("solved_beyond_base", math.nan))
    steps = _jsonl(run_dir / "progress" / "learner.jsonl")
    workers = sorted((run_dir / "progress").glob("rollout-*.jsonl"))
    row["tokens"] = (sampled_tokens_by(run_dir, math.inf) if workers  # an external arm says it itself
                     else float(summary.get("completion_tokens", math.nan)))
    if workers:
        size = json.loads((run_dir / "config.json").read_text())["rollout"]["group_size"] \
            if (run_dir / "config.json").exists() else math.nan
        worker_rows = [rows for rows in map(_jsonl, workers) if rows]
        groups = sum(float(rows[-1]["groups"]) for rows in worker_rows)
        row["traj_s"] = groups * size / row["rl_s"]
        row["train_traj_s"] = steady_traj_s(steps, worker_rows, size)
    else:
        row["traj_s"] = row["train_traj_s"] = float(summary.get("traj_per_s", math.nan))
    fractions = [1.0 - s["all_correct_frac"] - s["all_wrong_frac"] for s in steps
                 if "all_correct_frac" in s and "all_wrong_frac" in s]
    row["signal"] = statistics.fmean(fractions) if fractions else math.nan
    row["ra"] = row["ra_signal"] = math.nan
    config = run_dir / "config.json"
    if (run_dir / "lake").exists() and config.exists():
        row |= lake_signal(run_dir, json.loads(config.read_text())["erpo"]["tau0"])
    return row


def curve_points(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, export folder) of the run's intermediate exports, by step (the final export is the
    summary's `after`)."""
    exports = [(int(p.name.removeprefix("step-")), p) for p in (run_dir / "export").glob("step-*")
               if (p / "model.safetensors").exists()]
    return sorted(exports)


def write_curve(run_dir: Path, threads: int = 2) -> list[dict] | None:
    """Evaluate the run's exports on its held-out problems (as the demo's before/after, on its
    `eval.engine`: the torch engine, or vLLM on the export's folder) and write
    `<run>/curve.json`: one point per step (0, each export, the last) with RL seconds, sampled tokens,
    sampled pass@1 and greedy accuracy. Kept once written; None if the run exported nothing."""
    out = run_dir / "curve.json"
    if out.exists():
        return json.loads(out.read_text())
    exports = curve_points(run_dir)
    steps = _jsonl(run_dir / "progress" / "learner.jsonl")
    if not exports or not steps or not (run_dir / "config.json").exists():
        return None
    import torch

    from pipeline.config import load_config
    from pipeline.data.tasks import heldout_problems
    from pipeline.model.policy import load_policy
    from pipeline.rollout.evaluate import evaluate
    from services.demo import eval_engine

    torch.set_num_threads(threads)
    cfg = load_config(run_dir / "config.json")
    summary = json.loads((run_dir / "summary.json").read_text())
    problems = heldout_problems(cfg)
    start = steps[0]["time"] - steps[0]["elapsed_s"]  # the learner's start
    at = {s["step"]: s["time"] for s in steps}

    def point(step: int, t: float, acc: float, greedy: float) -> dict:
        return {"step": step, "rl_s": t - start, "tokens": sampled_tokens_by(run_dir, t), "acc": acc,
                "greedy": greedy}

    curve = [point(0, start, summary["acc_before"], summary["greedy_before"])]
    for step, folder in exports:
        if step not in at or step >= steps[-1]["step"]:
            continue
        model, tok = load_policy(folder)
        engine = eval_engine(cfg, model, tok, folder)
        r = evaluate(engine, problems, cfg.eval.temperature, cfg.eval.samples, cfg.eval.batch_size)
        if hasattr(engine, "close"):  # vLLM's memory and threads go back before the next export
            engine.close()
        curve.append(point(step, at[step], r.sampled_accuracy, r.greedy_accuracy))
        print(f"    curve: step {step}: sampled pass@1 {r.sampled_accuracy:.3f}, greedy {r.greedy_accuracy:.3f}",
              flush=True)
    curve.append(point(steps[-1]["step"], steps[-1]["time"], summary["acc_after"], summary["greedy_after"]))
    out.write_text(json.dumps(curve, indent=1))
    return curve


def interpolate(curve: list[dict], x: str, at: float, y: str) -> float:
    """`y` of the curve at `x` = `at`, linear between points; NaN outside the curve."""
    for a, b in zip(curve, curve[1:]):
        if a[x] <= at <= b[x]:
            w = 0.0 if b[x] == a[x] else (at - a[x]) / (b[x] - a[x])
            return a[y] + w * (b[y] - a[y])
    return math.nan


def time_to_reach(curve: list[dict], y: str, target: float, x: str = "rl_s") -> float:
    """`x` at which the curve first reaches `target` in `y` (linear between points); NaN if never."""
    if curve and curve[0][y] >= target:
        return curve[0][x]
    for a, b in zip(curve, curve[1:]):
        if a[y] < target <= b[y]:
            return a[x] + (target - a[y]) / (b[y] - a[y]) * (b[x] - a[x])
    return math.nan


def equal_budgets(curves: dict[str, dict[int, list[dict]]]) -> dict[str, float]:
    """The budgets every run reached: the smallest final sampled-token count and RL time."""
    finals = [c[-1] for by_seed in curves.values() for c in by_seed.values()]
    return {"tokens": min(p["tokens"] for p in finals), "rl_s": min(p["rl_s"] for p in finals)} if finals else {}


def aggregate(rows: list[dict[str, float]], columns=COLUMNS) -> dict[str, tuple[float, float, int]]:
    """Per column: (mean, sample standard deviation, runs), over the runs that measured it."""
    out = {}
    for col in columns:
        values = [r[col] for r in rows if col in r and not math.isnan(r[col])]
        if values:
            out[col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan,
                        len(values))
    return out


def paired(runs: dict[str, dict[int, dict[str, float]]], arm: str, base: str) -> dict[str, tuple[float, float, int]]:
    """Per column of `PAIRED`: mean and sample sd of (arm - base) over the seeds both finished."""
    seeds = sorted(set(runs.get(arm, {})) & set(runs.get(base, {})))
    diffs = [{c: runs[arm][s][c] - runs[base][s][c] for c in PAIRED if c in runs[arm][s] and c in runs[base][s]}
             for s in seeds]
    return aggregate(diffs, PAIRED)


def _cell(stat: tuple[float, float, int] | None, col: str, sign: bool = False) -> str:
    if stat is None:
        return "–"
    mean, sd, _ = stat
    digits = 3 if col not in WHOLE else 2 if col.endswith("traj_s") and abs(mean) < 10 else 0  # a real model's ~1/s
    text = f"{mean:+,.{digits}f}" if sign else f"{mean:,.{digits}f}"
    return text if math.isnan(sd) else f"{text} ± {sd:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render(runs: dict[str, dict[int, dict[str, float]]], command: str,
           curves: dict[str, dict[int, list[dict]]] | None = None, figures: dict[str, str] | None = None,
           heading: str = "##", evaluation: dict | None = None) -> str:
    """Markdown: per-arm means ± sd over seeds, equal-budget accuracies, paired differences, plots,
    raw runs. ``evaluation``: the runs' `[eval]` settings, which the text states (the grid's
    T = 1 and 64 samples on 200 problems when not given)."""
    curves = curves or {}
    ev = {"temperature": 1.0, "samples": 4, "budget_samples": 64, "budget_problems": 200} | (evaluation or {})
    budget = f"{ev['budget_samples']} samples on {ev['budget_problems'] or 'all'} of them"
    lines = [f"{heading} Experiment grid", "", f"Generated by `{command}`.", "",
             f"Mean ± sample standard deviation over seeds. `acc` is sampled pass@1 (T = {ev['temperature']:g}, "
             f"{ev['samples']} samples per problem), `greedy` greedy "
             "accuracy, both on the demo's held-out problems; pass@k, `solved_beyond_base`, `distinct` "
             f"(final answers per problem) and `entropy` (nats per token) from {budget}; "
             "`signal` the share of trained groups whose rewards differ; `ra` the share of groups ERPO "
             "sampled hotter, `ra_signal` the share that were reactivated and differed; `tokens` the "
             "completion tokens sampled during RL, `traj_s` trajectories sampled per second of RL (`rl_s`: from "
             "the services' start, their start-up included), `train_traj_s` per second from the learner's first "
             "step to its last (TRL: its `train()`, which has no services to start).", ""]
    lines += _table(["arm", "seeds"] + list(COLUMNS),
                    [[arm, str(len(by_seed))] + [_cell(aggregate(list(by_seed.values())).get(c), c) for c in COLUMNS]
                     for arm, by_seed in runs.items()])
    budgets = equal_budgets(curves)
    if budgets:
        lines += ["", f"{heading}# At equal budgets", "",
                  f"Read off each run's learning curve (held-out accuracy of the policy exported during the run), "
                  f"interpolated at the budget every run reached: {budgets['tokens']:,.0f} sampled completion tokens, "
                  f"and {budgets['rl_s']:.0f} s of RL wall time.", ""]
        rows = []
        for arm, by_seed in curves.items():
            at = [{"acc@tokens": interpolate(c, "tokens", budgets["tokens"], "acc"),
                   "greedy@tokens": interpolate(c, "tokens", budgets["tokens"], "greedy"),
                   "acc@time": interpolate(c, "rl_s", budgets["rl_s"], "acc"),
                   "greedy@time": interpolate(c, "rl_s", budgets["rl_s"], "greedy")} for c in by_seed.values()]
            stats = aggregate(at, ("acc@tokens", "greedy@tokens", "acc@time", "greedy@time"))
            rows.append([arm, str(len(by_seed))] + [_cell(stats.get(c), c) for c in
                                                    ("acc@tokens", "greedy@tokens", "acc@time", "greedy@time")])
        lines += _table(["arm", "seeds", "acc @ tokens", "greedy @ tokens", "acc @ time", "greedy @ time"], rows)
    if "lockstep" in runs and len(curves) > 1:
        target = {y: statistics.fmean(r[f"{y}_after"] for r in runs["lockstep"].values()) for y in ("acc", "greedy")}
        lines += ["", f"{heading}# Time to the lockstep run's accuracy", "",
                  f"RL seconds until the learning curve first reaches the lockstep arm's final held-out accuracy "
                  f"(mean over its seeds: sampled pass@1 {target['acc']:.3f}, greedy {target['greedy']:.3f}); "
                  f"– where a run never did.", ""]
        rows = []
        for arm, by_seed in curves.items():
            reach = [{f"{y}_s": time_to_reach(c, y, target[y]) for y in ("acc", "greedy")} for c in by_seed.values()]
            stats = aggregate(reach, ("acc_s", "greedy_s"))
            rows.append([arm, str(len(by_seed))] + [_cell(stats.get(c), "rl_s") + (
                f" ({stats[c][2]} of {len(by_seed)})" if c in stats and stats[c][2] < len(by_seed) else "")
                for c in ("acc_s", "greedy_s")] + [_cell(aggregate(list(runs[arm].values())).get("traj_s"), "rl_s")])
        lines += _table(["arm", "seeds", "s to sampled pass@1", "s to greedy", "trajectories/s"], rows)
    pairs = [(a, b) for a, b in PAIRS if a in runs and b in runs]
    if pairs:
        lines += ["", f"{heading}# Paired differences", "",
                  "Arm minus baseline on the same seed (same base model, prompts and held-out problems), mean ± "
                  "sample sd over the seeds both finished.", ""]
        lines += _table(["arm − baseline", "seeds"] + [f"Δ {c}" for c in PAIRED],
                        [[f"{a} − {b}", str(len(set(runs[a]) & set(runs[b])))]
                         + [_cell(paired(runs, a, b).get(c), c, sign=True) for c in PAIRED] for a, b in pairs])
    for caption, path in (figures or {}).items():
        lines += ["", f"![{caption}]({path})"]
    lines += ["", f"{heading}# Runs", ""]
    lines += _table(["arm", "seed"] + list(COLUMNS),
                    [[arm, str(seed)] + [_cell((row[c], math.nan, 1), c) if c in row and not math.isnan(row[c])
                                         else "–" for c in COLUMNS]
                     for arm, by_seed in runs.items() for seed, row in sorted(by_seed.items())])
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[int, dict[str, float]]], curves: dict[str, dict[int, list[dict]]],
         base_passk: dict[int, dict[int, float]], after_passk: dict[str, dict[int, dict[int, float]]],
         out: Path) -> dict[str, Path]:
    """Learning curves (accuracy against sampled tokens and RL seconds, each seed a thin line, the
    arm's mean a thick one) and pass@k against k; returns {caption: png}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    colors = {arm: plt.get_cmap("tab10")(i) for i, arm in enumerate(runs)}
    if curves:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
        for (row, y), (col, x) in [(rc, xc) for rc in enumerate((("acc", "sampled pass@1"), ("greedy", "greedy accuracy")))
                                   for xc in enumerate((("tokens", "sampled completion tokens"), ("rl_s", "RL seconds")))]:
            ax = axes[row][col]
            for arm, by_seed in curves.items():
                top = min(c[-1][x[0]] for c in by_seed.values())
                grid = np.linspace(0, top, 30)
                ys = []
                for c in by_seed.values():
                    ax.plot([p[x[0]] for p in c], [p[y[0]] for p in c], color=colors[arm], alpha=0.25, lw=0.8)
                    ys.append([interpolate(c, x[0], g, y[0]) for g in grid])
                ax.plot(grid, np.nanmean(np.array(ys), axis=0), color=colors[arm], lw=2, label=arm)
            ax.set_xlabel(x[1])
            ax.set_ylabel(y[1])
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Held-out accuracy during RL (thin: one seed; thick: mean over seeds)")
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=90)
        plt.close(fig)
        figures["Held-out accuracy against sampled tokens and RL time"] = out / "curves.png"
    if after_passk:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ks = sorted(next(iter(base_passk.values())).keys()) if base_passk else []
        if base_passk:
            ax.plot(ks, [statistics.fmean(b[k] for b in base_passk.values()) for k in ks], "k--", lw=2, label="base")
        for arm, by_seed in after_passk.items():
            ks = sorted(next(iter(by_seed.values())).keys())
            ax.plot(ks, [statistics.fmean(s[k] for s in by_seed.values()) for k in ks], color=colors.get(arm),
                    marker="o", ms=3, label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (samples per problem)")
        ax.set_ylabel("pass@k (held-out)")
        ax.set_title("pass@k after RL, mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "passk.png", dpi=90)
        plt.close(fig)
        figures["pass@k against the sampling budget k"] = out / "passk.png"
    return figures


def replace_block(doc: Path, block: str) -> None:
    """Put `block` between the markers in `doc` (appended with them if the file has none)."""
    text = doc.read_text() if doc.exists() else ""
    framed = f"{MARK_BEGIN}\n{block}{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + framed + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + framed + "\n"
    doc.write_text(text)


def run_one(arm: str, config: str | None, sets: list[str], out_dir: Path, log: Path) -> int:
    """One run of `arm` with `sets` into `out_dir` (the demo, or the arm's script); its output goes to
    `log`. Returns its exit code."""
    if arm in EXTERNAL:
        cmd = [sys.executable, str(EXTERNAL[arm]), "--out", str(out_dir / time.strftime("%Y%m%d-%H%M%S"))]
    else:
        cmd = [sys.executable, "-m", "services.cli", "demo"]
        sets = sets + [f'workdir="{out_dir}"']
    cmd += ["--config", config] if config else []
    for s in sets:
        cmd += ["--set", s]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False, cwd=REPO).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--config", default=None, help="run TOML (default: the shipped demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every arm (TOML syntax), e.g. learner.total_steps=150")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--curve-points", type=int, default=4,
                        help="policy exports evaluated during each run (the learning curve); 0: none")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md",
                        help="markdown file whose experiment-grid block is rewritten ('-': none)")
    parser.add_argument("--figures", type=Path, default=REPO / "docs" / "experiments", help="folder for the plots")
    parser.add_argument("--records", type=Path, default=REPO / "docs" / "experiments" / "runs",
                        help="folder of the finished runs' records (module docstring)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the report from the records (and finished runs that have none)")
    parser.add_argument("--refresh-rows", action="store_true",
                        help="recompute each record's row of numbers from its run folder where that is still on "
                             "disk (after a measure was added to the report); curves and pass@k are kept")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = args.out.resolve()

    grid = [(arm, seed) for seed in seeds for arm in arms]  # seed by seed: a partial grid compares every arm
    todo = [(arm, seed) for arm, seed in grid
            if not record_path(args.records, arm, seed).exists() and finished(out, arm, seed) is None]
    print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} finished, {len(todo)} to run", flush=True)
    failed = []
    if not args.report_only:
        t0 = time.monotonic()
        for i, (arm, seed) in enumerate(todo, 1):
            out_dir = out / arm / f"seed{seed}"
            sets = GRID_SETS + ARMS[arm] + seed_sets(seed) + args.set
            if args.curve_points and arm not in EXTERNAL:
                sets = curve_sets(args.config, sets, args.curve_points) + sets
            t = time.monotonic()
            code = run_one(arm, args.config, sets, out_dir, out_dir / "run.log")
            run_dir = finished(out, arm, seed)
            if code == 0 and run_dir is not None:
                keep_record(args.records, run_dir, arm, seed, args.curve_points)
                state = "done"
            else:
                failed.append((arm, seed))
                state = f"FAILED (exit {code}, see {out_dir / 'run.log'})"
            eta = (time.monotonic() - t0) / i * (len(todo) - i)
            print(f"[{i}/{len(todo)}] {arm} seed {seed}: {state} in {time.monotonic() - t:.0f} s; "
                  f"about {eta / 60:.0f} min left", flush=True)

    runs: dict[str, dict[int, dict[str, float]]] = {}
    evaluation: dict | None = None
    curves: dict[str, dict[int, list[dict]]] = {}
    base_passk: dict[int, dict[int, float]] = {}
    after_passk: dict[str, dict[int, dict[int, float]]] = {}
    for arm, seed in grid:
        path = record_path(args.records, arm, seed)
        if not path.exists():  # a run finished before records existed, or whose record was lost
            run_dir = finished(out, arm, seed)
            if run_dir is None:
                continue
            keep_record(args.records, run_dir, arm, seed, args.curve_points)
        record = load_record(path)
        evaluation = evaluation or record.get("config", {}).get("eval")  # the report states the first run's
        if args.refresh_rows and (Path(record["run_dir"]) / "summary.json").exists():
            record["row"] = collect(Path(record["run_dir"]))
            save_record(path, record)
        runs.setdefault(arm, {})[seed] = record["row"]
        if record["curve"]:
            curves.setdefault(arm, {})[seed] = record["curve"]
        for key, into in (("budget_before", base_passk), ("budget_after", None)):
            ks = {int(k.removeprefix("pass@")): v for k, v in record[key].items() if k.startswith("pass@")}
            if ks and into is not None:
                into[seed] = ks
            elif ks:
                after_passk.setdefault(arm, {})[seed] = ks
    command = "python bench/experiments.py " + " ".join(argv if argv is not None else sys.argv[1:])
    figures = plot(runs, curves, base_passk, after_passk, args.figures) if runs else {}
    report = out / "report.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render(runs, command.strip(), curves, {c: str(p) for c, p in figures.items()}, heading="#",
                             evaluation=evaluation))
    print(f"report: {report}", flush=True)
    if str(args.results) != "-" and runs:
        rel = {c: str(Path(p).resolve().relative_to(args.results.resolve().parent))
               if Path(p).resolve().is_relative_to(args.results.resolve().parent) else str(p)
               for c, p in figures.items()}
        replace_block(args.results, render(runs, command.strip(), curves, rel, evaluation=evaluation))
        print(f"results: {args.results}", flush=True)
    gains = []
    for arm, by_seed in runs.items():
        stats = aggregate(list(by_seed.values()))
        gains.append(f"{arm}_acc_gain={stats['acc_after'][0] - stats['acc_before'][0]:.4f} "
                     f"{arm}_greedy_gain={stats['greedy_after'][0] - stats['greedy_before'][0]:.4f}")
    print(f"RESULT runs={sum(len(r) for r in runs.values())} failed={len(failed)} arms={','.join(runs)} "
          f"{' '.join(gains)}".strip())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
