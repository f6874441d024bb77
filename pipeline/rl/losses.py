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
  The penalty is the exact forward KL at each position, K_t = sum_v pi_hat_ref(v) (log pi_hat_ref(v)
  - log pi_theta(v)) (:func:`rapo_exact_kl`); its gradient with respect to the logits is
  pi_theta - pi_hat_ref: bounded, and straight toward pi_hat_ref.
- ``rapo_sampled``: the same KL estimated from the sampled token only, with
  w_t = pi_hat_ref(y_t|s) / pi_theta(y_t|s). Its value is K_t = w_t log w_t - w_t + 1 >= 0, whose
  mean under y ~ pi_theta is the exact value above. Its gradient is *not* dK_t: the samples' own
  distribution depends on theta, and the score-function gradient of E_{y~pi_theta}[K(y)] is
  E[(1 - w_t) grad log pi_theta(y_t)] (grad K + K grad log pi, minus the baseline E[grad log pi] = 0),
  i.e. in expectation exactly pi_theta - pi_hat_ref on the logits, as the exact form's. (Until
  2026-12 this used dK_t = -w_t log w_t grad log pi_theta(y_t): biased, and a rare token with
  w ~ e^6 gave K ~ 400 and a gradient that swamped the policy term.) w_t is truncated at
  ``max_weight`` c in both (:func:`rapo_kl`): the gradient is bounded by c - 1 per token, and the
  reported value is the truncated estimate (biased low where pi_theta has left pi_hat_ref's mass).

**Our formulation**: the paper's exact phi, coefficient and normalisation are not public in what we
could read; it tilts whole sequences, this normalises per position. phi's floor and the
coefficient are configuration. The exact form costs one more elementwise pass over the
``[tokens, V]`` log-probabilities the policy term computes anyway (see ``bench/learner.py``).

Neither KL term is importance-weighted for staleness (the samples come from mu, not pi_theta; as in
verl and OpenRLHF, the KL estimate uses them as they are).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

LOG_W_CLAMP = 20.0
RAPO_MAX_WEIGHT = 5.0
"""Default truncation of RAPO's sampled importance weight (`learner.kl.max_weight`)."""


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


def ppo_per_token(logprobs: torch.Tensor, proximal_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor,
                  advantages: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2, tis_cap: float = 2.0,
                  mis_low: float | None = None, mis_high: float | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The decoupled PPO loss of each token (see the module docstring), any shape (advantages
    already per token), and per-token statistics (no grad): ``clipped``, ``w`` (truncated weight),
    ``w_raw``, ``truncated``, ``masked``, ``ratio``."""
    adv = advantages.to(logprobs.dtype)
    log_w = (proximal_logprobs - behavior_logprobs).detach()
    w_raw = torch.exp(log_w)
    w = torch.clamp(w_raw, max=tis_cap)
    keep = torch.ones_like(w_raw)
    if mis_low is not None:
        keep = keep * (w_raw >= mis_low).to(keep.dtype)
    if mis_high is not None:
        keep = keep * (w_raw <= mis_high).to(keep.dtype)
    ratio = torch.exp(logprobs - proximal_logprobs.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -w * keep * torch.minimum(unclipped, clipped)
    with torch.no_grad():
        stats = {"clipped": (clipped < unclipped).float(), "w": w, "w_raw": w_raw,
                 "truncated": (w_raw > tis_cap).float(), "masked": 1.0 - keep, "ratio": ratio.detach()}
    return per_token, stats


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
    per_token, st = ppo_per_token(inp.logprobs, inp.proximal_logprobs, inp.behavior_logprobs,
                                  inp.advantages.unsqueeze(-1), eps_low, eps_high, tis_cap, mis_low, mis_high)
    loss = aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        metrics = {
            "clip_frac": float((st["clipped"] * mask).sum() / n),
            "is_weight_mean": float((st["w"] * mask).sum() / n),
            "is_weight_max": float((st["w_raw"] * mask).max()) if mask.any() else 0.0,
            "is_truncated_frac": float((st["truncated"] * mask).sum() / n),
            "is_masked_frac": float((st["masked"] * mask).sum() / n),
            "ratio_mean": float((st["ratio"] * mask).sum() / n),
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


def _per_token(x: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else torch.broadcast_to(x.to(torch.float32), targets.shape).reshape(-1, 1)


def reference_token_logprobs(
    ref_logits: torch.Tensor,
    targets: torch.Tensor,
    temperatures: torch.Tensor,
    phi: torch.Tensor | None = None,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_ref(y) and, given ``phi``, log pi_hat_ref(y) of RAPO's reweighted reference, at the
    target tokens only.

    ``ref_logits`` ``[..., V]`` (no grad), ``targets`` ``[...]`` token ids; ``temperatures`` and
    ``phi`` broadcast to ``targets`` (per token, or e.g. ``[B, 1]`` per sequence). Works on
    ``chunk`` positions at a time, so besides the logits at most a ``[chunk, V]`` temporary
    exists: log pi_ref = z/tau - logsumexp(z/tau); log pi_hat_ref(y) = phi * log pi_ref(y) -
    logsumexp_v(phi * log pi_ref(v)).
    """
    if ref_logits.shape[:-1] != targets.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} must be targets' shape {tuple(targets.shape)} + [V]")
    flat = ref_logits.reshape(-1, ref_logits.shape[-1])
    y = targets.reshape(-1, 1)
    tau, weight = _per_token(temperatures, targets), _per_token(phi, targets)
    lp_out = torch.empty(y.shape[0], dtype=torch.float32, device=ref_logits.device)
    hat_out = torch.empty_like(lp_out) if weight is not None else None
    with torch.no_grad():
        for start in range(0, y.shape[0], chunk):
            sl = slice(start, start + chunk)
            logp = torch.log_softmax(flat[sl].float() / tau[sl], dim=-1)
            lp_out[sl] = logp.gather(-1, y[sl]).squeeze(-1)
            if weight is not None:
                tilted = logp.mul_(weight[sl])
                hat_out[sl] = tilted.gather(-1, y[sl]).squeeze(-1) - torch.logsumexp(tilted, dim=-1)
    shape = targets.shape
    return lp_out.reshape(shape), hat_out.reshape(shape) if hat_out is not None else None


def reweighted_reference(ref_logits: torch.Tensor, temperatures: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """log pi_hat_ref over the full vocabulary, ``[N, V]``: log_softmax(phi * log_softmax(z / tau)),
    with ``temperatures`` and ``phi`` per position (``[N]``). No grad; computed in place in one
    ``[N, V]`` buffer (the caller's logits are not modified)."""
    with torch.no_grad():
        logp = torch.log_softmax(ref_logits.float() / temperatures.view(-1, 1), dim=-1)
        return torch.log_softmax(logp.mul_(phi.to(torch.float32).view(-1, 1)), dim=-1)


def rapo_exact_kl(logp: torch.Tensor, ref_hat_logp: torch.Tensor) -> torch.Tensor:
    """Per-position forward KL(pi_hat_ref || pi_theta) = sum_v pi_hat (log pi_hat - log pi_theta);
    ``logp`` ``[N, V]`` (with grad) and ``ref_hat_logp`` ``[N, V]`` log-probabilities."""
    hat = ref_hat_logp.detach()
    return (hat.exp() * (hat - logp)).sum(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token reverse-KL estimator k3: exp(x) - x - 1 with x = log pi_ref - log pi_theta."""
    x = ref_logprobs.detach() - logprobs
    return torch.exp(x) - x - 1.0


def rapo_kl(logprobs: torch.Tensor, ref_hat_logprobs: torch.Tensor,
            max_weight: float = RAPO_MAX_WEIGHT) -> torch.Tensor:
    """Per-token RAPO penalty from the sampled token: value w log w - w + 1, gradient
    (1 - w) d log pi_theta(y_t), with w = min(pi_hat_ref(y_t) / pi_theta(y_t), max_weight)."""
    if not max_weight > 1.0:
        raise ValueError(f"max_weight must be above 1, got {max_weight}")
    log_w = (ref_hat_logprobs.detach() - logprobs.detach()).clamp(-LOG_W_CLAMP, math.log(max_weight))
    w = torch.exp(log_w)
    return (w * log_w - w + 1.0) + (1.0 - w) * (logprobs - logprobs.detach())


@dataclass(frozen=True)
class KLTerm:
    """One kind of KL term to the frozen reference (`learner.kl.kind`): what the learning step must
    compute for it."""

    name: str
    reference: bool
    """Needs the frozen reference model's hidden states at the completion positions."""
    reweighted: bool
    """Needs RAPO's reward-reweighted reference (``phi(r)`` per sample)."""
    exact: bool
    """Computed over the whole vocabulary inside the chunked output layer (`pipeline.rl.head`)."""
    sampled: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None, object], torch.Tensor] | None = None
    """Per-token estimator from (log pi_theta, log pi_ref, log pi_hat_ref) of the sampled tokens and
    the `learner.kl` section."""


KL_TERMS: dict[str, KLTerm] = {
    "none": KLTerm("none", reference=False, reweighted=False, exact=False),
    "k3": KLTerm("k3", reference=True, reweighted=False, exact=False,
                 sampled=lambda lp, ref_lp, ref_hat_lp, cfg: k3_kl(lp, ref_lp)),
    "rapo": KLTerm("rapo", reference=True, reweighted=True, exact=True),
    "rapo_sampled": KLTerm("rapo_sampled", reference=True, reweighted=True, exact=False,
                           sampled=lambda lp, ref_lp, ref_hat_lp, cfg: rapo_kl(lp, ref_hat_lp, cfg.max_weight)),
}
"""The KL terms by `learner.kl.kind` name: reverse KL (k3), RAPO's forward KL exact or sampled, or none."""


def kl_term(per_token: torch.Tensor, mask: torch.Tensor,
            aggregation: Literal["token_mean", "seq_mean"] = "token_mean") -> tuple[torch.Tensor, dict[str, float]]:
    """Aggregate a per-token KL ``[B, T]`` like the policy term; with its metrics."""
    mask = mask.float()
    value = aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        metrics = {"kl": float(value.detach()), "kl_max": float((per_token * mask).max()) if mask.any() else 0.0}
    return value, metrics
