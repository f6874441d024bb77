"""Policy-gradient losses as pure functions of tensors: a typed input in, ``(loss, metrics)`` out.

The three policies are named everywhere:

- ``behavior_logprobs`` = log mu: the policy that sampled the tokens (from the rollout engine, at the
  sample's temperature). It may be several versions behind the learner.
- ``proximal_logprobs`` = log pi_prox: the learner's parameters at the start of this batch's
  updates (no gradient). With one update per batch it equals ``logprobs`` numerically.
- ``logprobs`` = log pi_theta: the current parameters, with gradient.

Staleness of a sample = learner policy version - behaviour policy version. The decoupled loss
(Hilton et al. 2022, as in AReaL) corrects for it with a truncated importance weight
w_t = min(exp(log pi_prox - log mu), C) (no gradient) and keeps PPO's trust region around pi_prox:

    rho_t = exp(log pi_theta - log pi_prox)
    L_t   = -w_t * min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)

Setting ``proximal_logprobs = behavior_logprobs`` gives the classic PPO/GRPO clipped loss against
the behaviour policy (w = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class PolicyLossInputs:
    logprobs: torch.Tensor  # [B, T] log pi_theta of the sampled tokens (with grad)
    proximal_logprobs: torch.Tensor  # [B, T] log pi_prox (no grad)
    behavior_logprobs: torch.Tensor  # [B, T] log mu from the rollout engine
    advantages: torch.Tensor  # [B] one per sample
    mask: torch.Tensor  # [B, T] 1.0 on completion tokens, 0.0 on padding and prompt


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor,
              mode: Literal["token_mean", "seq_mean"]) -> torch.Tensor:
    """Token-mean: every token of the batch weighs the same. Seq-mean: mean over each sequence's
    tokens, then over sequences (short answers weigh as much as long ones)."""
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    if mode == "seq_mean":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        has_tokens = (mask.sum(-1) > 0).float()
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
    raise ValueError(f"unknown aggregation {mode!r}")


def decoupled_ppo_loss(
    inp: PolicyLossInputs,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    tis_cap: float = 2.0,
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO with truncated importance sampling (see the module docstring)."""
    mask = inp.mask.float()
    adv = inp.advantages.unsqueeze(-1).to(inp.logprobs.dtype)
    log_w = (inp.proximal_logprobs - inp.behavior_logprobs).detach()
    w_raw = torch.exp(log_w)
    w = torch.clamp(w_raw, max=tis_cap)
    ratio = torch.exp(inp.logprobs - inp.proximal_logprobs.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -w * torch.minimum(unclipped, clipped)
    loss = aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        is_clipped = (clipped < unclipped).float()
        n = mask.sum().clamp(min=1.0)
        metrics = {
            "clip_frac": float((is_clipped * mask).sum() / n),
            "is_weight_mean": float((w * mask).sum() / n),
            "is_weight_max": float((w_raw * mask).max()) if mask.any() else 0.0,
            "is_truncated_frac": float(((w_raw > tis_cap).float() * mask).sum() / n),
            "ratio_mean": float((ratio * mask).sum() / n),
            "approx_kl_behavior": float(((inp.behavior_logprobs - inp.logprobs) * mask).sum() / n),
        }
    return loss, metrics
