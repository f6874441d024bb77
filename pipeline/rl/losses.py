"""The learner's loss as a pure function of tensors: :func:`rl_loss`, a chunk of tokens'
:class:`LossInputs` in, :class:`LossOutputs` (the loss and its metrics) out.

The learner's chunked output layer (`pipeline.rl.head`) calls it on every chunk of completion
tokens; the learner adds up the losses and the metrics without knowing their names (a metric is
one line here). Each token's weight in the loss (the aggregation: token-mean or sequence-mean over
the whole update) comes with the inputs, so the chunks' losses add up to the update's.

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
``L = sum_t weight_t (L_t + kl_coef K_t)``; log-probs of both policies are taken at the sample's
temperature:

- ``k3`` (the usual reverse-KL estimator, Schulman): with x = log pi_ref(y_t) - log pi_theta(y_t),
  K_t = exp(x) - x - 1 >= 0.
- ``rapo`` (RAPO, arXiv 2510.03865: forward KL to a reward-reweighted reference). Per position,
  pi_hat_ref(.|s) = softmax(phi(r_i) * log pi_ref(.|s)) over the full vocabulary, with
  phi(r) = clamp(r, eps, 1): a correct sample (r = 1) is held to pi_ref itself, a wrong one to a
  flattened pi_ref, which lets the policy leave the reference's support where it is not rewarded.
  The penalty is the exact forward KL at each position, K_t = sum_v pi_hat_ref(v) (log pi_hat_ref(v)
  - log pi_theta(v)) (:func:`rapo_exact_kl`); its gradient with respect to the logits is
  pi_theta - pi_hat_ref: bounded, and straight toward pi_hat_ref. The chunked head computes it,
  value and gradient, over the vocabulary; :func:`rl_loss` only reports it.
- ``rapo_sampled``: the same KL estimated from the sampled token only, with
  w_t = pi_hat_ref(y_t|s) / pi_theta(y_t|s). Its value is K_t = w_t log w_t - w_t + 1 >= 0, whose
  mean under y ~ pi_theta is the exact value above. Its gradient is *not* dK_t: the samples' own
  distribution depends on theta, and the score-function gradient of E_{y~pi_theta}[K(y)] is
  E[(1 - w_t) grad log pi_theta(y_t)] (grad K + K grad log pi, minus the baseline E[grad log pi] = 0),
  i.e. in expectation exactly pi_theta - pi_hat_ref on the logits, as the exact form's (the
  pathwise gradient dK_t = -w_t log w_t grad log pi_theta(y_t) is biased, and unbounded in w_t).
  w_t is truncated at ``max_weight`` c in both (:func:`rapo_kl`): the gradient is bounded by
  c - 1 per token, and the reported value is the truncated estimate (biased low where pi_theta
  has left pi_hat_ref's mass).

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
from dataclasses import dataclass, field

import torch

from pipeline.config import KLConfig, LossConfig, NoKL

LOG_W_CLAMP = 20.0
RAPO_MAX_WEIGHT = 5.0
"""Default truncation of RAPO's sampled importance weight (`learner.kl.max_weight`)."""


@dataclass(frozen=True)
class LossSettings:
    """What the loss needs besides the tokens: the configuration, and the step's shape that the
    metrics are normalised by."""

    loss: LossConfig
    """`learner.loss`: the clip range, the importance-weight cap and the MIS range (its
    ``aggregation`` is in the token weights, see :class:`LossInputs`)."""
    kl: KLConfig = field(default_factory=NoKL)
    """`learner.kl`: which KL term to the reference (`KL_TERMS`) and its coefficient."""
    updates: int = 1
    """Optimiser updates in the step: per-update metrics (``pg_loss``, ``kl``) are their mean."""
    ranks: int = 1
    """Ranks whose gradients the trainer averages (the token weights carry this factor)."""
    tokens: float = 1.0
    """Tokens in the loss over the whole step on this rank: per-token metrics are means over them."""


@dataclass
class LossInputs:
    """One chunk of completion tokens: every tensor has the same shape (``[n]`` for a chunk of the
    learner's head, ``[B, T]`` in a plain formulation). Tokens of weight 0 (padding, prompt,
    completions left out of the loss) count neither in the loss nor in the metrics."""

    logprobs: torch.Tensor
    """log pi_theta of the sampled tokens, with gradient."""
    proximal_logprobs: torch.Tensor
    """log pi_prox (no gradient)."""
    behavior_logprobs: torch.Tensor
    """log mu from the rollout engine."""
    advantages: torch.Tensor
    """Each token's advantage (its sample's)."""
    loss_weights: torch.Tensor
    """Each token's weight in the update's loss: the aggregation, fixed by the whole update (1 /
    tokens for token-mean, 1 / (sequences x the row's tokens) for sequence-mean), times the ranks."""
    settings: LossSettings
    ref_logprobs: torch.Tensor | None = None
    """log pi_ref of the sampled tokens (the ``k3`` term)."""
    ref_hat_logprobs: torch.Tensor | None = None
    """log pi_hat_ref of the sampled tokens (the ``rapo_sampled`` term)."""
    exact_kl: torch.Tensor | None = None
    """RAPO's exact forward KL at each token (the ``rapo`` term). Its value and its gradient over
    the vocabulary are added by the chunked head (`pipeline.rl.head`); the loss only reports it."""
    entropy: torch.Tensor | None = None
    """Entropy of pi_theta at each token (reported only)."""

    @classmethod
    def empty(cls, settings: LossSettings) -> LossInputs:
        """No tokens at all: the loss of it names every metric the step reports, each at 0."""
        z = torch.zeros(0)
        return cls(z, z, z, z, z, settings, ref_logprobs=z, ref_hat_logprobs=z, exact_kl=z, entropy=z)


@dataclass
class LossOutputs:
    loss: torch.Tensor
    """The chunk's share of the update's loss (a scalar, with gradient)."""
    metrics: dict[str, torch.Tensor]
    """The chunk's share of each metric (no gradient): the step's value is their sum over its chunks."""
    maxima: dict[str, torch.Tensor]
    """The chunk's maximum of each (no gradient, 0 without tokens): the step's value is their max."""


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


def _max(x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Largest of ``x`` (>= 0 where it matters) over the counted tokens; 0 if there are none."""
    return torch.where(counted, x, 0.0).amax() if x.numel() else x.new_zeros(())


def rl_loss(inp: LossInputs) -> LossOutputs:
    """Decoupled PPO with truncated importance sampling and optional MIS masking, plus the KL term
    of ``settings.kl`` (see the module docstring), weighted per token by ``loss_weights``; and
    its metrics. Masked tokens contribute 0 but keep their weight, so masking never scales the
    remaining tokens up."""
    s, cfg, w = inp.settings, inp.settings.loss, inp.loss_weights
    pg, st = ppo_per_token(inp.logprobs, inp.proximal_logprobs, inp.behavior_logprobs, inp.advantages,
                           cfg.eps_low, cfg.eps_high, cfg.tis_cap, cfg.mis_low, cfg.mis_high)
    loss = (pg * w).sum()
    counted = w > 0

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(counted, x, 0.0).sum() / s.tokens

    with torch.no_grad():
        metrics = {"pg_loss": loss.detach() / s.updates,
                   "clip_frac": mean(st["clipped"]),
                   "is_weight_mean": mean(st["w"]),
                   "is_truncated_frac": mean(st["truncated"]),
                   "is_masked_frac": mean(st["masked"]),
                   "ratio_mean": mean(st["ratio"]),
                   "approx_kl_behavior": mean(inp.behavior_logprobs - inp.logprobs)}
        maxima = {"is_weight_max": _max(st["w_raw"], counted)}
        if inp.entropy is not None:
            metrics["entropy"] = mean(inp.entropy)
    term = KL_TERMS[s.kl.kind]
    if term.reference:
        needs = "exact_kl" if term.exact else "ref_hat_logprobs" if term.reweighted else "ref_logprobs"
        if getattr(inp, needs) is None:
            raise ValueError(f"learner.kl.kind = {term.name!r} needs LossInputs.{needs}")
        if term.exact:
            per_token = inp.exact_kl
        else:
            per_token = term.sampled(inp.logprobs, inp.ref_logprobs, inp.ref_hat_logprobs, s.kl)
            loss = loss + s.kl.coef * (per_token * w).sum()
        with torch.no_grad():
            metrics["kl"] = (per_token.detach() * w).sum() / s.ranks / s.updates
            maxima["kl_max"] = _max(per_token.detach(), counted)
    return LossOutputs(loss, metrics, maxima)


# --------------------------------------------------------------------------------------------
# KL to the reference policy


def phi_clamp(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """RAPO's reward map phi(r) = clamp(r, eps, 1) (monotone into [eps, 1])."""
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"phi floor eps must lie in (0, 1], got {eps}")
    return rewards.clamp(min=eps, max=1.0)


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

