"""One learning step on a batch of scored groups: advantages, decoupled PPO, the KL terms.

`train_step` is what the learner service runs for every batch (and what `bench/learner.py` times):
advantages (GRPO / Dr.GRPO / RLOO, with ERPO's RA for all-correct groups), the packed batch of
completion tokens, the decoupled PPO loss with truncated importance weights against the behaviour
log-probs, and the KL term of ``learner.kl`` to the frozen reference (k3, or RAPO's forward KL,
exact or sampled), over ``mini_batches`` optimiser updates. The loss functions themselves are pure
functions of tensors in `pipeline.losses`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from pipeline.advantages import get_advantage
from pipeline.config import LearnerConfig
from pipeline.engine import (
    MIN_TEMPERATURE,
    PackedBatch,
    completion_logits,
    pack,
    per_completion_token,
    place_completion,
    scatter_completion,
    token_logprobs,
    token_logprobs_full,
)
from pipeline.erpo import ErpoRule, ra_advantages
from pipeline.losses import (
    PolicyLossInputs,
    decoupled_ppo_loss,
    k3_kl,
    kl_term,
    masked_mean,
    phi_clamp,
    rapo_exact_kl,
    rapo_kl,
    reference_token_logprobs,
    reweighted_reference,
)
from pipeline.trainer import Trainer, lr_at
from schemas import Columns, concat


def train_step(trainer: Trainer, ref_model: torch.nn.Module | None, groups: list[Columns], lc: LearnerConfig,
               rule: ErpoRule, pad_id: int, rng: np.random.Generator) -> dict[str, float]:
    """One training step on a batch of groups: advantages (with ERPO's RA for all-correct groups),
    decoupled PPO (+ the KL term of ``lc.kl`` to ``ref_model``), ``mini_batches`` updates.

    The groups are shuffled into mini-batches by ``rng``; with several ranks each rank trains on
    every ``world_size``-th group of each mini-batch (the gradients are averaged across ranks)."""
    cols = concat(groups)
    _, group_index = np.unique(cols["group_id"], return_inverse=True)
    rewards = torch.as_tensor(np.asarray(cols["shaped_reward"], dtype=np.float32))
    advantages = get_advantage(lc.advantage)(rewards, torch.as_tensor(group_index))
    advantages = torch.as_tensor(ra_advantages(np.asarray(cols["group_pass_rate"]), advantages.numpy(), rule))
    n = len(rewards)
    batch = pack([cols["prompt_token_ids"][i] for i in range(n)],
                 [cols["completion_token_ids"][i] for i in range(n)],
                 np.asarray(cols["temperature"], dtype=np.float32), pad_id)
    behavior = scatter_completion(cols["behavior_logprobs"].values, batch.completion_mask)
    with torch.no_grad():
        # One update per step: the proximal policy is the current one, taken from the same
        # forward pass as the gradient (below), so no extra pass is spent on it.
        proximal = token_logprobs(trainer.model, batch)[0] if lc.mini_batches > 1 else None
    phi = phi_clamp(rewards, lc.rapo_phi_floor) if lc.kl.startswith("rapo") else None
    slices = np.array_split(rng.permutation(int(group_index.max()) + 1), lc.mini_batches)
    sums: dict[str, float] = defaultdict(float)
    for groups_in_slice in slices:
        mine = groups_in_slice[trainer.rank :: trainer.world_size]
        rows = torch.as_tensor(np.flatnonzero(np.isin(group_index, mine)))
        sub = batch.select(rows)
        logprobs, entropy, logp_full = token_logprobs_full(trainer.model, sub)
        prox = proximal[rows] if proximal is not None else logprobs.detach()
        loss, metrics = decoupled_ppo_loss(
            PolicyLossInputs(logprobs, prox, behavior[rows], advantages[rows], sub.completion_mask),
            eps_low=lc.eps_low, eps_high=lc.eps_high, tis_cap=lc.tis_cap, aggregation=lc.aggregation,
            mis_low=lc.mis_low, mis_high=lc.mis_high)
        metrics["pg_loss"] = float(loss.detach())
        if lc.kl != "none":
            per_token = kl_per_token(lc.kl, ref_model, sub, logprobs, logp_full,
                                     phi[rows] if phi is not None else None)
            kl_loss, kl_metrics = kl_term(per_token, sub.completion_mask, lc.aggregation)
            loss = loss + lc.kl_coef * kl_loss
            metrics.update(kl_metrics)
        grad_norm = trainer.step(loss)
        for k, v in metrics.items():
            sums[k] += v / lc.mini_batches
        sums["loss"] += float(loss.detach()) / lc.mini_batches
        sums["entropy"] += float(masked_mean(entropy.detach(), sub.completion_mask)) / lc.mini_batches
        sums["grad_norm"] += grad_norm / lc.mini_batches
    rates = np.asarray(cols["group_pass_rate"])
    sums["reward"] = float(rewards.mean())
    sums["all_correct_frac"] = float(np.mean(rates >= 1.0))
    sums["all_wrong_frac"] = float(np.mean(rates <= 0.0))
    sums["completion_len"] = float(batch.completion_mask.sum() / n)
    sums["tokens"] = float(batch.completion_mask.sum())
    sums["lr"] = lr_at(trainer.updates - 1, lc.lr, lc.warmup_steps)
    return dict(sums)


def kl_per_token(kind: str, ref_model: torch.nn.Module, batch: PackedBatch, logprobs: torch.Tensor,
                 logp_full: torch.Tensor, phi: torch.Tensor | None) -> torch.Tensor:
    """The KL term ``kind`` per completion token, ``[B, T-1]`` (zeros elsewhere): the frozen
    reference runs on this mini-batch only, so at most one mini-batch of reference logits exists."""
    mask = batch.completion_mask
    idx = mask.bool()
    with torch.no_grad():
        ref_logits = completion_logits(ref_model, batch)
        temps = per_completion_token(batch.temperatures.clamp(min=MIN_TEMPERATURE), mask)
        phi_tokens = per_completion_token(phi, mask) if phi is not None else None
        if kind == "rapo":
            ref_hat = reweighted_reference(ref_logits, temps, phi_tokens)
        else:
            ref_lp, ref_hat_y = reference_token_logprobs(ref_logits, batch.input_ids[:, 1:][idx], temps,
                                                         phi_tokens if kind == "rapo_sampled" else None)
        del ref_logits
    if kind == "rapo":
        values = rapo_exact_kl(logp_full, ref_hat)
    elif kind == "rapo_sampled":
        values = rapo_kl(logprobs[idx], ref_hat_y)
    elif kind == "k3":
        values = k3_kl(logprobs[idx], ref_lp)
    else:
        raise ValueError(f"unknown KL term {kind!r}")
    return place_completion(values, mask)
