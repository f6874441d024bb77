"""Which task can a real small instruct model partly solve? Base accuracies of candidate tasks.

RL needs a task where the base model is right sometimes: a group whose samples are all wrong has
no signal, and GSM8K is out of reach of SmolLM2-135M-Instruct (under 1 % published). This bench
samples held-out problems of each candidate with vLLM on the real model (its chat template,
128-token completions), verifies them with the project's verifier, and prints greedy accuracy
and sampled pass@1 at T = 0.5 and T = 1.0, with the mean completion length and the share cut at
the limit:

- ``add2d``, ``chain3``: arithmetic as a chat question ("What is 47 + 38?", "What is 4 + 9 - 4?");
- ``gsm8k_short``: the shortest GSM8K test questions (needs ../shared/data);
- ``wp1`` .. ``wp5``: each level of `pipeline.data.tasks.word_problems` (add, take away, multiply,
  two steps, share equally);
- ``smollm2``: the mixture `infra/configs/smollm2.toml` trains on.

Usage: python bench/task_scan.py [--model DIR] [--problems 40] [--candidates wp1,wp3,smollm2]
The last line is `RESULT <candidate>_greedy=… <candidate>_t05=… …` (t05: sampled pass@1 at T = 0.5).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import PromptConfig, load_config
from pipeline.data.tasks import Problem, load_problems, prompt_id_of, word_problems
from pipeline.model.prompts import PromptFormat
from pipeline.verify.verifier import verify_one

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def arithmetic(n: int, terms: int, digits: int, ops: str, seed: int) -> list[Problem]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        values = [int(v) for v in rng.integers(lo, 10 ** digits, terms)]
        signs = [ops[int(i)] for i in rng.integers(0, len(ops), terms - 1)]
        expr = str(values[0]) + "".join(f" {s} {v}" for s, v in zip(signs, values[1:]))
        total = values[0] + sum(v if s == "+" else -v for s, v in zip(signs, values[1:]))
        text = f"What is {expr}?"
        out.append(Problem(prompt_id_of(text), text, str(total)))
    return out


def candidates(n: int) -> dict[str, list[Problem]]:
    cands = {"add2d": arithmetic(n, 2, 2, "+", 0), "chain3": arithmetic(n, 3, 1, "+-", 1)}
    if (SHARED / "gsm8k" / "test.jsonl").exists():
        cands["gsm8k_short"] = sorted(load_problems(SHARED / "gsm8k" / "test.jsonl"), key=lambda p: len(p.text))[:n]
    for level in range(1, 6):
        cands[f"wp{level}"] = word_problems(n, 7, {level: 1.0}, "heldout")
    task = load_config(REPO / "infra" / "configs" / "smollm2.toml").task
    cands["smollm2"] = word_problems(n, 7, task.difficulty_weights_map(), "heldout")
    return cands


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the fetched smollm2-135m-instruct)")
    ap.add_argument("--problems", type=int, default=40, help="held-out problems per candidate")
    ap.add_argument("--samples", type=int, default=4, help="samples per problem for sampled pass@1")
    ap.add_argument("--candidates", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from infra.models import fetch

        args.model = str(fetch("smollm2-135m-instruct"))
    from transformers import AutoTokenizer

    from pipeline.rollout.engine_vllm import VllmEngine

    tok = AutoTokenizer.from_pretrained(args.model)
    engine = VllmEngine(args.model, tok, 128, seed=0, max_model_len=512, kv_cache_gib=2,
                        prompt_format=PromptFormat(tok, PromptConfig(template="chat")))
    cands = candidates(args.problems)
    names = args.candidates.split(",") if args.candidates else list(cands)
    result = {}
    for name in names:
        problems = cands[name]
        for temperature, n in ((0.0, 1), (0.5, args.samples), (1.0, args.samples)):
            t0 = time.monotonic()
            out = engine.generate([p.text for p in problems], [temperature] * len(problems), n)
            reward = np.mean([verify_one(s.text, problems[s.prompt_index].answer, signal_timeout_s=None).reward
                              for s in out])
            tokens = np.array([len(s.completion_token_ids) for s in out])
            cut = np.mean([s.finish_reason == "length" for s in out])
            print(f"{name:12s} T={temperature:.1f} x{n}: accuracy {reward:.3f}  mean length {tokens.mean():5.1f}  "
                  f"cut {cut:.2f}  {tokens.sum() / (time.monotonic() - t0):.0f} tokens/s", flush=True)
            key = {0.0: "greedy", 0.5: "t05", 1.0: "t10"}[temperature]
            result[f"{name}_{key}"] = reward
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
