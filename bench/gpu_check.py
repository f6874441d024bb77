"""A five-minute check of one GPU with a ~0.5B-parameter Qwen-shaped model: rollout tokens/s,
learner tokens/s, weight-sync seconds, peak GPU memory. Run through ``bench/gpu_check.sh``.

Needs nothing but this checkout and torch (no network, no transformers, no vLLM), so it can be
copied to a fresh GPU machine and run there: the model is a Qwen2-architecture decoder written
here in plain torch (RMSNorm, rotary attention with grouped KV heads, SwiGLU, tied embeddings),
Qwen2.5-0.5B's shapes by default (hidden 896, 24 layers, 14 heads / 2 KV heads, vocabulary
151,936; 494M parameters), random weights, bf16.

- rollout: KV-cached multinomial sampling, ``--prompts`` x ``--group`` sequences, prompt
  ``--prompt-len`` tokens, ``--new-tokens`` new tokens each (this is the torch sampling loop, not
  vLLM: vLLM's figures come from ``bench/rollout.py`` on a machine that has it);
- learner: forward + backward + AdamW on the same number of sequences, the output layer through
  rlstream's chunked head (`pipeline.rl.head`: no ``[tokens, vocabulary]`` tensor), micro-batches of
  ``--micro-tokens``;
- weight sync: the learner's weights to host memory, written to a file and loaded into the rollout
  model (what publishing and an in-place reload cost, without the broker).

Last line: ``RESULT rollout_tok_s=… learner_tok_s=… sync_s=… peak_gb=… params_m=… device=…``.
``--device cpu --tiny`` runs the same code on a small model on CPU (a smoke test; the figures
mean nothing).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.rl.head import HeadPlan, chunk_tokens, completion_head  # noqa: E402  (torch only)


@dataclass(frozen=True)
class Shape:
    vocab: int = 151_936
    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    rope_theta: float = 1_000_000.0


TINY = Shape(vocab=4096, hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128)


class RMSNorm(torch.nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(v + self.eps)).to(x.dtype) * self.weight


def rotate(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class Block(torch.nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s, hd = s, s.hidden // s.heads
        self.q = torch.nn.Linear(s.hidden, s.heads * hd, bias=True)
        self.k = torch.nn.Linear(s.hidden, s.kv_heads * hd, bias=True)
        self.v = torch.nn.Linear(s.hidden, s.kv_heads * hd, bias=True)
        self.o = torch.nn.Linear(s.heads * hd, s.hidden, bias=False)
        self.gate = torch.nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up = torch.nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down = torch.nn.Linear(s.intermediate, s.hidden, bias=False)
        self.n1, self.n2 = RMSNorm(s.hidden), RMSNorm(s.hidden)

    def forward(self, x, cos, sin, cache=None):
        s, (B, T, _) = self.s, x.shape
        hd = s.hidden // s.heads
        h = self.n1(x)
        q = self.q(h).view(B, T, s.heads, hd).transpose(1, 2)
        k = self.k(h).view(B, T, s.kv_heads, hd).transpose(1, 2)
        v = self.v(h).view(B, T, s.kv_heads, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            if cache.get("k") is not None:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        rep = s.heads // s.kv_heads
        a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                           is_causal=cache is None or T > 1)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(torch.nn.Module):
    """Qwen2's architecture in plain torch (tied input/output embeddings)."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.embed = torch.nn.Embedding(s.vocab, s.hidden)
        self.blocks = torch.nn.ModuleList(Block(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden)
        self.head = torch.nn.Linear(s.hidden, s.vocab, bias=False)
        self.head.weight = self.embed.weight

    def rope(self, positions, dtype):
        hd = self.s.hidden // self.s.heads
        inv = 1.0 / (self.s.rope_theta ** (torch.arange(0, hd, 2, device=positions.device).float() / hd))
        ang = positions.float()[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        return ang.cos().to(dtype)[None, None], ang.sin().to(dtype)[None, None]

    def hidden(self, ids, start: int = 0, caches=None):
        x = self.embed(ids)
        cos, sin = self.rope(torch.arange(start, start + ids.shape[1], device=ids.device), x.dtype)
        for i, b in enumerate(self.blocks):
            x = b(x, cos, sin, None if caches is None else caches[i])
        return self.norm(x)


@torch.no_grad()
def rollout(model: Decoder, prompts: int, group: int, prompt_len: int, new_tokens: int, device) -> tuple[int, float]:
    """KV-cached sampling at temperature 1; returns (tokens generated, seconds)."""
    B = prompts * group
    ids = torch.randint(0, model.s.vocab, (prompts, prompt_len), device=device).repeat_interleave(group, 0)
    caches = [{} for _ in model.blocks]
    sync(device)
    t0 = time.perf_counter()
    h = model.hidden(ids, 0, caches)[:, -1:]
    for t in range(new_tokens):
        probs = torch.softmax(model.head(h).float().squeeze(1), -1)
        nxt = torch.multinomial(probs, 1)
        h = model.hidden(nxt, prompt_len + t, caches)
    sync(device)
    return B * new_tokens, time.perf_counter() - t0


def learner_step(model: Decoder, opt, seqs: int, prompt_len: int, new_tokens: int, micro_tokens: int,
                 chunk_mb: float, device) -> tuple[int, float]:
    """One update (token-mean policy-gradient-shaped loss through the chunked head, gradients
    accumulated over micro-batches); returns (completion tokens, seconds)."""
    T = prompt_len + new_tokens
    per_micro = max(1, micro_tokens // T)
    chunk = chunk_tokens(model.s.vocab, chunk_mb, buffers=3)
    total = seqs * new_tokens
    sync(device)
    t0 = time.perf_counter()
    for lo in range(0, seqs, per_micro):
        n = min(per_micro, seqs - lo)
        ids = torch.randint(0, model.s.vocab, (n, T), device=device)
        hidden = model.hidden(ids)[:, prompt_len - 1:-1].reshape(-1, model.s.hidden)
        adv = torch.randn(n * new_tokens, device=device)

        def token_loss(lp, values, sl, adv=adv):
            return -(lp * adv[sl]).sum() / total

        plan = HeadPlan(ids[:, prompt_len:].reshape(-1), torch.ones(n * new_tokens, device=device), chunk, token_loss)
        completion_head(model.head, hidden, plan).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return total, time.perf_counter() - t0


def weight_sync(learner: Decoder, rollout_model: Decoder) -> float:
    """Learner weights -> host -> file -> the rollout model, as publishing and reloading do."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().to("cpu", copy=True) for k, v in learner.state_dict().items()}
        torch.save(state, Path(tmp) / "weights.pt")
        loaded = torch.load(Path(tmp) / "weights.pt", weights_only=True)
        rollout_model.load_state_dict(loaded)
    sync(next(rollout_model.parameters()).device)
    return time.perf_counter() - t0


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model (CPU smoke test)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--micro-tokens", type=int, default=16_384)
    ap.add_argument("--chunk-mb", type=float, default=512.0)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1 (one timed learner step after the warm-up)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); nothing to check. "
              "Run it on a machine with a GPU, or `--device cpu --tiny` for a smoke test.", file=sys.stderr)
        return 2
    shape = TINY if args.tiny else Shape()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    learner = Decoder(shape).to(device)  # fp32 master weights, bf16 autocast
    params = sum(p.numel() for p in learner.parameters())
    rollout_model = Decoder(shape).to(device, dtype).eval()
    print(f"gpu_check on {name}: Qwen2-shaped decoder, {params / 1e6:.0f}M parameters, vocabulary {shape.vocab}, "
          f"rollout in {str(dtype).split('.')[-1]} with the torch sampling loop (not vLLM)", flush=True)
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-6, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    new = args.new_tokens if not args.tiny else min(args.new_tokens, 32)
    rollout(rollout_model, 1, 2, 8, 4, device)  # warm-up
    tok, secs = rollout(rollout_model, args.prompts, args.group, args.prompt_len, new, device)
    rollout_tok_s = tok / secs
    print(f"rollout: {tok} tokens in {secs:.1f} s = {rollout_tok_s:.0f} tok/s "
          f"({args.prompts} prompts x {args.group} samples x {new} new tokens)", flush=True)
    learner_tok_s = []
    seqs = args.prompts * args.group
    for step in range(args.steps + 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tok, secs = learner_step(learner, opt, seqs, args.prompt_len, new, args.micro_tokens, args.chunk_mb,
                                     device)
        if step:  # the first is a warm-up
            learner_tok_s.append(tok / secs)
        print(f"learner step {step}{' (warm-up)' if not step else ''}: {tok} completion tokens in {secs:.1f} s",
              flush=True)
    sync_s = min(weight_sync(learner, rollout_model) for _ in range(2))
    print(f"weight sync: {sync_s:.2f} s ({params * 4 / 2**30:.2f} GiB of fp32 weights)", flush=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    print(f"RESULT rollout_tok_s={rollout_tok_s:.0f} learner_tok_s={sum(learner_tok_s) / len(learner_tok_s):.0f} "
          f"sync_s={sync_s:.2f} peak_gb={peak:.2f} params_m={params / 1e6:.0f} device={name.replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
