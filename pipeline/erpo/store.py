"""ERPO's per-prompt history table: its schema, the in-place `HistoryStore` the reward service
holds, and `update`, the pure form of the same step.

The stateful step is a pure function (STYLE 7): ``update(table, groups, rule, now) -> (table,
temperature_updates)``, with the clock injected (STYLE 8). It is the pure form of
:meth:`HistoryStore.apply`: the same vectorised kernel (`pipeline.erpo.rule.apply_rule`) on owned
numpy columns with a hash index, so a batch costs time in its own size, not the table's. The
service only holds the store, sends the updates and snapshots the table with its consumed offsets
(`pipeline.erpo.snapshots`). The rule itself, and the reasons of the updates, are specified in
`pipeline.erpo.rule`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.erpo.rule import REASON_OF_CODE, STATE_DTYPES, ErpoRule, apply_rule, fresh_values

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

log = logging.getLogger(__name__)


def empty_table() -> pl.DataFrame:
    """A history table with no prompts."""
    return pl.DataFrame(schema=TABLE_SCHEMA)


def empty_updates() -> pl.DataFrame:
    """A temperature-update frame with no rows."""
    return pl.DataFrame(schema=UPDATE_SCHEMA)


def check_table(table: pl.DataFrame) -> None:
    """Raise ``ValueError`` unless ``table`` has exactly :data:`TABLE_SCHEMA`."""
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
        check_table(table)
        nulls = {c: n for c, n in zip(table.columns, table.null_count().row(0)) if n}
        if nulls:
            raise ValueError(f"ERPO table has null values in {nulls}")
        self.rule = rule
        self._n = table.height
        self._ids = table["prompt_id"].rechunk()
        cap = max(1024, self._n)
        self._cols = {}
        for name, dtype in STATE_DTYPES.items():
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
        for name, value in fresh_values(self.rule).items():
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
        effect = apply_rule(
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
                "reason": REASON_OF_CODE[effect.code[emit]],
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
        data.update({name: self._cols[name][:n].copy() for name in STATE_DTYPES})
        data["pass_rates"] = _matrix_to_rates(self._rates[:n])
        return pl.DataFrame(data).select(list(TABLE_SCHEMA)).cast(TABLE_SCHEMA)  # type: ignore[arg-type]


def update(
    table: pl.DataFrame, groups: pl.DataFrame, rule: ErpoRule, now: float
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Apply a batch of scored groups to the history table; pure, vectorised, clock injected.

    ``groups`` has one row per scored group: ``prompt_id``, ``pass_rate`` (in [0, 1], compared
    after a cast to Float32), ``policy_version``. Several groups of one prompt are applied in row
    order. Returns ``(new_table, updates)``: the table with the batch applied (existing rows in
    their order, new prompts appended in order of first appearance) and ``updates`` in
    :data:`UPDATE_SCHEMA`, one row per prompt whose temperature changed or was capped in this
    batch, in order of first appearance in ``groups`` (reasons: `pipeline.erpo.rule`).

    The pure form of :meth:`HistoryStore.apply` (same code, on a copy of the table): O(table)
    per call, for tests, notebooks and small tables. A long-running service holds a
    :class:`HistoryStore`.
    """
    _prepare_groups(groups)  # validate before paying for the copy
    store = HistoryStore(rule, table)
    updates = store.apply(groups, now)
    return store.to_frame(), updates


def temperature_lookup(
    table: pl.DataFrame, prompt_ids: Sequence[str] | np.ndarray | pl.Series, rule: ErpoRule = ErpoRule()
) -> np.ndarray:
    """Float32 temperature per prompt id, aligned with ``prompt_ids``; tau0 for unknown ids (and
    for every id when the rule is disabled). A one-off lookup on a DataFrame; a service holding a
    :class:`HistoryStore` calls its :meth:`HistoryStore.temperatures`."""
    return HistoryStore(rule, table).temperatures(prompt_ids)
