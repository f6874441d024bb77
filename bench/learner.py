"""Learner step benchmark: our loss step vs TRL's GRPO loss, and RAPO's cost over reverse KL.

One run, one machine, one model and one batch for every path. Two setups:

* default: a randomly initialised Qwen2 (vocabulary 8,192) and a random batch of 16 groups x 8
  samples (prompts of 16-24 tokens, completions of 16-48), our default learner settings;
* ``--config RUN.toml --lake RUN/lake`` (a real model, e.g. infra/configs/smollm2.toml): the run's
  initial policy (``model.pretrained`` or ``model.path``, loaded as the learner loads it), the
  run's learner settings (micro-batch token budget, logit chunk, autocast, learning rate), and a
  batch *recorded* by a run of it: the first ``--groups`` scored groups of its lake whose rewards
  differ (a group with equal rewards has no advantage; our learner's dynamic sampling would drop
  it and do less work than TRL), decoded as the learner decodes them. TRL goes through the model
  ``--micro-batch`` rows at a time with the loss normalised by the whole batch's token count
  (``loss_type="dapo"``, as bench/trl_grpo.py maps token_mean), under the same autocast as ours.

The paths:

* ours: `pipeline.rl.learn.train_step` (GRPO advantages, decoupled PPO with TIS, token-mean, one
  update; batch packing included) with the plain torch backend, no KL term;
* trl: `trl.GRPOTrainer.compute_loss` on the same model and batch (left-padded prompts,
  right-padded completions, as TRL lays them out; `loss_type="dapo"`, i.e. token-mean;
  `beta=0`), then backward, gradient clipping and the same AdamW step;
* ours with the reverse-KL (k3) term and with RAPO's forward KL to the reweighted reference
  (both add a forward pass of the frozen reference model).

Timed steps alternate between the paths after one warm-up step each. Reports median seconds per
step, completion tokens per second and peak memory: the largest rise of the process's peak resident
set (VmHWM, reset before each step) over its resident set before the step, i.e. what the step
itself allocates on top of the weights and optimiser state already held. Needs the bench extra
(`pip install -e .[bench]`: trl).

Usage: python bench/learner.py [--reps 5] [--threads 2]
       python bench/learner.py --config infra/configs/smollm2.toml --lake runs/smollm2/grpo-s1/lake \
           [--groups 4] [--micro-batch 8] [--reps 2]
The last line is `RESULT ours_tok_s=… trl_tok_s=… ratio=… rapo_overhead=… ours_peak_mb=…
trl_peak_mb=…` (ratio = ours / trl; rapo_overhead = RAPO step time / k3 step time - 1).
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
from pathlib import Path

import numpy as np
import torch

from peak_memory import peak_rise_mb

from pipeline.config import LearnerConfig, load_config
from pipeline.erpo.rule import ErpoRule
from pipeline.model.policy import build_char_tokenizer, build_tiny_qwen2
from pipeline.rl.advantages import grpo_advantages
from pipeline.rl.learn import autocast, resolved_autocast, train_step
from pipeline.rl.trainer import TorchTrainer
from schemas import Columns, Ragged

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


def recorded_groups(lake: Path, n: int) -> list[Columns]:
    """The first ``n`` scored groups of a run's lake (broker order) whose rewards differ, each
    decoded from its recorded Arrow bytes as the learner decodes a delivery."""
    from pipeline.lake.store import message_batch, read_topic, upgrade
    from schemas import SCORED_TRAJECTORY, decode, encode_batch, headers_for

    df = read_topic(lake, "scored")
    if df.is_empty():
        raise SystemExit(f"{lake}: no recorded scored groups (is it a run's lake folder, <run>/lake?)")
    df = upgrade(df, "scored")
    kind, groups = SCORED_TRAJECTORY, []
    for msg in df.partition_by(["_partition", "_offset"], maintain_order=True):
        if msg["reward"].n_unique() < 2:
            continue
        _, columns = decode(kind, encode_batch(kind, message_batch(msg, "scored")), headers_for(kind))
        groups.append(columns)
        if len(groups) == n:
            return groups
    raise SystemExit(f"{lake}: only {len(groups)} scored groups with differing rewards, --groups asks for {n}")


def trl_inputs(groups: list[Columns], pad: int, rows: slice, tokens: int) -> dict[str, torch.Tensor]:
    """TRL's layout of rows ``rows`` of the batch: prompts left-padded, completions right-padded,
    advantages per sequence (GRPO over each whole group), ``num_items_in_batch`` the whole batch's
    completion tokens (so that the micro-batches' losses add up to the token mean)."""
    prompts = [g["prompt_token_ids"][i] for g in groups for i in range(len(g["reward"]))]
    comps = [g["completion_token_ids"][i] for g in groups for i in range(len(g["reward"]))]
    rewards = torch.as_tensor(np.concatenate([g["reward"] for g in groups]))
    group = torch.as_tensor(np.concatenate([np.full(len(g["reward"]), k) for k, g in enumerate(groups)]))
    advantages = grpo_advantages(rewards, group)[rows]
    prompts, comps = prompts[rows], comps[rows]
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
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": advantages,
            "num_items_in_batch": torch.tensor(float(tokens))}


def make_trl(model: torch.nn.Module, tokenizer, out_dir: str, rows: int, group_size: int, temperature: float,
             bf16: bool):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=rows, num_generations=group_size,
                      beta=0.0, loss_type="dapo", report_to=[], use_cpu=True, bf16=bf16, temperature=temperature,
                      max_completion_length=48, logging_steps=1_000_000, save_strategy="no")
    return GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                       args=args, train_dataset=Dataset.from_dict({"prompt": ["1+1="] * group_size}),
                       processing_class=tokenizer)


def tiny_setup(args):
    tokenizer = build_char_tokenizer()
    base = build_tiny_qwen2(VOCAB, hidden_size=256, layers=4, heads=4, kv_heads=2, intermediate_size=768,
                            max_positions=128, seed=0)
    lc = LearnerConfig(backend="torch", optimizer={"warmup_steps": 0}, mini_batches=1)
    groups = make_groups(np.random.default_rng(0))
    return base, tokenizer, lc, groups, f"Qwen2 (random weights, vocabulary {VOCAB})", 1.0


def run_setup(args):
    from services.common import initial_policy_path, load_initial_policy

    cfg = load_config(args.config, args.set)
    base, tokenizer = load_initial_policy(cfg)
    lc = LearnerConfig.model_validate(cfg.learner.model_dump() | {"backend": "torch", "mini_batches": 1})
    groups = recorded_groups(Path(args.lake), args.groups)
    temps = np.unique(np.concatenate([g["temperature"] for g in groups]))
    if len(temps) != 1:
        raise SystemExit(f"the recorded groups were sampled at {len(temps)} temperatures ({temps.tolist()}); TRL takes "
                         "one: record the batch with erpo.enabled = false (the grid's grpo arm)")
    return base, tokenizer, lc, groups, f"{initial_policy_path(cfg).name} ({cfg.model.pretrained or 'model.path'})", \
        float(temps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", help="a run config: its initial policy and learner settings (needs --lake)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the config")
    ap.add_argument("--lake", help="a run's lake folder: the recorded batch (with --config)")
    ap.add_argument("--groups", type=int, default=4, help="recorded groups in the batch (with --config)")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="TRL's rows per forward (0: the whole batch; 64 rows of a 49k vocabulary need over 24 GB)")
    args = ap.parse_args()
    if bool(args.config) != bool(args.lake):
        ap.error("--config and --lake go together (a real model trains on a recorded batch)")
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    base, tokenizer, lc0, groups, name, temperature = (run_setup if args.config else tiny_setup)(args)
    device = next(base.parameters()).device
    mode = resolved_autocast(lc0.autocast, device)
    n_params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    sizes = {len(g["reward"]) for g in groups}
    if len(sizes) != 1:
        raise SystemExit(f"groups of several sizes {sorted(sizes)}: TRL takes one num_generations")
    group_size = sizes.pop()
    n_rows = len(groups) * group_size
    micro = args.micro_batch or n_rows
    if n_rows % micro or micro % group_size and group_size % micro:
        raise SystemExit(f"--micro-batch {micro} must divide the batch's {n_rows} rows and divide, or be a multiple "
                         f"of, the group size {group_size}")
    tokens = int(sum(len(g["completion_token_ids"][i]) for g in groups for i in range(group_size)))
    print(f"model: {name}, {n_params / 1e6:.1f}M parameters; batch: {len(groups)} groups x {group_size} "
          f"= {n_rows} sequences, {tokens} completion tokens at T = {temperature:g}; autocast {mode}; "
          f"TRL {micro} rows per forward; {args.threads} threads", flush=True)

    rule = ErpoRule(enabled=False)
    coef = lc0.kl.coef or 0.05  # the run's coefficient, or the default where the run has no KL term
    kls = {"none": {"kind": "none"}, "k3": {"kind": "k3", "coef": coef}, "rapo": {"kind": "rapo", "coef": coef}}
    lc = {kind: LearnerConfig.model_validate(lc0.model_dump() | {"kl": kl}) for kind, kl in kls.items()}
    ours = {kind: TorchTrainer(copy.deepcopy(base).train(), lc[kind]) for kind in lc}
    ref = copy.deepcopy(base).eval().requires_grad_(False)

    trl_model = copy.deepcopy(base).train()
    with tempfile.TemporaryDirectory() as tmp:
        trl = make_trl(trl_model, tokenizer, tmp, micro, group_size, temperature, bf16=mode == "bf16")
        trl.current_gradient_accumulation_steps = 1  # each micro-batch's loss is already / the batch's tokens
        opt = lc0.optimizer
        trl_opt = torch.optim.AdamW(trl_model.parameters(), lr=opt.lr, betas=(0.9, 0.99),
                                    weight_decay=opt.weight_decay)
        slices = [trl_inputs(groups, tokenizer.pad_token_id, slice(i, i + micro), tokens)
                  for i in range(0, n_rows, micro)]

        def step_trl() -> None:
            trl_opt.zero_grad(set_to_none=True)
            for inputs in slices:
                with autocast(device, lc0.autocast):
                    loss = trl.compute_loss(trl_model, inputs)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(trl_model.parameters(), opt.grad_clip)
            trl_opt.step()

        def step_ours(kind: str, step: int) -> None:
            train_step(ours[kind], ref, groups, lc[kind], rule, tokenizer.pad_token_id,
                       np.random.default_rng(step))

        paths = {"ours": lambda s: step_ours("none", s), "trl": lambda s: step_trl(),
                 "ours+k3": lambda s: step_ours("k3", s), "ours+rapo": lambda s: step_ours("rapo", s)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        peaks: dict[str, list[float]] = {name: [] for name in paths}
        for rep in range(args.reps + 1):
            for path, fn in paths.items():
                t0 = time.perf_counter()
                peak = peak_rise_mb(lambda: fn(rep))
                if rep:  # the first round warms up every path (and allocates its optimiser state)
                    times[path].append(time.perf_counter() - t0)
                    if peak is not None:
                        peaks[path].append(peak)
            print(f"  round {rep}/{args.reps} done", flush=True)

    med = {path: statistics.median(ts) for path, ts in times.items()}
    peak = {path: max(ps) if ps else float("nan") for path, ps in peaks.items()}
    print(f"\n{'path':<14}{'median s/step':>14}{'min':>8}{'max':>8}{'tokens/s':>10}{'peak MB':>9}")
    for path, ts in times.items():
        print(f"{path:<14}{med[path]:>14.3f}{min(ts):>8.3f}{max(ts):>8.3f}{tokens / med[path]:>10.0f}"
              f"{peak[path]:>9.0f}")
    ours_tok, trl_tok = tokens / med["ours"], tokens / med["trl"]
    overhead = med["ours+rapo"] / med["ours+k3"] - 1
    print(f"RESULT ours_tok_s={ours_tok:.0f} trl_tok_s={trl_tok:.0f} ratio={ours_tok / trl_tok:.2f} "
          f"rapo_overhead={overhead:.3f} ours_peak_mb={peak['ours']:.0f} trl_peak_mb={peak['trl']:.0f}")


if __name__ == "__main__":
    main()
