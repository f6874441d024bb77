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
the behaviour policy (w = 1). Optionally (MIS), tokens whose untruncated weight lies outside
``[mis_low, mis_high]`` are masked out of the policy term: too off-policy to correct.

KL terms to the reference policy pi_ref (a frozen copy of the initial policy), per token, added as
``L = L_pg + kl_coef * aggregate(K_t)``; log-probs of both policies are taken at the sample's
temperature:

- ``k3`` (the usual reverse-KL estimator, Schulman): with x = log pi_ref(y_t) - log pi_theta(y_t),
  K_t = exp(x) - x - 1 >= 0.
- ``rapo`` (RAPO, arXiv 2510.03865: forward KL to a reward-reweighted reference). Per position,
  pi_hat_ref(.|s) = softmax(phi(r_i) * log pi_ref(.|s)) over the full vocabulary, with
  phi(r) = clamp(r, eps, 1): a correct sample (r = 1) is held to pi_ref itself, a wrong one to a
  flattened pi_ref, which lets the policy leave the reference's support where it is not rewarded.
  With w_t = pi_hat_ref(y_t|s) / pi_theta(y_t|s), K_t = w_t log w_t - w_t + 1 >= 0; its mean under
  y ~ pi_theta is exactly KL(pi_hat_ref || pi_theta). **Our formulation**: the paper's exact phi,
  coefficient and normalisation are not public in what we could read; it tilts whole sequences,
  this normalises per position. phi's floor and the coefficient are configuration.
  dK/dlog pi_theta(y_t) = -w_t log w_t: a token that pi_hat_ref likes more than pi_theta (w > 1)
  is pushed up, one it likes less is pushed down, so gradient descent moves pi_theta toward
  pi_hat_ref. log w is clamped to [-LOG_W_CLAMP, LOG_W_CLAMP] so one vanishing probability cannot
  blow the step up.

Neither KL term is importance-weighted for staleness (the samples come from mu, not pi_theta; as in
verl and OpenRLHF, the KL estimate uses them as they are).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

LOG_W_CLAMP = 20.0


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
    mis_low: float | None = None,
    mis_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO with truncated importance sampling and optional MIS masking (see the module
    docstring). Masked tokens contribute 0 but still count in the aggregation's denominator, so
    masking never scales the remaining tokens up."""
    mask = inp.mask.float()
    adv = inp.advantages.unsqueeze(-1).to(inp.logprobs.dtype)
    log_w = (inp.proximal_logprobs - inp.behavior_logprobs).detach()
    w_raw = torch.exp(log_w)
    w = torch.clamp(w_raw, max=tis_cap)
    keep = torch.ones_like(w_raw)
    if mis_low is not None:
        keep = keep * (w_raw >= mis_low).to(keep.dtype)
    if mis_high is not None:
        keep = keep * (w_raw <= mis_high).to(keep.dtype)
    ratio = torch.exp(inp.logprobs - inp.proximal_logprobs.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -w * keep * torch.minimum(unclipped, clipped)
    loss = aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        is_clipped = (clipped < unclipped).float()
        n = mask.sum().clamp(min=1.0)
        metrics = {
            "clip_frac": float((is_clipped * mask).sum() / n),
            "is_weight_mean": float((w * mask).sum() / n),
            "is_weight_max": float((w_raw * mask).max()) if mask.any() else 0.0,
            "is_truncated_frac": float(((w_raw > tis_cap).float() * mask).sum() / n),
            "is_masked_frac": float(((1.0 - keep) * mask).sum() / n),
            "ratio_mean": float((ratio * mask).sum() / n),
            "approx_kl_behavior": float(((inp.behavior_logprobs - inp.logprobs) * mask).sum() / n),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# KL to the reference policy


def phi_clamp(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """RAPO's reward map phi(r) = clamp(r, eps, 1) (monotone into [eps, 1])."""
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"phi floor eps must lie in (0, 1], got {eps}")
    return rewards.clamp(min=eps, max=1.0)


def reference_token_logprobs(
    ref_logits: torch.Tensor,
    targets: torch.Tensor,
    temperatures: torch.Tensor,
    phi: torch.Tensor | None = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_ref(y_t) and, given ``phi`` ([B]), log pi_hat_ref(y_t) of RAPO's reweighted reference.

    ``ref_logits`` [B, T, V] (no grad), ``targets`` [B, T] token ids, ``temperatures`` [B]. Works
    ``chunk`` positions at a time, so besides the logits themselves at most a [B, chunk, V]
    temporary exists: log pi_ref = z/tau - logsumexp(z/tau); log pi_hat_ref(y) =
    phi * log pi_ref(y) - logsumexp_v(phi * log pi_ref(v)).
    """
    if ref_logits.dim() != 3 or targets.shape != ref_logits.shape[:2]:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} must be [B, T, V] with targets [B, T], "
                         f"got targets {tuple(targets.shape)}")
    tau = temperatures.to(torch.float32).view(-1, 1, 1)
    lp_out = torch.empty(targets.shape, dtype=torch.float32, device=ref_logits.device)
    hat_out = torch.empty_like(lp_out) if phi is not None else None
    with torch.no_grad():
        for start in range(0, targets.shape[1], chunk):
            sl = slice(start, start + chunk)
            logp = torch.log_softmax(ref_logits[:, sl].float() / tau, dim=-1)
            y = targets[:, sl].unsqueeze(-1)
            lp_out[:, sl] = logp.gather(-1, y).squeeze(-1)
            if phi is not None:
                tilted = logp.mul_(phi.to(torch.float32).view(-1, 1, 1))
                hat_out[:, sl] = tilted.gather(-1, y).squeeze(-1) - torch.logsumexp(tilted, dim=-1)
    return lp_out, hat_out


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token reverse-KL estimator k3: exp(x) - x - 1 with x = log pi_ref - log pi_theta."""
    x = ref_logprobs.detach() - logprobs
    return torch.exp(x) - x - 1.0


def rapo_kl(logprobs: torch.Tensor, ref_hat_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token RAPO penalty w log w - w + 1, w = pi_hat_ref(y_t) / pi_theta(y_t)."""
    log_w = (ref_hat_logprobs.detach() - logprobs).clamp(-LOG_W_CLAMP, LOG_W_CLAMP)
    w = torch.exp(log_w)
    return w * log_w - w + 1.0


KL_TERMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k3": k3_kl, "rapo": rapo_kl}


def kl_penalty(
    kind: Literal["k3", "rapo"],
    logprobs: torch.Tensor,
    target_logprobs: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Aggregated KL term: ``k3`` against log pi_ref, ``rapo`` against log pi_hat_ref."""
    try:
        per_token = KL_TERMS[kind](logprobs, target_logprobs)
    except KeyError:
        raise ValueError(f"unknown KL term {kind!r}; known: {sorted(KL_TERMS)}") from None
    mask = mask.float()
    value = aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        metrics = {"kl": float(value), "kl_max": float((per_token * mask).max()) if mask.any() else 0.0,
                   "log_ratio_ref_mean": float(((target_logprobs - logprobs) * mask).sum() / n)}
    return value, metrics
