"""The ERPO temperature rule as a plain per-group Python loop over a dict-of-dicts: the oracle the
vectorised `pipeline.erpo.store` is tested against (tests/unit/test_erpo.py,
tests/integration/test_erpo_loop.py) and the baseline of ``bench/history.py``. Not for production.

It computes exactly what `pipeline.erpo.rule.apply_rule` computes (float64 steps from the stored
float32 temperature, rounded to float32 each step), one group at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import polars as pl

from pipeline.erpo.rule import CAP_EPS, ErpoRule
from pipeline.erpo.store import TABLE_SCHEMA, empty_table
from pipeline.verify.residual import residual


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
    """The rule of `pipeline.erpo.store.update`, as a plain per-group Python loop over a dict-of-dicts.

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
        all_correct, all_wrong = (bool(m) for m in residual(s))
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

