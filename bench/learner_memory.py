"""Learner memory with a Qwen-sized vocabulary: the token-budget step against the un-chunked one.

A Qwen3-architecture model (hidden 128, 2 layers, vocabulary 151,936: the vocabulary is what
matters, as in the issue) with RAPO's exact forward KL on (so the frozen reference runs too), one
learner step on random groups. Each measurement runs in its own process, so its peak resident
memory (``ru_maxrss``) is its own:

* ``chunked``: `pipeline.rl.learn.train_step` (micro-batches of ``max_tokens_per_micro_batch`` padded
  tokens, the output layer in chunks of ``logit_chunk_mb``, each chunk's gradient inside it);
* ``unchunked``: the step as the learner computed it before: the whole update packed, the tempered
  log-softmax over the vocabulary for every completion token at once (``token_logprobs_full``), the
  exact KL on the full ``[tokens, vocabulary]`` reference, autograd, one AdamW update.

Sizes: the issue's target, 64 sequences x (128 prompt + 1,024 completion) tokens, chunked only
(un-chunked it needs far more than this machine has); and the largest size the un-chunked step
fits in here (``--fit``, 8 x (128 + 512) by default), both ways, timed (median of ``--reps`` steps
after one warm-up), for the slowdown.

    python bench/learner_memory.py [--threads 2] [--reps 2]

Last line: ``RESULT peak_gb=… tokens=… vocab=… slowdown=… unchunked_peak_gb=… fit_tokens=…``
(peak_gb at the target size; slowdown = chunked / un-chunked step time at the fitting size).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, HIDDEN, LAYERS, G = 151_936, 128, 2, 8


def groups_of(seqs: int, prompt: int, completion: int, seed: int = 0) -> list[dict]:
    import uuid

    from schemas import Ragged

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(seqs // G):
        p = rng.integers(4, VOCAB, prompt).astype(np.int32)
        comps = [rng.integers(4, VOCAB, completion).astype(np.int32) for _ in range(G)]
        r = rng.integers(0, 2, G).astype(np.float32)
        out.append({"group_id": np.array([uuid.uuid4().hex] * G, dtype=object),
                    "prompt_token_ids": Ragged.from_list([p] * G, np.int32),
                    "completion_token_ids": Ragged.from_list(comps, np.int32),
                    "temperature": np.ones(G, np.float32),
                    "finish_reason": np.array(["length"] * G, dtype=object),
                    "behavior_logprobs": Ragged.from_list([np.full(completion, -12.0, np.float32)] * G, np.float32),
                    "reward": r, "group_pass_rate": np.full(G, r.mean(), np.float32)})
    return out


def unchunked_step(trainer, ref, groups, lc) -> None:
    """The learner's step before token budgets: one packed batch, full log-softmax, autograd."""
    import torch

    from pipeline.rl.advantages import grpo_advantages
    from pipeline.model.batch import completion_logits, pack, scatter_completion, token_logprobs_full
    from pipeline.rl.losses import phi_clamp, ppo_per_token, rapo_exact_kl, reweighted_reference
    from schemas import concat

    cols = concat(groups)
    _, gi = np.unique(cols["group_id"], return_inverse=True)
    rewards = torch.as_tensor(cols["reward"])
    adv = grpo_advantages(rewards, torch.as_tensor(gi))
    n = len(rewards)
    batch = pack([cols["prompt_token_ids"][i] for i in range(n)], [cols["completion_token_ids"][i] for i in range(n)],
                 cols["temperature"], 0)
    behavior = scatter_completion(cols["behavior_logprobs"].values, batch.completion_mask)
    lp, _, logp = token_logprobs_full(trainer.model, batch)
    pg, _ = ppo_per_token(lp, lp.detach(), behavior, adv.unsqueeze(-1))
    weights = batch.completion_mask / batch.completion_mask.sum()  # token mean
    loss = (pg * weights).sum()
    idx = batch.completion_mask.bool()
    with torch.no_grad():
        ref_logits = completion_logits(ref, batch)
        temps = batch.temperatures.unsqueeze(1).expand_as(idx)[idx]
        phi = phi_clamp(rewards, lc.kl.phi_floor).unsqueeze(1).expand_as(idx)[idx]
        hat = reweighted_reference(ref_logits, temps, phi)
        del ref_logits
    kl = (rapo_exact_kl(logp, hat) * weights[idx]).sum()
    trainer.step(loss + lc.kl.coef * kl)


def measure(case: str, seqs: int, prompt: int, completion: int, reps: int, threads: int) -> dict:
    """One case in this process: step times and the process's peak memory."""
    import torch

    from pipeline.config import LearnerConfig
    from pipeline.erpo.rule import ErpoRule
    from pipeline.rl.learn import train_step
    from pipeline.model.policy import build_tiny
    from pipeline.rl.trainer import TorchTrainer

    torch.set_num_threads(threads)
    model = build_tiny("qwen3", VOCAB, hidden_size=HIDDEN, layers=LAYERS, heads=4, kv_heads=2,
                       intermediate_size=4 * HIDDEN, max_positions=2048, seed=0)
    ref = build_tiny("qwen3", VOCAB, hidden_size=HIDDEN, layers=LAYERS, heads=4, kv_heads=2,
                     intermediate_size=4 * HIDDEN, max_positions=2048, seed=0).eval().requires_grad_(False)
    lc = LearnerConfig(backend="torch", kl={"kind": "rapo", "coef": 0.05}, groups_per_step=max(1, seqs // G),
                       max_tokens_per_micro_batch=4096, logit_chunk_mb=256)
    trainer = TorchTrainer(model, lc)
    groups = groups_of(seqs, prompt, completion)
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        if case == "chunked":
            train_step(trainer, ref, groups, lc, ErpoRule(), 0, np.random.default_rng(i))
        else:
            unchunked_step(trainer, ref, groups, lc)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"case": case, "seqs": seqs, "prompt": prompt, "completion": completion, "tokens": seqs * (prompt + completion),
            "completion_tokens": seqs * completion, "step_s": statistics.median(times[1:]), "peak_gb": peak / 2**30}


def run_case(case: str, seqs: int, prompt: int, completion: int, reps: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", case, str(seqs), str(prompt), str(completion),
                           "--reps", str(reps), "--threads", str(threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "seqs": seqs, "prompt": prompt, "completion": completion, "failed": proc.returncode,
                "tail": proc.stderr[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--target", default="64,128,1024", help="sequences,prompt,completion of the target size")
    ap.add_argument("--fit", default="8,128,512", help="the size the un-chunked step still fits in here")
    ap.add_argument("--one", nargs=4, metavar=("CASE", "SEQS", "PROMPT", "COMPLETION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        case, *size = args.one
        print(json.dumps(measure(case, *map(int, size), args.reps, args.threads)))
        return
    target = tuple(map(int, args.target.split(",")))
    fit = tuple(map(int, args.fit.split(",")))
    rows = [run_case("chunked", *target, 1, args.threads),
            run_case("unchunked", *fit, args.reps, args.threads),
            run_case("chunked", *fit, args.reps, args.threads)]
    print(f"model: Qwen3 architecture, hidden {HIDDEN}, {LAYERS} layers, vocabulary {VOCAB:,}; RAPO exact KL on; "
          f"{args.threads} threads")
    print(f"{'case':>10} {'sequences x (prompt + completion)':>34} {'tokens':>8} {'step s':>8} {'peak GB':>8}")
    for r in rows:
        size = f"{r['seqs']} x ({r['prompt']} + {r['completion']})"
        if "failed" in r:
            print(f"{r['case']:>10} {size:>34}   failed (exit {r['failed']}): {r['tail']!r}")
        else:
            print(f"{r['case']:>10} {size:>34} {r['tokens']:>8} {r['step_s']:>8.1f} {r['peak_gb']:>8.2f}")
    big, un, ch = rows
    slowdown = ch["step_s"] / un["step_s"] if "failed" not in un and "failed" not in ch else float("nan")
    print(f"RESULT peak_gb={big.get('peak_gb', float('nan')):.2f} tokens={big.get('tokens', 0)} vocab={VOCAB} "
          f"slowdown={slowdown:.2f} unchunked_peak_gb={un.get('peak_gb', float('nan')):.2f} "
          f"fit_tokens={un.get('tokens', 0)}")


if __name__ == "__main__":
    main()
