"""Does the demo's held-out evaluation say what transformers' own `generate` would?

The demo evaluates greedy accuracy with its evaluation engine (`eval.engine`: vLLM for the real
model's config, the torch engine otherwise). This bench takes the held-out problems of a run
config (default `infra/configs/smollm2.toml`, seed 0), decodes each greedily with that engine and
with transformers' `model.generate(do_sample=False)` (left-padded batches, the same chat-template
token ids, the same stop ids), and compares them problem by problem: same completion tokens, same
verdict, and the two accuracies.

Usage: python bench/eval_agreement.py [--config RUN.toml] [--set KEY=VALUE ...] [--problems N] [--batch 32]
The last line is `RESULT problems=… engine_greedy=… transformers_greedy=… same_tokens=… same_verdict=…`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def transformers_greedy(model, tok, fmt, problems, max_new_tokens: int, stop_ids: list[int], batch: int) -> list[list[int]]:
    """Greedy completions from `model.generate`, each cut after its first stop id."""
    out = []
    for i in range(0, len(problems), batch):
        ids = fmt.encode([p.text for p in problems[i: i + batch]])
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, row in enumerate(ids):  # left-padded, as generation wants
            input_ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
        for row in gen[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))
            out.append(row[:cut])
        print(f"  transformers generate: {min(i + batch, len(problems))}/{len(problems)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "infra" / "configs" / "smollm2.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--problems", type=int, default=None, help="first N held-out problems (default: all)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.config import load_config
    from pipeline.data.tasks import heldout_problems
    from pipeline.model.prompts import PromptFormat
    from pipeline.verify.verifier import verify_one
    from services.common import initial_policy_path, load_initial_policy
    from services.demo import eval_engine

    cfg = load_config(args.config, args.overrides)
    problems = heldout_problems(cfg)[: args.problems]
    path = initial_policy_path(cfg)
    model, tok = load_initial_policy(cfg)
    model.eval()
    fmt = PromptFormat(tok, cfg.prompt)
    n = cfg.rollout.max_new_tokens

    t0 = time.monotonic()
    engine = eval_engine(cfg, model, tok, path)
    samples = engine.generate([p.text for p in problems], [0.0] * len(problems), 1)
    ours = [[int(t) for t in s.completion_token_ids] for s in sorted(samples, key=lambda s: s.prompt_index)]
    ours_text = [s.text for s in sorted(samples, key=lambda s: s.prompt_index)]
    t_engine = time.monotonic() - t0
    if hasattr(engine, "close"):
        engine.close()
    t0 = time.monotonic()
    theirs = transformers_greedy(model, tok, fmt, problems, n, engine.stop_ids, args.batch)
    t_hf = time.monotonic() - t0

    def text(ids: list[int]) -> str:
        return tok.decode(ids[:-1] if ids and ids[-1] in engine.stop_ids else ids, skip_special_tokens=True)

    ok_ours = np.array([verify_one(t, p.answer, signal_timeout_s=None).reward for t, p in zip(ours_text, problems)])
    ok_theirs = np.array([verify_one(text(ids), p.answer, signal_timeout_s=None).reward
                          for ids, p in zip(theirs, problems)])
    same_tokens = sum(a == b for a, b in zip(ours, theirs))
    same_verdict = int((ok_ours == ok_theirs).sum())
    first_diff = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                  for a, b in zip(ours, theirs) if a != b]
    print(f"{len(problems)} problems: {cfg.eval.engine} engine greedy {ok_ours.mean():.3f} ({t_engine:.0f} s), "
          f"transformers generate greedy {ok_theirs.mean():.3f} ({t_hf:.0f} s); same tokens {same_tokens}, "
          f"same verdict {same_verdict}" + (f"; differing completions part at token {int(np.median(first_diff))} "
                                            f"(median)" if first_diff else ""))
    print(f"RESULT problems={len(problems)} engine_greedy={ok_ours.mean():.4f} transformers_greedy={ok_theirs.mean():.4f} "
          f"same_tokens={same_tokens} same_verdict={same_verdict}")


if __name__ == "__main__":
    main()
