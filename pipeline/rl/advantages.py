"""Group-relative advantage estimators, registered by name and selected in the config.

All estimators are pure functions of a flat reward vector and a group index vector (samples of the
same prompt share a group index), vectorised over groups; they return one advantage per sample,
which the loss broadcasts over that sample's completion tokens. ERPO's RA term (`ra_advantages`)
then replaces the zero advantages of all-correct groups.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pipeline.erpo.rule import ErpoRule
from pipeline.verify.residual import residual

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} registered twice")
        ADVANTAGES[name] = fn
        return fn

    return deco


def get_advantage(name: str) -> AdvantageFn:
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise KeyError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGES)}") from None


def _group_stats(rewards: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group size, group mean and unbiased group std (std = 0 for singleton groups)."""
    n_groups = int(group.max()) + 1 if group.numel() else 0
    r = rewards.double()
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, torch.ones_like(r))
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, r)
    mean = total / count
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, (r - mean[group]) ** 2)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))
    return count[group], mean[group], var.sqrt()[group]


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps), std unbiased over the group.

    A group whose rewards are all equal gets A = 0 for every sample (no gradient).
    """
    _, mean, std = _group_stats(rewards, group)
    return ((rewards.double() - mean) / (std + eps)).to(rewards.dtype)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: A_i = r_i - mean_g (no division by the std, which biases toward easy/hard groups)."""
    _, mean, _ = _group_stats(rewards, group)
    return (rewards.double() - mean).to(rewards.dtype)


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i - mean of the other samples of the group = (n / (n - 1)) (r_i - mean_g).

    Singleton groups get A = 0.
    """
    count, mean, _ = _group_stats(rewards, group)
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(count))
    return (scale * (rewards.double() - mean)).to(rewards.dtype)


def ra_advantages(pass_rate_per_sample: np.ndarray, advantages: np.ndarray, rule: ErpoRule) -> np.ndarray:
    """ERPO's RA: samples of all-correct groups (`pipeline.verify.residual.residual`) get the
    advantage -ra_delta.

    Group-relative advantages of an all-correct group are 0, so this replaces a zero; other
    samples are unchanged. Returns a new array (dtype of ``advantages``); identity when the rule
    is disabled. Our reading of the paper (`pipeline.erpo.rule`).
    """
    p = np.asarray(pass_rate_per_sample)
    a = np.asarray(advantages)
    if p.shape != a.shape:
        raise ValueError(f"pass_rate_per_sample shape {p.shape} != advantages shape {a.shape}")
    out = a.copy()
    if rule.enabled:
        all_correct, _ = residual(p)
        out[all_correct] = -rule.ra_delta
    return out
