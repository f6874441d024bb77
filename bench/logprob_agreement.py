"""Behaviour log-probs from vLLM against the learner's, on the same tokens and weights.

The rollout samples with vLLM and returns the log-prob of each sampled token under the tempered
distribution it sampled from (`logprobs_mode="processed_logprobs"`); the learner recomputes them
with transformers in fp32 (`pipeline.model.batch.token_logprobs`, what training uses). This
bench samples held-out word problems on the real model (SmolLM2-135M-Instruct, Q4_1 weights
dequantised to fp32; `rlstream models fetch smollm2-135m-instruct`) with vLLM in fp32 and in
bf16, recomputes the learner's log-probs for the same tokens, and reports
`pipeline.rollout.agreement.logprob_agreement`: mean and max |log mu - log pi| and the
approximate KL(mu || pi), per dtype and temperature.

Usage: python bench/logprob_agreement.py [--model DIR] [--problems 32] [--samples 4]
The last line is `RESULT fp32_mean_abs=… fp32_max_abs=… fp32_kl=… bf16_mean_abs=… bf16_max_abs=… bf16_kl=…`
(kl: the k3 estimate, at T = 0.5).
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from pipeline.data.tasks import word_problems
from pipeline.model.policy import load_policy
from pipeline.model.prompts import PromptFormat
from pipeline.config import PromptConfig
from pipeline.rollout.agreement import logprob_agreement
from pipeline.model.batch import pack, token_logprobs


def learner_logprobs(model, samples, temperatures, pad_id: int, batch: int = 16) -> np.ndarray:
    """The learner's log-prob of every sampled token (fp32, each sample at its temperature)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            chunk = samples[i: i + batch]
            packed = pack([s.prompt_token_ids for s in chunk], [s.completion_token_ids for s in chunk],
                          [temperatures[s.prompt_index] for s in chunk], pad_id)
            lp, _ = token_logprobs(model, packed)
            mask = packed.completion_mask.bool()
            for r in range(len(chunk)):
                out.append(lp[r][mask[r]].numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the fetched smollm2-135m-instruct)")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from infra.models import fetch

        args.model = str(fetch("smollm2-135m-instruct"))
    from pipeline.rollout.engine_vllm import VllmEngine

    model, tok = load_policy(args.model, dtype=torch.float32)
    model.eval()
    fmt = PromptFormat(tok, PromptConfig(template="chat"))
    problems = word_problems(args.problems, seed=11, difficulties={1: 1, 2: 1, 3: 1, 5: 1}, split="heldout")
    results = {}
    for dtype in ("float32", "bfloat16"):
        t0 = time.monotonic()
        engine = VllmEngine(args.model, tok, args.max_new_tokens, seed=0, dtype=dtype, max_model_len=512,
                            kv_cache_gib=2, prompt_format=fmt)
        for temp in (0.5, 1.0):
            temps = [temp] * len(problems)
            samples = engine.generate([p.text for p in problems], temps, args.samples)
            behaviour = np.concatenate([s.behavior_logprobs for s in samples])
            ours = learner_logprobs(model, samples, temps, tok.pad_token_id)
            results[(dtype, temp)] = logprob_agreement(behaviour, ours)
            r = results[(dtype, temp)]
            print(f"vLLM {dtype:8s} T={temp}: {r['tokens']:6d} tokens  mean |dlogp| {r['mean_abs']:.2e}  "
                  f"max {r['max_abs']:.2e}  KL k1 {r['kl_k1']:+.2e}  k3 {r['kl_k3']:.2e}  "
                  f"({time.monotonic() - t0:.0f}s)", flush=True)
        engine.close()
        del engine
        gc.collect()
    f, b = results[("float32", 0.5)], results[("bfloat16", 0.5)]
    print(f"RESULT fp32_mean_abs={f['mean_abs']:.3e} fp32_max_abs={f['max_abs']:.3e} fp32_kl={f['kl_k3']:.3e} "
          f"bf16_mean_abs={b['mean_abs']:.3e} bf16_max_abs={b['max_abs']:.3e} bf16_kl={b['kl_k3']:.3e}")


if __name__ == "__main__":
    main()
