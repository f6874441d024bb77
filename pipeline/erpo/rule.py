"""ERPO's temperature rule: its parameters (`ErpoRule`) and its one implementation (`apply_rule`).

ERPO (Explore Residual Prompts in Policy Optimization, arXiv 2511.04800): a prompt whose whole
group was answered correctly is *residual* -- every sample has the same reward, the group-relative
advantage is zero and the group gives no gradient. ERPO keeps a history per prompt and raises the
sampling temperature of residual prompts, so their next groups contain diverse (and some wrong)
answers and yield a learning signal again ("reactivation"). Which groups are residual is decided by
`pipeline.verify.residual.residual`.

How we depart from the paper: the paper publishes no Δτ, τ_max, decay or reset rule; the defaults
of :class:`ErpoRule` (τ₀ = 1.0, Δτ = 0.1, τ_max = 1.5, history = 4, δ = 0.1, no decay) are ours.
The residual-advantage (RA) term is our reading: an all-equal shift of the rewards of an
all-correct group vanishes under group normalisation, so RA acts on the advantage and gives every
sample of an all-correct group the pseudo-negative advantage −δ
(`pipeline.rl.advantages.ra_advantages`).

The per-prompt table the rule runs on is `pipeline.erpo.store` (which calls :func:`apply_rule`);
its snapshots are `pipeline.erpo.snapshots`.

Rule, applied to each scored group of a prompt with pass rate ``s`` (in row order):

* ``s == 1`` (residual, all correct): τ ← min(τ + Δτ, cap), ``all_correct_streak`` += 1,
  ``times_residual`` += 1.
* ``0 < s < 1`` (informative): τ stays, or moves toward τ₀ by the fraction ``decay`` of the
  distance; if the previous group was all-correct the prompt is *reactivated*
  (``times_reactivated`` += 1).
* ``s == 0`` (residual, all wrong): τ unchanged, ``all_wrong_streak`` += 1 (the learner may drop
  the group: ``learner.dynamic_sampling``, `pipeline.flow.intake`).

where ``cap = min(tau_max, engine_max)``; every new temperature is clamped to ``[tau_min, cap]``.
Temperatures are stored as Float32: each step computes in float64 from the stored float32 value and
rounds the result to float32.

Temperature-update reasons (column ``reason`` of the updates; every update carries one). The
reason of a prompt's update is that of the last of its groups in the batch that had one:

* ``all_correct_raise`` -- an all-correct group raised τ by the full Δτ;
* ``capped`` -- an all-correct group whose raise did not fit under the cap (τ + Δτ > cap): τ is
  set to the cap, which may leave it unchanged. Emitted even when τ did not change, so consumers
  see that the prompt is saturated (the message is idempotent);
* ``reactivated`` -- an informative group right after an all-correct one changed τ (with decay);
* ``decay`` -- an informative group moved τ toward τ₀;
* ``clamped`` -- τ changed only because it lay outside ``[tau_min, cap]`` (a snapshot written
  under another rule).

An update row is emitted per prompt whose temperature at the end of the batch differs from its
temperature before the batch (new prompts start at τ₀), or that had a ``capped`` group in the
batch. Its fields are the prompt's state after all its groups in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.verify.residual import residual

# An all-correct raise "does not fit" under the cap when τ + Δτ exceeds the cap by more than this;
# float32 temperatures near 2 have a resolution of about 2.4e-7, so this absorbs rounding of τ.
CAP_EPS = 1e-6

REASONS = ("all_correct_raise", "capped", "reactivated", "decay", "clamped")

_NONE = 0
_CODE = {name: i + 1 for i, name in enumerate(REASONS)}
REASON_OF_CODE = np.array([None, *REASONS], dtype=object)
"""Reason name of each code of :attr:`BatchEffect.code` (0: none)."""
STATE_DTYPES: dict[str, type] = {
    "times_seen": np.int32,
    "all_correct_streak": np.int32,
    "all_wrong_streak": np.int32,
    "temperature": np.float32,
    "last_version": np.int64,
    "last_update": np.float64,
    "times_residual": np.int32,
    "times_reactivated": np.int32,
    "was_residual": np.bool_,
}
"""Numeric state columns of a prompt (all but its id and pass-rate window), with numpy dtypes."""


@dataclass(frozen=True)
class ErpoRule:
    """Parameters of the ERPO temperature rule (defaults are ours; the paper publishes none)."""

    #: Initial temperature of every prompt, and the target of `decay`.
    tau0: float = 1.0
    #: Raise of τ after an all-correct group.
    delta_tau: float = 0.1
    #: Highest temperature the rule may set.
    tau_max: float = 1.5
    #: Lowest temperature the rule may set.
    tau_min: float = 0.0
    #: Highest temperature the engine accepts (vLLM accepts [0, 2]); the cap is min(tau_max, this).
    engine_max: float = 2.0
    #: Number of most recent group pass rates kept per prompt.
    history: int = 4
    #: Fraction of the distance to tau0 removed after an informative group (0 = τ stays).
    decay: float = 0.0
    #: RA: advantage given to every sample of an all-correct group is -ra_delta.
    ra_delta: float = 0.1
    #: False = plain GRPO: temperatures stay tau0, no updates are emitted, RA is off (the history
    #: and counters are still kept, so reactivation can be compared against ERPO).
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("tau0", "delta_tau", "tau_max", "tau_min", "engine_max", "decay", "ra_delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ErpoRule.{name} must be a finite number, got {value!r}")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"ErpoRule.enabled must be a bool, got {self.enabled!r}")
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            raise ValueError(f"ErpoRule.history must be an int >= 1, got {self.history!r}")
        if self.tau_min < 0:
            raise ValueError(f"ErpoRule.tau_min must be >= 0, got {self.tau_min}")
        if self.engine_max <= 0:
            raise ValueError(f"ErpoRule.engine_max must be > 0, got {self.engine_max}")
        if self.tau_max < self.tau_min:
            raise ValueError(f"ErpoRule.tau_max ({self.tau_max}) must be >= tau_min ({self.tau_min})")
        if not self.tau_min <= self.tau0 <= self.cap:
            raise ValueError(
                f"ErpoRule.tau0 ({self.tau0}) must lie in [tau_min, min(tau_max, engine_max)] = "
                f"[{self.tau_min}, {self.cap}]"
            )
        if self.delta_tau < 0:
            raise ValueError(f"ErpoRule.delta_tau must be >= 0, got {self.delta_tau}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"ErpoRule.decay must lie in [0, 1], got {self.decay}")
        if self.ra_delta < 0:
            raise ValueError(f"ErpoRule.ra_delta must be >= 0, got {self.ra_delta}")

    @property
    def cap(self) -> float:
        """Highest temperature actually set: min(tau_max, engine_max)."""
        return min(float(self.tau_max), float(self.engine_max))


def fresh_values(rule: ErpoRule) -> dict[str, Any]:
    """Column values of a prompt before its first group (τ₀, zero counters)."""
    return {name: (np.float32(rule.tau0) if name == "temperature" else 0) for name in STATE_DTYPES}


@dataclass
class BatchEffect:
    """Per distinct prompt of a batch (first-appearance order): its row, τ at the start of the
    batch, the last reason code of its groups (0 = none), that group's version, whether capped."""

    rows: np.ndarray
    tau_start: np.ndarray
    code: np.ndarray
    decided_at_version: np.ndarray
    capped: np.ndarray


def _batch_layout(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One stable sort of the groups' rows gives ``(distinct_rows, slot, occurrence)``: the
    distinct rows in order of first appearance, each group's index into them, and how many
    earlier groups of the batch share its row (0, 1, ...)."""
    order = np.argsort(rows, kind="stable")
    sr = rows[order]
    idx = np.arange(sr.size)
    starts = np.r_[True, sr[1:] != sr[:-1]] if sr.size else np.zeros(0, bool)
    run_start = np.maximum.accumulate(np.where(starts, idx, 0))
    occ = np.empty_like(idx)
    occ[order] = idx - run_start
    first = order[starts]  # first group of each distinct row (stable sort: earliest index)
    by_first = np.argsort(first)
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(by_first.size)
    slot = np.empty_like(idx)
    slot[order] = rank[np.cumsum(starts) - 1]
    return rows[first[by_first]], slot, occ


def apply_rule(
    cols: dict[str, np.ndarray], rates: np.ndarray, rows: np.ndarray, s: np.ndarray, v: np.ndarray,
    rule: ErpoRule, now: float,
) -> BatchEffect:
    """Apply scored groups to the state columns **in place**; the rule's only implementation.

    ``cols`` holds the :data:`STATE_DTYPES` arrays, ``rates`` the history window (float32
    ``[rows, history]``, right-aligned, NaN = empty); group ``i`` (batch order) has pass rate
    ``s[i]`` (float32), policy version ``v[i]`` and belongs to row ``rows[i]``.

    Vectorised over groups: round ``r`` holds every prompt's ``r``-th group of the batch, so a
    round touches each row at most once and is a handful of whole-array numpy operations (gather,
    compute, scatter). Rounds are few (a prompt rarely has more than two groups in one batch);
    the Python loop runs over rounds, never over groups.
    """
    drows, slot, occ = _batch_layout(rows)
    m = drows.size
    effect = BatchEffect(
        rows=drows,
        tau_start=cols["temperature"][drows].copy(),
        code=np.zeros(m, np.int8),
        decided_at_version=np.zeros(m, np.int64),
        capped=np.zeros(m, bool),
    )
    cap = rule.cap
    for r in range(int(occ.max()) + 1 if occ.size else 0):
        sel = np.flatnonzero(occ == r)
        rr, sl = rows[sel], slot[sel]
        s32, vr = s[sel], v[sel]
        s1, s0 = residual(s32)
        mid = ~s1 & ~s0
        tau32 = cols["temperature"][rr]
        tau = tau32.astype(np.float64)
        was = cols["was_residual"][rr]
        raw = tau + rule.delta_tau
        core = np.where(s1, raw, tau)
        if rule.decay > 0:
            core = np.where(mid, rule.tau0 + (tau - rule.tau0) * (1.0 - rule.decay), core)
        if rule.enabled:
            new = np.clip(core, rule.tau_min, cap).astype(np.float32)
            changed = new != tau32
            code = np.select(
                [s1 & (raw > cap + CAP_EPS), s1 & changed, s1 | ~changed, mid & was, mid & (core.astype(np.float32) != tau32)],
                [_CODE["capped"], _CODE["all_correct_raise"], _NONE, _CODE["reactivated"], _CODE["decay"]],
                _CODE["clamped"],
            ).astype(np.int8)
            decided = code != _NONE
            effect.code[sl] = np.where(decided, code, effect.code[sl])
            effect.decided_at_version[sl] = np.where(decided, vr, effect.decided_at_version[sl])
            effect.capped[sl] |= code == _CODE["capped"]
        else:
            new = np.full(rr.size, rule.tau0, np.float32)
        cols["times_seen"][rr] += 1
        cols["all_correct_streak"][rr] = np.where(s1, cols["all_correct_streak"][rr] + 1, 0)
        cols["all_wrong_streak"][rr] = np.where(s0, cols["all_wrong_streak"][rr] + 1, 0)
        cols["temperature"][rr] = new
        cols["last_version"][rr] = vr
        cols["last_update"][rr] = now
        cols["times_residual"][rr] += s1
        cols["times_reactivated"][rr] += mid & was
        cols["was_residual"][rr] = s1
        window = rates[rr]
        rates[rr] = np.concatenate([window[:, 1:], s32[:, None]], axis=1)
    return effect

