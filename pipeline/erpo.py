"""ERPO: the per-prompt history table and the temperature rule, as pure vectorised functions.

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
temperature_updates)``; the reward service only stores the table, sends the updates and snapshots
the table with its consumed offsets (:func:`snapshot`). The clock is injected (STYLE 8).

Rule, applied to each scored group of a prompt with pass rate ``s`` (in row order):

* ``s == 1`` (residual, all correct): τ ← min(τ + Δτ, cap), ``all_correct_streak`` += 1,
  ``times_residual`` += 1.
* ``0 < s < 1`` (informative): τ stays, or moves toward τ₀ by the fraction ``decay`` of the
  distance; if the previous group was all-correct the prompt is *reactivated*
  (``times_reactivated`` += 1).
* ``s == 0`` (residual, all wrong): τ unchanged, ``all_wrong_streak`` += 1 (the learner may drop
  the samples, :func:`drop_mask`).

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
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

__all__ = [
    "ErpoRule",
    "TABLE_SCHEMA",
    "UPDATE_SCHEMA",
    "GROUP_SCHEMA",
    "REASONS",
    "empty_table",
    "empty_updates",
    "update",
    "reference_update",
    "to_dict_table",
    "from_dict_table",
    "ra_advantages",
    "drop_mask",
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
# Rechunk the table once it is made of more pieces than this (each update appends one).
_MAX_CHUNKS = 8
_OFFSETS_KEY = "rlstream.erpo.offsets"
_SNAPSHOT_VERSION_KEY = "rlstream.erpo.snapshot_version"
_SNAPSHOT_VERSION = "1"


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
    #: Drop the samples of all-wrong groups from the learner batch (DAPO dynamic sampling).
    #: Independent of `enabled`.
    drop_all_wrong: bool = False
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
        for name in ("drop_all_wrong", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ErpoRule.{name} must be a bool, got {getattr(self, name)!r}")
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


def _step(rule: ErpoRule, now: float) -> list[pl.Expr]:
    """Expressions applying one group (columns ``_s``, ``_v``; null = no group this round) to the
    state rows, all evaluated against the state before the step. The history window is appended
    once per batch, after the rounds (it does not feed back into the rule)."""
    s = pl.col("_s").cast(pl.Float64).fill_null(-1.0)
    has = pl.col("_s").is_not_null()
    s1, s0 = s == 1.0, s == 0.0
    mid = (s > 0.0) & (s < 1.0)
    tau32 = pl.col("temperature")
    tau = tau32.cast(pl.Float64)
    was_res = pl.col("was_residual")
    cap = rule.cap
    raw = tau + rule.delta_tau
    if rule.decay > 0:
        toward = pl.lit(rule.tau0) + (tau - rule.tau0) * (1.0 - rule.decay)
        core = pl.when(s1).then(raw).when(mid).then(toward).otherwise(tau)
    else:
        core = pl.when(s1).then(raw).otherwise(tau)
    if rule.enabled:
        new = core.clip(rule.tau_min, cap).cast(pl.Float32)
        changed = new != tau32
        reason = (
            pl.when(~has)
            .then(pl.lit(None, pl.Utf8))
            .when(s1)
            .then(
                pl.when(raw > cap + CAP_EPS)
                .then(pl.lit("capped"))
                .when(changed)
                .then(pl.lit("all_correct_raise"))
                .otherwise(pl.lit(None, pl.Utf8))
            )
            .when(~changed)
            .then(pl.lit(None, pl.Utf8))
            .when(mid & was_res)
            .then(pl.lit("reactivated"))
            .when(mid & (core.cast(pl.Float32) != tau32))
            .then(pl.lit("decay"))
            .otherwise(pl.lit("clamped"))
        )
    else:
        new = pl.lit(rule.tau0, pl.Float32)
        reason = pl.lit(None, pl.Utf8)
    return [
        pl.when(has).then(pl.col("times_seen") + 1).otherwise(pl.col("times_seen")).alias("times_seen"),
        pl.when(has)
        .then(pl.when(s1).then(pl.col("all_correct_streak") + 1).otherwise(0))
        .otherwise(pl.col("all_correct_streak"))
        .cast(pl.Int32)
        .alias("all_correct_streak"),
        pl.when(has)
        .then(pl.when(s0).then(pl.col("all_wrong_streak") + 1).otherwise(0))
        .otherwise(pl.col("all_wrong_streak"))
        .cast(pl.Int32)
        .alias("all_wrong_streak"),
        pl.when(has).then(new).otherwise(tau32).alias("temperature"),
        pl.when(has).then(pl.col("_v")).otherwise(pl.col("last_version")).alias("last_version"),
        pl.when(has).then(pl.lit(float(now))).otherwise(pl.col("last_update")).alias("last_update"),
        (pl.col("times_residual") + s1.cast(pl.Int32)).alias("times_residual"),
        (pl.col("times_reactivated") + (mid & was_res).cast(pl.Int32)).alias("times_reactivated"),
        pl.when(has).then(s1).otherwise(was_res).alias("was_residual"),
        reason.alias("_step_reason"),
    ]


def update(
    table: pl.DataFrame, groups: pl.DataFrame, rule: ErpoRule, now: float
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Apply a batch of scored groups to the history table; pure, vectorised, clock injected.

    ``groups`` has one row per scored group: ``prompt_id``, ``pass_rate`` (in [0, 1], compared
    after a cast to Float32), ``policy_version``. Several groups of one prompt are applied in row
    order. Returns ``(new_table, updates)`` with ``updates`` in :data:`UPDATE_SCHEMA`, one row
    per prompt whose temperature changed or was capped in this batch, in order of first
    appearance in ``groups`` (see the module docstring for reasons).

    How it is vectorised, with no per-row Python loop:

    1. Rounds: round 0 holds each prompt's first group of the batch (``is_first_distinct``);
       the repeats get their occurrence index ``int_range(len).over(prompt_id)`` and form
       rounds 1, 2, ... (only computed when there are repeats).
    2. The rows of the touched prompts are taken out of the table with one hash probe
       (``is_in``), a gather and a filter, and left-joined to the round-0 groups; new prompts
       get default values (τ₀). This small *state* frame (one row per distinct prompt of the
       batch) is all the rule works on; the rest of the table is only filtered.
    3. Round r is one left join of the state with the round-r groups followed by one
       ``with_columns`` of the rule's expressions (:func:`_step`), which leave rows without a
       round-r group unchanged. Rounds are few in practice (a prompt rarely has more than one
       or two groups in one batch); the Python loop runs over rounds, never over rows. The
       history window is appended once, with all of a prompt's batch pass rates in row order.
    4. The new table is the untouched rows followed by the state rows, without copying the
       untouched rows again (row order changes and carries no meaning); it is rechunked when
       it has grown too many pieces.
    """
    _check_table(table)
    g = _prepare_groups(groups).rename({"pass_rate": "_s", "policy_version": "_v"})
    if g.height == 0:
        return table, empty_updates()
    # Round 0 = each prompt's first group of the batch; later rounds only exist for repeats.
    first = g["prompt_id"].is_first_distinct()
    later: list[pl.DataFrame] = []
    if first.all():
        g0 = g
    else:
        g0 = g.filter(first)
        dups = g.filter(~first).with_columns(pl.int_range(pl.len(), dtype=pl.UInt32).over("prompt_id").alias("_round"))
        by_round = dups.partition_by("_round", as_dict=True, include_key=False, maintain_order=True)
        later = [by_round[(r,)] for r in range(len(by_round))]
    ids = g0["prompt_id"]

    # Touched rows out of the table: one hash probe of the big key column, a gather, a filter.
    if table.height:
        mask = table["prompt_id"].is_in(ids.implode())
        idx = mask.arg_true()
        old = table.gather(idx) if _n_chunks(table) == 1 else table.filter(mask)
        rest = table.filter(~mask) if idx.len() else table
    else:
        old, rest = table, table

    # The batch's pass rates of each prompt, in row order, appended to its history once.
    if later:
        batch_rates = g.group_by("prompt_id", maintain_order=True).agg(pl.col("_s").alias("_rates"))
    else:
        batch_rates = g0.select("prompt_id", pl.col("_s").reshape((-1, 1)).arr.to_list().alias("_rates"))

    step = _step(rule, now)
    # One state row per distinct prompt of the batch, with its round-0 group; new prompts (no
    # row in the table) get the defaults: τ₀, empty history, zero counters.
    state = g0.join(old, on="prompt_id", how="left", maintain_order="left").with_columns(
        pl.col("times_seen", "all_correct_streak", "all_wrong_streak", "times_residual", "times_reactivated").fill_null(0),
        pl.col("pass_rates").fill_null(pl.lit([], pl.List(pl.Float32))),
        pl.col("temperature").fill_null(pl.lit(rule.tau0, pl.Float32)),
        pl.col("was_residual").fill_null(False),
        pl.col("temperature").fill_null(pl.lit(rule.tau0, pl.Float32)).alias("_tau_start"),
        pl.lit(None, pl.Utf8).alias("_reason"),
        pl.lit(None, pl.Int64).alias("_dv"),
        pl.lit(False).alias("_capped"),
    )
    for r in range(1 + len(later)):
        if r:
            state = state.join(later[r - 1], on="prompt_id", how="left", maintain_order="left")
        state = (
            state.with_columns(step)
            .with_columns(
                pl.coalesce("_step_reason", "_reason").alias("_reason"),
                pl.when(pl.col("_step_reason").is_not_null()).then(pl.col("_v")).otherwise(pl.col("_dv")).alias("_dv"),
                (pl.col("_capped") | (pl.col("_step_reason") == "capped").fill_null(False)).alias("_capped"),
            )
            .drop("_s", "_v", "_step_reason")
        )
    if later:
        state = state.join(batch_rates, on="prompt_id", how="left", maintain_order="left")
    else:
        state = state.with_columns(batch_rates["_rates"])
    state = state.with_columns(pl.col("pass_rates").list.concat("_rates").list.tail(rule.history))

    new_table = pl.concat([rest, state.select(_TABLE_COLS)], how="vertical", rechunk=False)
    if _n_chunks(new_table) > _MAX_CHUNKS:
        new_table = new_table.rechunk()
    if not rule.enabled:
        return new_table, empty_updates()
    updates = state.filter((pl.col("temperature") != pl.col("_tau_start")) | pl.col("_capped")).select(
        "prompt_id",
        "temperature",
        pl.col("_reason").alias("reason"),
        "times_seen",
        pl.col("pass_rates").list.mean().cast(pl.Float32).alias("mean_pass_rate"),
        "all_correct_streak",
        pl.col("_dv").alias("decided_at_version"),
        pl.lit(float(now), pl.Float64).alias("decided_at"),
    )
    return new_table, updates


def _n_chunks(df: pl.DataFrame) -> int:
    return max(df.n_chunks("all")) if df.width else 0


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


def drop_mask(pass_rate_per_sample: np.ndarray, rule: ErpoRule) -> np.ndarray:
    """True where a sample should be dropped: its group was all wrong and ``drop_all_wrong``."""
    p = np.asarray(pass_rate_per_sample)
    if not rule.drop_all_wrong:
        return np.zeros(p.shape, dtype=bool)
    return p.astype(np.float32) == np.float32(0.0)


# --------------------------------------------------------------------------------------------
# Snapshot and lookup


def snapshot(table: pl.DataFrame, offsets: Mapping[tuple[str, int], int], path: str | os.PathLike[str]) -> None:
    """Write the table to Parquet with the consumed offsets in the file's key-value metadata.

    ``offsets`` maps (topic, partition) to the next offset to consume; it is stored as JSON
    (a list of ``[topic, partition, offset]``). The file is written to a temporary name in the
    same directory, fsynced, then renamed over ``path``, so a reader sees the old or the new
    snapshot, never a partial one.
    """
    _check_table(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps([[str(t), int(p), int(o)] for (t, p), o in sorted(offsets.items())])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        table.write_parquet(
            tmp, metadata={_OFFSETS_KEY: payload, _SNAPSHOT_VERSION_KEY: _SNAPSHOT_VERSION}
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def temperature_lookup(
    table: pl.DataFrame, prompt_ids: Sequence[str] | np.ndarray | pl.Series, rule: ErpoRule = ErpoRule()
) -> np.ndarray:
    """Float32 temperature per prompt id, aligned with ``prompt_ids``; tau0 for unknown ids (and
    for every id when the rule is disabled)."""
    ids = pl.Series("prompt_id", prompt_ids, dtype=pl.Utf8)
    if not rule.enabled or table.height == 0:
        return np.full(ids.len(), rule.tau0, dtype=np.float32)
    out = ids.to_frame().join(
        table.select("prompt_id", "temperature"), on="prompt_id", how="left", maintain_order="left"
    )
    return out["temperature"].fill_null(rule.tau0).to_numpy().astype(np.float32, copy=False)
