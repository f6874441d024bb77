"""ERPO: the per-prompt history table and the temperature rule, as pure vectorised functions.

Long (~840 lines, a third of it this docstring and the rule's specification) because the pure
form, the in-place store and the loop oracle of one rule must stay side by side to stay equal;
the per-partition state around it is `pipeline.erpo.partitions`.

ERPO (Explore Residual Prompts in Policy Optimization, arXiv 2511.04800): a prompt whose whole
group was answered correctly is *residual* -- every sample has the same reward, the group-relative
advantage is zero and the group gives no gradient. ERPO keeps a history per prompt and raises the
sampling temperature of residual prompts, so their next groups contain diverse (and some wrong)
answers and yield a learning signal again ("reactivation").

How we depart from the paper: the paper publishes no Δτ, τ_max, decay or reset rule; the defaults
of :class:`ErpoRule` (τ₀ = 1.0, Δτ = 0.1, τ_max = 1.5, history = 4, δ = 0.1, no decay) are ours.
The residual-advantage (RA) term is our reading: an all-equal shift of the rewards of an
all-correct group vanishes under group normalisation, so RA acts on the advantage and gives every
sample of an all-correct group the pseudo-negative advantage −δ (:func:`ra_advantages`).

The stateful step is a pure function (STYLE 7): ``update(table, groups, rule, now) -> (table,
temperature_updates)``, with the clock injected (STYLE 8). It is the pure form of
:meth:`HistoryStore.apply`, which the reward service uses: the same vectorised numpy kernel
(:func:`_apply_rule`) on owned columns with a hash index, so a batch costs time in its own size,
not the table's. The service only holds the store, sends the updates and snapshots the table with
its consumed offsets (:func:`snapshot`). :func:`reference_update` is the same rule as a plain
per-group loop, the oracle of the property tests and the baseline of ``bench/history.py``.

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
rounds the result to float32, identically in :func:`update` and :func:`reference_update`.

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

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.atomic import atomic_path

__all__ = [
    "ErpoRule",
    "TABLE_SCHEMA",
    "UPDATE_SCHEMA",
    "GROUP_SCHEMA",
    "REASONS",
    "empty_table",
    "empty_updates",
    "update",
    "HistoryStore",
    "reference_update",
    "to_dict_table",
    "from_dict_table",
    "ra_advantages",
    "snapshot",
    "load_snapshot",
    "temperature_lookup",
]

# An all-correct raise "does not fit" under the cap when τ + Δτ exceeds the cap by more than this;
# float32 temperatures near 2 have a resolution of about 2.4e-7, so this absorbs rounding of τ.
CAP_EPS = 1e-6

REASONS = ("all_correct_raise", "capped", "reactivated", "decay", "clamped")

#: Per-prompt history table, one row per prompt (key ``prompt_id``). Row order is not meaningful.
TABLE_SCHEMA: dict[str, pl.DataType] = {
    # Stable prompt id (key).
    "prompt_id": pl.Utf8(),
    # Scored groups of this prompt seen so far.
    "times_seen": pl.Int32(),
    # Pass rates of the last `history` groups, oldest first.
    "pass_rates": pl.List(pl.Float32()),
    # Consecutive all-correct groups up to the latest one (0 if the latest was not all-correct).
    "all_correct_streak": pl.Int32(),
    # Consecutive all-wrong groups up to the latest one.
    "all_wrong_streak": pl.Int32(),
    # Current sampling temperature τ_p.
    "temperature": pl.Float32(),
    # Policy version of the latest group.
    "last_version": pl.Int64(),
    # Unix time (s, injected clock) of the latest update.
    "last_update": pl.Float64(),
    # All-correct groups seen so far.
    "times_residual": pl.Int32(),
    # Informative groups (0 < s < 1) that directly followed an all-correct group.
    "times_reactivated": pl.Int32(),
    # Whether the latest group was all-correct.
    "was_residual": pl.Boolean(),
}

#: Columns of the temperature updates, as on the wire (``schemas.TEMPERATURE_UPDATE``).
UPDATE_SCHEMA: dict[str, pl.DataType] = {
    "prompt_id": pl.Utf8(),
    "temperature": pl.Float32(),
    "reason": pl.Utf8(),
    "times_seen": pl.Int32(),
    "mean_pass_rate": pl.Float32(),
    "all_correct_streak": pl.Int32(),
    "decided_at_version": pl.Int64(),
    "decided_at": pl.Float64(),
}

#: Input of :func:`update`: one row per scored group, applied in row order.
GROUP_SCHEMA: dict[str, pl.DataType] = {
    "prompt_id": pl.Utf8(),
    "pass_rate": pl.Float32(),
    "policy_version": pl.Int64(),
}

_TABLE_COLS = list(TABLE_SCHEMA)
_UPDATE_COLS = list(UPDATE_SCHEMA)
_OFFSETS_KEY = "rlstream.erpo.offsets"
_SNAPSHOT_VERSION_KEY = "rlstream.erpo.snapshot_version"
_SNAPSHOT_VERSION = "1"
_SEEN_KEY = "rlstream.erpo.seen_tickets"
_SCORED_KEY = "rlstream.erpo.scored_attempts"

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------
# Table helpers


def empty_table() -> pl.DataFrame:
    """A history table with no prompts."""
    return pl.DataFrame(schema=TABLE_SCHEMA)


def empty_updates() -> pl.DataFrame:
    """A temperature-update frame with no rows."""
    return pl.DataFrame(schema=UPDATE_SCHEMA)


def _check_table(table: pl.DataFrame) -> None:
    if dict(table.schema) != TABLE_SCHEMA:
        raise ValueError(f"ERPO table schema {dict(table.schema)} differs from TABLE_SCHEMA {TABLE_SCHEMA}")


def _prepare_groups(groups: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in GROUP_SCHEMA if c not in groups.columns]
    if missing:
        raise ValueError(f"groups lack column(s) {missing}; need {list(GROUP_SCHEMA)}")
    g = groups.select([pl.col(c).cast(t) for c, t in GROUP_SCHEMA.items()])
    bad = g.select(
        nulls=pl.any_horizontal(pl.all().is_null()).sum(),
        out=((pl.col("pass_rate") < 0) | (pl.col("pass_rate") > 1) | pl.col("pass_rate").is_nan()).sum(),
    ).row(0)
    if bad[0]:
        raise ValueError(f"groups have {bad[0]} row(s) with a null prompt_id, pass_rate or policy_version")
    if bad[1]:
        raise ValueError(f"groups have {bad[1]} pass_rate(s) outside [0, 1]")
    return g


# --------------------------------------------------------------------------------------------
# Vectorised rule

_NONE = 0
_CODE = {name: i + 1 for i, name in enumerate(REASONS)}
_REASON_OF_CODE = np.array([None, *REASONS], dtype=object)
# Numeric state columns of the table (all but prompt_id and pass_rates), with their numpy dtypes.
_STATE_DTYPES: dict[str, type] = {
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


def _fresh_values(rule: ErpoRule) -> dict[str, Any]:
    """Column values of a prompt before its first group (τ₀, zero counters)."""
    return {name: (np.float32(rule.tau0) if name == "temperature" else 0) for name in _STATE_DTYPES}


@dataclass
class _BatchEffect:
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


def _apply_rule(
    cols: dict[str, np.ndarray], rates: np.ndarray, rows: np.ndarray, s: np.ndarray, v: np.ndarray,
    rule: ErpoRule, now: float,
) -> _BatchEffect:
    """Apply scored groups to the state columns **in place**; the rule's only implementation.

    ``cols`` holds the :data:`_STATE_DTYPES` arrays, ``rates`` the history window (float32
    ``[rows, history]``, right-aligned, NaN = empty); group ``i`` (batch order) has pass rate
    ``s[i]`` (float32), policy version ``v[i]`` and belongs to row ``rows[i]``.

    Vectorised over groups: round ``r`` holds every prompt's ``r``-th group of the batch, so a
    round touches each row at most once and is a handful of whole-array numpy operations (gather,
    compute, scatter). Rounds are few (a prompt rarely has more than two groups in one batch);
    the Python loop runs over rounds, never over groups.
    """
    drows, slot, occ = _batch_layout(rows)
    m = drows.size
    effect = _BatchEffect(
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
        s1, s0 = s32 == 1.0, s32 == 0.0
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


def _rates_to_matrix(pass_rates: pl.Series, history: int) -> np.ndarray:
    """List column -> float32 ``[n, history]``, the last ``history`` values right-aligned, NaN-padded."""
    arr = pass_rates.list.tail(history).to_arrow()
    lens = np.diff(np.asarray(arr.offsets, dtype=np.int64))
    flat = np.asarray(arr.flatten(), dtype=np.float32)
    out = np.full((len(arr), history), np.nan, np.float32)
    row = np.repeat(np.arange(len(arr)), lens)
    pos = np.arange(flat.size) - np.repeat(np.cumsum(lens) - lens, lens)
    out[row, history - lens[row] + pos] = flat
    return out


def _matrix_to_rates(rates: np.ndarray) -> pl.Series:
    """Inverse of :func:`_rates_to_matrix` (NaN = empty; pass rates are never NaN)."""
    keep = ~np.isnan(rates)
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(rates[keep], pa.float32()))
    return pl.Series("pass_rates", lists, dtype=pl.List(pl.Float32))


class HistoryStore:
    """The ERPO table as owned numpy columns with a hash index; :meth:`apply` updates it in place.

    This is what the reward service holds: applying 10,000 groups to a table of a million prompts
    touches only their rows (a few milliseconds), where a pure function on a DataFrame must copy
    the table each time. :func:`update` is the pure form of the same operation.

    Index: a sorted array of 64-bit hashes of ``prompt_id`` (Polars ``Series.hash``, seeded) with
    the row of each, plus a small sorted *tail* for prompts added since the last merge, so adding
    prompts does not rewrite the big index each batch. Lookups are ``searchsorted`` on both, and
    every hit is verified against the stored id: a hash collision (two ids, one hash) is detected,
    the index is rebuilt under another seed, and the lookup is retried. Row order is insertion
    order; :meth:`to_frame` gives the table as a DataFrame in :data:`TABLE_SCHEMA`.
    """

    #: The tail is merged into the main index once it holds more than max(this, index size / 16).
    TAIL_MAX = 65_536

    def __init__(self, rule: ErpoRule, table: pl.DataFrame | None = None) -> None:
        table = empty_table() if table is None else table
        _check_table(table)
        nulls = {c: n for c, n in zip(table.columns, table.null_count().row(0)) if n}
        if nulls:
            raise ValueError(f"ERPO table has null values in {nulls}")
        self.rule = rule
        self._n = table.height
        self._ids = table["prompt_id"].rechunk()
        cap = max(1024, self._n)
        self._cols = {}
        for name, dtype in _STATE_DTYPES.items():
            col = np.zeros(cap, dtype)
            col[: self._n] = table[name].to_numpy()
            self._cols[name] = col
        self._rates = np.full((cap, rule.history), np.nan, np.float32)
        self._rates[: self._n] = _rates_to_matrix(table["pass_rates"], rule.history)
        self._seed = 0
        self._reindex()

    def __len__(self) -> int:
        return self._n

    # -- index ------------------------------------------------------------------------------

    def _hash(self, ids: pl.Series) -> np.ndarray:
        return ids.hash(seed=self._seed).to_numpy()

    def _reindex(self) -> None:
        """Rebuild the index from the ids; on a hash collision, move to the next seed."""
        while True:
            keys = self._hash(self._ids)
            order = np.argsort(keys, kind="stable")
            sk = keys[order]
            same = np.flatnonzero(sk[1:] == sk[:-1])
            if same.size:
                a, b = self._ids.gather(order[same]), self._ids.gather(order[same + 1])
                dup = a.filter(a == b)
                if dup.len():
                    raise ValueError(f"ERPO table has duplicate prompt_id(s), e.g. {dup[0]!r}")
                self._seed += 1
                log.info("ERPO index: hash collision at seed %d, reindexing", self._seed - 1)
                continue
            self._keys, self._key_rows = sk, order.astype(np.int64)
            self._tail_keys = np.empty(0, np.uint64)
            self._tail_rows = np.empty(0, np.int64)
            return

    @staticmethod
    def _probe(keys: np.ndarray, key_rows: np.ndarray, q_sorted: np.ndarray) -> np.ndarray:
        """Row of each key of ``q_sorted`` (ascending) in a sorted index, -1 if absent. Sorted
        queries sweep a large index several times faster than random probes."""
        if keys.size == 0:
            return np.full(q_sorted.size, -1, np.int64)
        pos = np.minimum(np.searchsorted(keys, q_sorted), keys.size - 1)
        return np.where(keys[pos] == q_sorted, key_rows[pos], -1)

    def _lookup(self, ids: pl.Series, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, hit, same)``: the indexed row of each id (-1 if absent), whether it has one,
        and for each hit whether the stored id is the same (False = hash collision)."""
        order = np.argsort(q)
        qs = q[order]
        found = self._probe(self._keys, self._key_rows, qs)
        if self._tail_keys.size:
            found = np.where(found >= 0, found, self._probe(self._tail_keys, self._tail_rows, qs))
        rows = np.empty_like(found)
        rows[order] = found
        hit = rows >= 0
        same = np.ones(0, bool)
        if hit.any():
            same = (self._ids.gather(rows[hit]) == ids.filter(pl.Series(hit))).to_numpy()
        return rows, hit, same

    def _rows_for(self, ids: pl.Series) -> np.ndarray:
        """Row of each id, adding unknown ids as fresh rows (in order of first appearance).

        Every index hit is checked against the stored id, and distinct new ids must have
        distinct hashes; if either fails (a 64-bit hash collision), the index is rebuilt under
        the next seed and the lookup retried.
        """
        while True:
            q = self._hash(ids)
            rows, hit, same = self._lookup(ids, q)
            ok = bool(same.all())
            miss = np.flatnonzero(~hit)
            if ok and miss.size:
                uq, first, inv = np.unique(q[miss], return_index=True, return_inverse=True)
                inv = inv.reshape(-1)
                miss_ids = ids.gather(miss)
                ok = bool((miss_ids.gather(first[inv]) == miss_ids).all())
                if ok:
                    by_first = np.argsort(first, kind="stable")
                    rank = np.empty_like(by_first)
                    rank[by_first] = np.arange(by_first.size)
                    rows[miss] = self._add(miss_ids.gather(first[by_first]), uq[by_first])[rank[inv]]
            if ok:
                return rows
            self._seed += 1
            self._reindex()

    def _add(self, ids: pl.Series, q: np.ndarray) -> np.ndarray:
        """Append distinct new ids (hashes ``q``, none in the index) as fresh rows; their rows."""
        n, k = self._n, ids.len()
        if n + k > self._rates.shape[0]:
            self._grow(n + k)
        for name, value in _fresh_values(self.rule).items():
            self._cols[name][n : n + k] = value
        self._rates[n : n + k] = np.nan
        self._ids = self._ids.append(ids) if n else ids.clone()
        if self._ids.n_chunks() > 16:
            self._ids = self._ids.rechunk()
        self._n = n + k
        rows = np.arange(n, n + k, dtype=np.int64)
        order = np.argsort(q, kind="stable")
        pos = np.searchsorted(self._tail_keys, q[order])
        self._tail_keys = np.insert(self._tail_keys, pos, q[order])
        self._tail_rows = np.insert(self._tail_rows, pos, rows[order])
        if self._tail_keys.size > max(self.TAIL_MAX, self._keys.size // 16):
            pos = np.searchsorted(self._keys, self._tail_keys)
            self._keys = np.insert(self._keys, pos, self._tail_keys)
            self._key_rows = np.insert(self._key_rows, pos, self._tail_rows)
            self._tail_keys, self._tail_rows = self._tail_keys[:0], self._tail_rows[:0]
        return rows

    def _grow(self, need: int) -> None:
        cap = max(need, int(self._rates.shape[0] * 1.5))
        for name, col in self._cols.items():
            grown = np.zeros(cap, col.dtype)
            grown[: self._n] = col[: self._n]
            self._cols[name] = grown
        rates = np.full((cap, self.rule.history), np.nan, np.float32)
        rates[: self._n] = self._rates[: self._n]
        self._rates = rates

    # -- API --------------------------------------------------------------------------------

    def apply(self, groups: pl.DataFrame, now: float) -> pl.DataFrame:
        """Apply a batch of scored groups in place; returns the temperature updates.

        ``groups`` as for :func:`update` (validated before anything changes). Several groups of
        one prompt are applied in row order.
        """
        g = _prepare_groups(groups)
        if g.height == 0:
            return empty_updates()
        ids = g["prompt_id"]
        rows = self._rows_for(ids)
        effect = _apply_rule(
            self._cols, self._rates, rows, g["pass_rate"].to_numpy(), g["policy_version"].to_numpy(),
            self.rule, float(now),
        )
        if not self.rule.enabled:
            return empty_updates()
        temp = self._cols["temperature"][effect.rows]
        emit = (temp != effect.tau_start) | effect.capped
        r = effect.rows[emit]
        window = self._rates[r].astype(np.float64)
        mean = np.nansum(window, axis=1) / np.sum(~np.isnan(window), axis=1)
        return pl.DataFrame(
            {
                "prompt_id": self._ids.gather(r),
                "temperature": temp[emit],
                "reason": _REASON_OF_CODE[effect.code[emit]],
                "times_seen": self._cols["times_seen"][r],
                "mean_pass_rate": mean.astype(np.float32),
                "all_correct_streak": self._cols["all_correct_streak"][r],
                "decided_at_version": effect.decided_at_version[emit],
                "decided_at": np.full(r.size, float(now)),
            },
            schema=UPDATE_SCHEMA,
        )

    def temperatures(self, prompt_ids: Sequence[str] | np.ndarray | pl.Series) -> np.ndarray:
        """Float32 temperature per id, aligned with ``prompt_ids``; τ₀ for unknown ids (and for
        every id when the rule is disabled)."""
        ids = pl.Series("prompt_id", prompt_ids, dtype=pl.Utf8)
        out = np.full(ids.len(), self.rule.tau0, np.float32)
        if not self.rule.enabled or self._n == 0 or ids.len() == 0:
            return out
        rows, hit, same = self._lookup(ids, self._hash(ids))
        hit[hit] = same  # a hit whose stored id differs (a hash collision) is not this prompt
        out[hit] = self._cols["temperature"][rows[hit]]
        return out

    def column(self, name: str) -> np.ndarray:
        """A read-only view of one state column (for metrics)."""
        view = self._cols[name][: self._n].view()
        view.flags.writeable = False
        return view

    def to_frame(self) -> pl.DataFrame:
        """The table as a DataFrame in :data:`TABLE_SCHEMA` (a copy; insertion order)."""
        n = self._n
        data: dict[str, Any] = {"prompt_id": self._ids.rechunk()}
        data.update({name: self._cols[name][:n].copy() for name in _STATE_DTYPES})
        data["pass_rates"] = _matrix_to_rates(self._rates[:n])
        return pl.DataFrame(data).select(_TABLE_COLS).cast(TABLE_SCHEMA)  # type: ignore[arg-type]


def update(
    table: pl.DataFrame, groups: pl.DataFrame, rule: ErpoRule, now: float
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Apply a batch of scored groups to the history table; pure, vectorised, clock injected.

    ``groups`` has one row per scored group: ``prompt_id``, ``pass_rate`` (in [0, 1], compared
    after a cast to Float32), ``policy_version``. Several groups of one prompt are applied in row
    order. Returns ``(new_table, updates)``: the table with the batch applied (existing rows in
    their order, new prompts appended in order of first appearance) and ``updates`` in
    :data:`UPDATE_SCHEMA`, one row per prompt whose temperature changed or was capped in this
    batch, in order of first appearance in ``groups`` (see the module docstring for reasons).

    The pure form of :meth:`HistoryStore.apply` (same code, on a copy of the table): O(table)
    per call, for tests, notebooks and small tables. A long-running service holds a
    :class:`HistoryStore`.
    """
    _prepare_groups(groups)  # validate before paying for the copy
    store = HistoryStore(rule, table)
    updates = store.apply(groups, now)
    return store.to_frame(), updates


# --------------------------------------------------------------------------------------------
# Reference loop


def _f32(x: float) -> float:
    return float(np.float32(x))


def _fresh_row(rule: ErpoRule) -> dict[str, Any]:
    return {
        "times_seen": 0,
        "pass_rates": [],
        "all_correct_streak": 0,
        "all_wrong_streak": 0,
        "temperature": _f32(rule.tau0),
        "last_version": None,
        "last_update": None,
        "times_residual": 0,
        "times_reactivated": 0,
        "was_residual": False,
    }


def reference_update(
    table_dict: dict[str, dict[str, Any]],
    groups_list: Iterable[tuple[str, float, int]],
    rule: ErpoRule,
    now: float,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The same rule as :func:`update`, as a plain per-group Python loop over a dict-of-dicts.

    A reference for the property test and the benchmark baseline, not for production.
    ``table_dict`` maps prompt_id to a row dict (the :data:`TABLE_SCHEMA` columns except
    ``prompt_id``) and is updated **in place**, as a plain service would; ``groups_list`` is an
    iterable of ``(prompt_id, pass_rate, policy_version)``. Returns ``(table_dict, updates)``,
    updates being dicts with the :data:`UPDATE_SCHEMA` columns.
    """
    cap = rule.cap
    batch: dict[str, list[Any]] = {}  # prompt_id -> [tau at start, last reason, its version, capped]
    for pid, s_in, version in groups_list:
        s = _f32(s_in)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"pass_rate {s_in!r} outside [0, 1]")
        row = table_dict.get(pid)
        if row is None:
            row = table_dict[pid] = _fresh_row(rule)
        track = batch.get(pid)
        if track is None:
            track = batch[pid] = [row["temperature"], None, None, False]
        tau32 = row["temperature"]
        tau = tau32
        raw = tau + rule.delta_tau
        all_correct, all_wrong = s == 1.0, s == 0.0
        mid = not all_correct and not all_wrong
        if all_correct:
            core = raw
        elif mid and rule.decay > 0:
            core = rule.tau0 + (tau - rule.tau0) * (1.0 - rule.decay)
        else:
            core = tau
        reason = None
        if rule.enabled:
            new = _f32(min(max(core, rule.tau_min), cap))
            if all_correct:
                if raw > cap + CAP_EPS:
                    reason = "capped"
                elif new != tau32:
                    reason = "all_correct_raise"
            elif new != tau32:
                if mid and row["was_residual"]:
                    reason = "reactivated"
                elif mid and _f32(core) != tau32:
                    reason = "decay"
                else:
                    reason = "clamped"
        else:
            new = _f32(rule.tau0)
        row["times_seen"] += 1
        row["pass_rates"] = (row["pass_rates"] + [s])[-rule.history :]
        row["all_correct_streak"] = row["all_correct_streak"] + 1 if all_correct else 0
        row["all_wrong_streak"] = row["all_wrong_streak"] + 1 if all_wrong else 0
        row["temperature"] = new
        row["last_version"] = int(version)
        row["last_update"] = float(now)
        row["times_residual"] += int(all_correct)
        row["times_reactivated"] += int(mid and row["was_residual"])
        row["was_residual"] = all_correct
        if reason is not None:
            track[1], track[2] = reason, int(version)
            track[3] = track[3] or reason == "capped"
    updates: list[dict[str, Any]] = []
    if rule.enabled:
        for pid, (tau_start, reason, dv, capped) in batch.items():
            row = table_dict[pid]
            if row["temperature"] != tau_start or capped:
                rates = row["pass_rates"]
                updates.append(
                    {
                        "prompt_id": pid,
                        "temperature": row["temperature"],
                        "reason": reason,
                        "times_seen": row["times_seen"],
                        "mean_pass_rate": _f32(sum(rates) / len(rates)),
                        "all_correct_streak": row["all_correct_streak"],
                        "decided_at_version": dv,
                        "decided_at": float(now),
                    }
                )
    return table_dict, updates


def to_dict_table(table: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """The table as the dict-of-dicts :func:`reference_update` works on."""
    return {row.pop("prompt_id"): row for row in table.iter_rows(named=True)}


def from_dict_table(table_dict: Mapping[str, Mapping[str, Any]]) -> pl.DataFrame:
    """A dict-of-dicts table back as a DataFrame in :data:`TABLE_SCHEMA`."""
    rows = [{"prompt_id": pid, **row} for pid, row in table_dict.items()]
    return pl.DataFrame(rows, schema=TABLE_SCHEMA, orient="row") if rows else empty_table()


# --------------------------------------------------------------------------------------------
# Learner side


def ra_advantages(pass_rate_per_sample: np.ndarray, advantages: np.ndarray, rule: ErpoRule) -> np.ndarray:
    """RA: samples of all-correct groups (pass rate 1) get the advantage −ra_delta.

    Group-relative advantages of an all-correct group are 0, so this replaces a zero; other
    samples are unchanged. Returns a new array (dtype of ``advantages``); identity when the rule
    is disabled.
    """
    p = np.asarray(pass_rate_per_sample)
    a = np.asarray(advantages)
    if p.shape != a.shape:
        raise ValueError(f"pass_rate_per_sample shape {p.shape} != advantages shape {a.shape}")
    out = a.copy()
    if rule.enabled:
        out[p.astype(np.float32) == np.float32(1.0)] = -rule.ra_delta
    return out


# --------------------------------------------------------------------------------------------
# Snapshot and lookup


def snapshot(table: pl.DataFrame, offsets: Mapping[tuple[str, int], int], path: str | os.PathLike[str],
             seen_tickets: Sequence[str] = (), scored_attempts: Sequence[str] = ()) -> None:
    """Write the table to Parquet with the consumed offsets (and, for de-duplication, the ids of
    the tickets whose groups were applied and the ``<ticket>/<attempt>`` groups scored) in the
    file's key-value metadata.

    ``offsets`` maps (topic, partition) to the next offset to consume; it is stored as JSON
    (a list of ``[topic, partition, offset]``). The file is written to a temporary name in the
    same directory, fsynced, then renamed over ``path``, so a reader sees the old or the new
    snapshot, never a partial one.
    """
    _check_table(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps([[str(t), int(p), int(o)] for (t, p), o in sorted(offsets.items())])
    with atomic_path(path) as tmp:
        table.write_parquet(
            tmp, metadata={_OFFSETS_KEY: payload, _SNAPSHOT_VERSION_KEY: _SNAPSHOT_VERSION,
                           _SEEN_KEY: json.dumps(list(seen_tickets)), _SCORED_KEY: json.dumps(list(scored_attempts))}
        )


def load_snapshot(path: str | os.PathLike[str]) -> tuple[pl.DataFrame, dict[tuple[str, int], int]]:
    """Read a :func:`snapshot`; a missing file gives ``(empty_table(), {})``."""
    path = Path(path)
    if not path.exists():
        return empty_table(), {}
    meta = pl.read_parquet_metadata(path)
    if meta.get(_SNAPSHOT_VERSION_KEY) != _SNAPSHOT_VERSION or _OFFSETS_KEY not in meta:
        raise ValueError(f"{path} is not an ERPO snapshot of version {_SNAPSHOT_VERSION} (metadata {sorted(meta)})")
    table = pl.read_parquet(path)
    _check_table(table)
    offsets = {(str(t), int(p)): int(o) for t, p, o in json.loads(meta[_OFFSETS_KEY])}
    return table, offsets


def snapshot_seen_tickets(path: str | os.PathLike[str]) -> list[str]:
    """The ticket ids a :func:`snapshot` recorded, oldest first ([] for a missing file)."""
    return _snapshot_list(path, _SEEN_KEY)


def snapshot_scored_attempts(path: str | os.PathLike[str]) -> list[str]:
    """The ``<ticket>/<attempt>`` groups a :func:`snapshot` recorded, oldest first."""
    return _snapshot_list(path, _SCORED_KEY)


def _snapshot_list(path: str | os.PathLike[str], key: str) -> list[str]:
    path = Path(path)
    if not path.exists():
        return []
    return [str(t) for t in json.loads(pl.read_parquet_metadata(path).get(key, "[]"))]


def temperature_lookup(
    table: pl.DataFrame, prompt_ids: Sequence[str] | np.ndarray | pl.Series, rule: ErpoRule = ErpoRule()
) -> np.ndarray:
    """Float32 temperature per prompt id, aligned with ``prompt_ids``; tau0 for unknown ids (and
    for every id when the rule is disabled). A one-off lookup on a DataFrame; a service holding a
    :class:`HistoryStore` calls its :meth:`HistoryStore.temperatures`."""
    return HistoryStore(rule, table).temperatures(prompt_ids)
