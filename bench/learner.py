"""Learner step benchmark: our loss step vs TRL's GRPO loss, and RAPO's cost over reverse KL.

One run, one machine, the same randomly initialised Qwen2 (vocabulary 8,192) and the same batch
of 16 groups x 8 samples (prompts of 16-24 tokens, completions of 16-48):

* ours: `pipeline.rl.learn.train_step` (GRPO advantages, decoupled PPO with TIS, token-mean, one
  update; batch packing included) with the plain torch backend, no KL term;
* trl: `trl.GRPOTrainer.compute_loss` on the same model and batch (left-padded prompts,
  right-padded completions, as TRL lays them out; `loss_type="dapo"`, i.e. token-mean;
  `beta=0`), then backward, gradient clipping and the same AdamW step;
* ours with the reverse-KL (k3) term and with RAPO's forward KL to the reweighted reference
  (both add a forward pass of the frozen reference model).

Timed steps alternate between the paths after one warm-up step each. Reports median seconds per
step and completion tokens per second. Needs the bench extra (`pip install -e .[bench]`: trl).

Usage: python bench/learner.py [--reps 5] [--threads 2]
The last line is `RESULT ours_tok_s=… trl_tok_s=… ratio=… rapo_overhead=…` (ratio = ours / trl;
rapo_overhead = RAPO step time / k3 step time - 1).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time
import uuid
import warnings

import numpy as np
import torch

from pipeline.config import LearnerConfig
from pipeline.erpo.rule import ErpoRule
from pipeline.model.policy import build_char_tokenizer, build_tiny_qwen2
from pipeline.rl.advantages import grpo_advantages
from pipeline.rl.learn import train_step
from pipeline.rl.trainer import TorchTrainer
from schemas import Ragged

VOCAB, GROUPS, G = 8192, 16, 8


def make_groups(rng: np.random.Generator) -> list[dict]:
    groups = []
    for _ in range(GROUPS):
        prompt = rng.integers(4, VOCAB, rng.integers(16, 25)).astype(np.int32)
        comps = [rng.integers(4, VOCAB, rng.integers(16, 49)).astype(np.int32) for _ in range(G)]
        reward = rng.integers(0, 2, G).astype(np.float32)
        groups.append({
            "group_id": np.array([uuid.uuid4().hex] * G, dtype=object),
            "prompt_token_ids": Ragged.from_list([prompt] * G, np.int32),
            "completion_token_ids": Ragged.from_list(comps, np.int32),
            "temperature": np.ones(G, np.float32),
            "finish_reason": np.array(["stop"] * G, dtype=object),
            "behavior_logprobs": Ragged.from_list([np.full(len(c), -9.0, np.float32) for c in comps], np.float32),
            "reward": reward,
            "group_pass_rate": np.full(G, reward.mean(), np.float32),
        })
    return groups


def trl_inputs(groups: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """TRL's layout: prompts left-padded, completions right-padded, advantages per sequence."""
    prompts = [g["prompt_token_ids"][i] for g in groups for i in range(G)]
    comps = [g["completion_token_ids"][i] for g in groups for i in range(G)]
    P, C = max(map(len, prompts)), max(map(len, comps))
    B = len(prompts)
    prompt_ids = torch.full((B, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    completion_ids = torch.full((B, C), pad, dtype=torch.long)
    completion_mask = torch.zeros((B, C), dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, comps)):
        prompt_ids[b, P - len(p):] = torch.from_numpy(p.astype(np.int64))
        prompt_mask[b, P - len(p):] = 1
        completion_ids[b, : len(c)] = torch.from_numpy(c.astype(np.int64))
        completion_mask[b, : len(c)] = 1
    rewards = torch.as_tensor(np.concatenate([g["reward"] for g in groups]))
    advantages = grpo_advantages(rewards, torch.arange(GROUPS).repeat_interleave(G))
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": advantages,
            "num_items_in_batch": completion_mask.sum()}


def make_trl(model: torch.nn.Module, tokenizer, out_dir: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=GROUPS * G, num_generations=G,
                      beta=0.0, loss_type="dapo", report_to=[], use_cpu=True, bf16=False,
                      max_completion_length=48, logging_steps=1_000_000, save_strategy="no")
    return GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                       args=args, train_dataset=Dataset.from_dict({"prompt": ["1+1="] * GROUPS}),
                       processing_class=tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    tokenizer = build_char_tokenizer()
    base = build_tiny_qwen2(VOCAB, hidden_size=256, layers=4, heads=4, kv_heads=2, intermediate_size=768,
                            max_positions=128, seed=0)
    n_params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    groups = make_groups(np.random.default_rng(0))
    tokens = int(sum(len(g["completion_token_ids"][i]) for g in groups for i in range(G)))
    print(f"model: Qwen2, {n_params / 1e6:.1f}M parameters, vocabulary {VOCAB}; batch: {GROUPS} groups x {G} "
          f"= {GROUPS * G} sequences, {tokens} completion tokens; {args.threads} threads", flush=True)

    rule = ErpoRule(enabled=False)
    lc = {kind: LearnerConfig(backend="torch", kl={"kind": kind} | ({"coef": 0.05} if kind != "none" else {}),
                              optimizer={"warmup_steps": 0}, mini_batches=1)
          for kind in ("none", "k3", "rapo")}
    ours = {kind: TorchTrainer(copy.deepcopy(base).train(), lc[kind]) for kind in lc}
    ref = copy.deepcopy(base).eval().requires_grad_(False)

    trl_model = copy.deepcopy(base).train()
    with tempfile.TemporaryDirectory() as tmp:
        trl = make_trl(trl_model, tokenizer, tmp)
        trl.current_gradient_accumulation_steps = 1  # set by Trainer.training_step in a real loop
        trl_opt = torch.optim.AdamW(trl_model.parameters(), lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0)
        inputs = trl_inputs(groups, tokenizer.pad_token_id)

        def step_trl() -> None:
            loss = trl.compute_loss(trl_model, inputs)
            trl_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trl_model.parameters(), 1.0)
            trl_opt.step()

        def step_ours(kind: str, step: int) -> None:
            train_step(ours[kind], ref, groups, lc[kind], rule, tokenizer.pad_token_id,
                       np.random.default_rng(step))

        paths = {"ours": lambda s: step_ours("none", s), "trl": lambda s: step_trl(),
                 "ours+k3": lambda s: step_ours("k3", s), "ours+rapo": lambda s: step_ours("rapo", s)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for rep in range(args.reps + 1):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn(rep)
                if rep:  # the first round warms up every path
                    times[name].append(time.perf_counter() - t0)
            print(f"  round {rep}/{args.reps} done", flush=True)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{'path':<14}{'median s/step':>14}{'min':>8}{'max':>8}{'tokens/s':>10}")
    for name, ts in times.items():
        print(f"{name:<14}{med[name]:>14.3f}{min(ts):>8.3f}{max(ts):>8.3f}{tokens / med[name]:>10.0f}")
    ours_tok, trl_tok = tokens / med["ours"], tokens / med["trl"]
    overhead = med["ours+rapo"] / med["ours+k3"] - 1
    print(f"RESULT ours_tok_s={ours_tok:.0f} trl_tok_s={trl_tok:.0f} ratio={ours_tok / trl_tok:.2f} "
          f"rapo_overhead={overhead:.3f}")


if __name__ == "__main__":
    main()
