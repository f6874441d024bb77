"""ERPO on vs off (plain GRPO), everything else equal, on the demo over several seeds.

Runs `rlstream demo` once per (seed, arm) in sequence (each run uses the whole machine) on an
easier arithmetic mix than the default, so that all-correct ("residual") groups are common
enough for ERPO to act on. Reads every run's reward progress file and summary, then prints per
run: held-out sampled pass@1 before/after, the share of all-correct groups in the first and last
fifth of training, reactivations (an informative group right after an all-correct one of the same
prompt) and the highest temperature; and draws the all-correct share over training for both arms
(`<out>/residual.png`).

Usage: python bench/erpo_compare.py [--seeds 0 1] [--steps 300] [--out runs/erpo-compare]
       [--set key=value ...]   (extra demo overrides for both arms)
The last line is `RESULT residual_on=… residual_off=… reactivations_on=… reactivations_off=…
gain_on=… gain_off=…` (means over seeds; residual = all-correct share of the last fifth).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EASY_MIX = "[0.45, 0.35, 0.2, 0.0, 0.0]"  # 2, 3, 4 operands


def run_demo(seed: int, erpo: bool, steps: int, out: Path, extra: list[str]) -> Path:
    sets = {"seed": str(seed), "erpo.enabled": str(erpo).lower(), "learner.total_steps": str(steps),
            "task.difficulty_weights": EASY_MIX, "workdir": f'"{out / ("on" if erpo else "off") / str(seed)}"'}
    argv = [sys.executable, "-m", "services.cli", "demo", "--config", str(REPO / "infra/configs/demo.toml")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    for item in extra:
        argv += ["--set", item]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"demo (seed {seed}, erpo {erpo}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_dir = Path(re.search(r"in (\S+)\n", proc.stdout).group(1))
    print(f"  seed {seed} erpo {'on ' if erpo else 'off'}: {time.monotonic() - t0:.0f}s, {run_dir}", flush=True)
    return run_dir


def read_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "progress" / "reward-0.jsonl").read_text().splitlines()]
    groups = np.array([r["groups"] for r in rows], float)
    correct = np.array([r["all_correct_groups"] for r in rows], float)
    total = groups[-1]
    # all-correct share inside each tenth of training (by groups scored)
    edges = np.linspace(0, total, 11)
    at = np.interp(edges, np.r_[0, groups], np.r_[0, correct])
    share = np.diff(at) / np.diff(edges)
    fifth = int(total / 5)
    first = np.interp(fifth, np.r_[0, groups], np.r_[0, correct]) / fifth
    last = (correct[-1] - np.interp(total - fifth, np.r_[0, groups], np.r_[0, correct])) / fifth
    return {"acc_before": summary["acc_before"], "acc_after": summary["acc_after"], "groups": int(total),
            "residual_first": first, "residual_last": last, "reactivations": rows[-1]["reactivations"],
            "max_temperature": rows[-1]["max_temperature"], "share": share.tolist()}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    x = np.arange(10) * 10 + 5
    for (seed, arm), r in sorted(results.items()):
        ax.plot(x, np.array(r["share"]) * 100, color="tab:red" if arm == "on" else "tab:blue",
                alpha=0.8, marker="o", ms=3, label=f"ERPO {arm}, seed {seed}")
    ax.set_xlabel("training progress (% of scored groups)")
    ax.set_ylabel("all-correct groups (%)")
    ax.set_title("Residual (all-correct) groups over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "erpo-compare")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"ERPO on/off: seeds {args.seeds}, {args.steps} steps, difficulty mix {EASY_MIX}", flush=True)
    results = {}
    for seed in args.seeds:
        for erpo in (True, False):
            results[(seed, "on" if erpo else "off")] = read_run(run_demo(seed, erpo, args.steps, args.out, args.sets))
    (args.out / "results.json").write_text(json.dumps({f"{s}-{a}": r for (s, a), r in results.items()}, indent=2))
    plot(results, args.out / "residual.png")

    print(f"\n{'seed':>4} {'ERPO':>4} {'acc before':>10} {'after':>7} {'all-correct first/last fifth':>30} "
          f"{'reactivations':>13} {'max tau':>8}")
    for (seed, arm), r in sorted(results.items()):
        print(f"{seed:>4} {arm:>4} {r['acc_before']:>10.4f} {r['acc_after']:>7.4f} "
              f"{r['residual_first'] * 100:>21.1f}% / {r['residual_last'] * 100:>4.1f}% "
              f"{r['reactivations']:>13} {r['max_temperature']:>8.2f}")
    print(f"plot: {args.out / 'residual.png'}")

    def mean(arm: str, key: str) -> float:
        return statistics.mean(r[key] for (s, a), r in results.items() if a == arm)

    def gain(arm: str) -> float:
        return statistics.mean(r["acc_after"] - r["acc_before"] for (s, a), r in results.items() if a == arm)

    print(f"RESULT residual_on={mean('on', 'residual_last'):.4f} residual_off={mean('off', 'residual_last'):.4f} "
          f"reactivations_on={mean('on', 'reactivations'):.1f} reactivations_off={mean('off', 'reactivations'):.1f} "
          f"gain_on={gain('on'):.4f} gain_off={gain('off'):.4f}")


if __name__ == "__main__":
    main()
