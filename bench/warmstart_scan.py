"""What a warm-start gives RL to work with: base greedy and sampled accuracy, pass@k and accuracy
by difficulty on the demo's held-out problems, for each warm-start setting given.

Usage:
    python bench/warmstart_scan.py "model.warmstart.label_noise=0.0;model.warmstart.steps=300" \\
        "model.warmstart.habit_rate=0.6" [--samples 64] [--problems 100]

Each argument is one variant: `;`-separated `--set` overrides of the shipped demo config. The
warm-starts are cached under `--cache` (default .cache/rlstream-scan), so a second scan is quick.
`--policy FOLDER` evaluates that policy (e.g. a run's `export/final`) under each variant's settings
instead of the variant's warm-start. With worked solutions in the warm-start (`worked_rate`), each
line also splits greedy and sampled completions by style: the share of worked solutions (they
start with a space) and of terse answers, and the accuracy of each.
One JSON line per variant, then `RESULT` with the best greedy accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help="';'-separated config overrides, one argument per variant")
    ap.add_argument("--samples", type=int, default=64, help="samples per problem for pass@k")
    ap.add_argument("--problems", type=int, default=100, help="held-out problems for pass@k")
    ap.add_argument("--cache", default=".cache/rlstream-scan")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policy", default=None, help="evaluate this model folder instead of the warm-start")
    args = ap.parse_args()

    import torch

    from pipeline.config import load_config
    from pipeline.data.tasks import heldout_problems
    from pipeline.model.prompts import PromptFormat
    from pipeline.rollout.engine import TorchEngine
    from pipeline.model.policy import load_policy
    from pipeline.model.warmstart import answer_style
    from pipeline.rollout.evaluate import by_style, evaluate, sample_budget
    from services.cli import shipped_config
    from services.common import initial_policy_path, load_initial_policy

    torch.set_num_threads(args.threads)
    best = 0.0
    for variant in args.variants:
        cfg = load_config(shipped_config(), [s for s in variant.split(";") if s] + [f'cache_dir="{args.cache}"'])
        t0 = time.monotonic()
        initial_policy_path(cfg)  # warm-start (or find it cached)
        warm_s = time.monotonic() - t0
        model, tok = load_policy(args.policy) if args.policy else load_initial_policy(cfg)
        heldout = heldout_problems(cfg)
        engine = TorchEngine(model, tok, cfg.rollout.max_new_tokens, seed=cfg.seed,
                             prompt_format=PromptFormat(tok, cfg.prompt))
        acc = evaluate(engine, heldout, cfg.eval.temperature, cfg.eval.samples)
        subset = heldout[: args.problems]
        budget = sample_budget(engine, subset, args.samples, cfg.eval.temperature, batch=16)
        by_level: dict[int, list[float]] = defaultdict(list)
        for p, c in zip(subset, budget.correct):
            by_level[p.difficulty].append(c / args.samples)
        styles = {}
        if cfg.model.warmstart.worked_rate > 0:
            styles = {"greedy_by_style": by_style(engine, subset, 0.0, 1, answer_style),
                      "sampled_by_style": by_style(engine, subset, cfg.eval.temperature, 8, answer_style)}
            styles = {k: {s: {m: round(x, 3) for m, x in v.items()} for s, v in d.items()} for k, d in styles.items()}
        best = max(best, acc.greedy_accuracy)
        print(json.dumps({"variant": variant, "warmstart_s": round(warm_s), "greedy": acc.greedy_accuracy,
                          "sampled": acc.sampled_accuracy, **{f"pass@{k}": round(v, 3) for k, v in budget.pass_at.items()},
                          "sampled_by_level": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_level.items())},
                          **styles}),
              flush=True)
    print(f"RESULT variants={len(args.variants)} best_greedy={best:.4f}")


if __name__ == "__main__":
    main()
