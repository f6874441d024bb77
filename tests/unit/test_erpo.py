"""ERPO history table and temperature rule: hand-worked cases, the vectorised `update` and
`HistoryStore` against the plain-loop oracle `reference_update` (tests/erpo_oracle.py) on random
batches, and snapshots."""

from __future__ import annotations

import copy
import os

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erpo_oracle import from_dict_table, reference_update, to_dict_table
from pipeline.erpo.rule import REASONS, ErpoRule
from pipeline.erpo.snapshots import SNAPSHOT_VERSION, load_snapshot, snapshot
from pipeline.erpo.store import TABLE_SCHEMA, UPDATE_SCHEMA, HistoryStore, empty_table, temperature_lookup, update


def approx(x: float | list[float]):
    """Temperatures are float32 stepped in float64 and rounded each step: compare to 1e-6."""
    return pytest.approx(x, abs=1e-6)


def batch(*rows: tuple[str, float, int]) -> pl.DataFrame:
    return pl.DataFrame(
        list(rows), schema={"prompt_id": pl.Utf8, "pass_rate": pl.Float32, "policy_version": pl.Int64}, orient="row"
    )


def row(table: pl.DataFrame, pid: str) -> dict:
    out = table.filter(pl.col("prompt_id") == pid).to_dicts()
    assert len(out) == 1
    return out[0]


def run(rule: ErpoRule, *batches: pl.DataFrame) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    table, ups = empty_table(), []
    for i, b in enumerate(batches):
        table, u = update(table, b, rule, now=1000.0 + i)
        ups.append(u)
    return table, ups


# ---------------------------------------------------------------------------------------------
# Rule validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau0": 2.5}, "tau0"),
        ({"tau0": -0.1, "tau_min": 0.0}, "tau0"),
        ({"tau_min": -1.0}, "tau_min"),
        ({"tau_max": 0.5, "tau_min": 0.8, "tau0": 0.6}, "tau_max"),
        ({"delta_tau": -0.1}, "delta_tau"),
        ({"decay": 1.5}, "decay"),
        ({"history": 0}, "history"),
        ({"ra_delta": -1.0}, "ra_delta"),
        ({"engine_max": 0.0}, "engine_max"),
        ({"tau_max": float("nan")}, "tau_max"),
        ({"enabled": 1}, "enabled"),
    ],
)
def test_rule_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ErpoRule(**kwargs)


def test_bad_groups_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        update(empty_table(), batch(("a", 1.5, 0)), ErpoRule(), now=0.0)
    with pytest.raises(ValueError, match="lack"):
        update(empty_table(), pl.DataFrame({"prompt_id": ["a"]}), ErpoRule(), now=0.0)


# ---------------------------------------------------------------------------------------------
# All-correct raise, cap, same result in one batch


def test_all_correct_three_batches_raises_by_three_steps() -> None:
    # tau: 1.0 -> 1.1 -> 1.2 -> 1.3 (tau_max 1.5 never reached)
    table, ups = run(ErpoRule(), *(batch(("p", 1.0, v)) for v in (1, 2, 3)))
    r = row(table, "p")
    assert r["temperature"] == approx(1.3)
    assert (r["times_seen"], r["all_correct_streak"], r["times_residual"], r["was_residual"]) == (3, 3, 3, True)
    assert [u["temperature"].item() for u in ups] == approx([1.1, 1.2, 1.3])
    assert [u["reason"].item() for u in ups] == ["all_correct_raise"] * 3
    assert [u["decided_at_version"].item() for u in ups] == [1, 2, 3]
    assert ups[-1].row(0, named=True) == {
        "prompt_id": "p",
        "temperature": approx(1.3),
        "reason": "all_correct_raise",
        "times_seen": 3,
        "mean_pass_rate": 1.0,
        "all_correct_streak": 3,
        "decided_at_version": 3,
        "decided_at": 1002.0,
    }
    assert dict(ups[-1].schema) == UPDATE_SCHEMA


def test_all_correct_capped_at_tau_max() -> None:
    # tau_max 1.2: 1.0 -> 1.1 (raise) -> 1.2 (raise, exactly fits) -> 1.2 (1.3 > 1.2: capped)
    table, ups = run(ErpoRule(tau_max=1.2), *(batch(("p", 1.0, v)) for v in (1, 2, 3)))
    assert row(table, "p")["temperature"] == approx(1.2)
    assert [u["reason"].item() for u in ups] == ["all_correct_raise", "all_correct_raise", "capped"]
    assert [u["temperature"].item() for u in ups] == approx([1.1, 1.2, 1.2])


def test_three_groups_in_one_batch_equal_three_batches() -> None:
    for rule in (ErpoRule(), ErpoRule(tau_max=1.2)):
        one, (u,) = run(rule, batch(("p", 1.0, 1), ("p", 1.0, 2), ("p", 1.0, 3)))
        three, _ = run(rule, *(batch(("p", 1.0, v)) for v in (1, 2, 3)))
        # last_update differs only because the three batches ran at three clock readings.
        assert one.drop("last_update").to_dicts() == three.drop("last_update").to_dicts()
        # One update for the batch: the final temperature, reason of the last decision.
        assert u.height == 1
        assert u["temperature"].item() == row(three, "p")["temperature"]
        assert u["reason"].item() == ("all_correct_raise" if rule.tau_max == 1.5 else "capped")
        assert u["decided_at_version"].item() == 3


def test_engine_range_clamp() -> None:
    # tau_max 3 but vLLM accepts at most 2: 1.5 + 0.5 = 2.0 (raise), then 2.5 > 2 -> capped at 2.
    rule = ErpoRule(tau0=1.5, delta_tau=0.5, tau_max=3.0, engine_max=2.0)
    assert rule.cap == 2.0
    table, ups = run(rule, *(batch(("p", 1.0, v)) for v in (1, 2, 3)))
    assert row(table, "p")["temperature"] == 2.0
    assert [u["reason"].item() for u in ups] == ["all_correct_raise", "capped", "capped"]


# ---------------------------------------------------------------------------------------------
# Informative and all-wrong groups


def test_mixed_group_keeps_tau_without_decay_and_counts_reactivation_once() -> None:
    # 3 all-correct -> 1.3; mixed: tau stays (decay 0), reactivated once; mixed again: no
    # second reactivation (previous group was not all-correct).
    table, ups = run(
        ErpoRule(),
        *(batch(("p", 1.0, v)) for v in (1, 2, 3)),
        batch(("p", 0.5, 4)),
        batch(("p", 0.25, 5)),
    )
    r = row(table, "p")
    assert r["temperature"] == approx(1.3)
    assert (r["times_reactivated"], r["all_correct_streak"], r["was_residual"]) == (1, 0, False)
    assert ups[3].height == 0 and ups[4].height == 0  # tau unchanged -> no update


def test_mixed_group_decays_toward_tau0() -> None:
    # decay 0.5: 1.3 -> 1.0 + (1.3 - 1.0) * 0.5 = 1.15 (reason "reactivated": previous group was
    # all-correct), then 1.15 -> 1.075 (reason "decay").
    table, ups = run(
        ErpoRule(decay=0.5),
        *(batch(("p", 1.0, v)) for v in (1, 2, 3)),
        batch(("p", 0.5, 4)),
        batch(("p", 0.75, 5)),
    )
    assert ups[3]["temperature"].item() == approx(1.15)
    assert ups[3]["reason"].item() == "reactivated"
    assert ups[4]["temperature"].item() == approx(1.075)
    assert ups[4]["reason"].item() == "decay"
    assert row(table, "p")["times_reactivated"] == 1


def test_reactivation_inside_one_batch_counted_once() -> None:
    # residual -> informative -> informative in one batch: reactivated exactly once.
    table, _ = run(ErpoRule(), batch(("p", 1.0, 1), ("p", 0.5, 2), ("p", 0.5, 3)))
    assert row(table, "p")["times_reactivated"] == 1
    # all-wrong is not informative: residual -> all-wrong is not a reactivation.
    table, _ = run(ErpoRule(), batch(("q", 1.0, 1), ("q", 0.0, 2)))
    assert row(table, "q")["times_reactivated"] == 0


def test_all_wrong_keeps_tau_and_counts_streak() -> None:
    table, ups = run(ErpoRule(), batch(("p", 1.0, 1)), batch(("p", 0.0, 2)), batch(("p", 0.0, 3)))
    r = row(table, "p")
    assert r["temperature"] == approx(1.1)
    assert (r["all_wrong_streak"], r["all_correct_streak"], r["was_residual"]) == (2, 0, False)
    assert ups[1].height == 0 and ups[2].height == 0


def test_history_keeps_last_window_in_order() -> None:
    rates = [0.0, 0.25, 0.5, 0.75, 1.0, 0.125]
    table, ups = run(ErpoRule(history=4), *(batch(("p", s, i)) for i, s in enumerate(rates)))
    assert row(table, "p")["pass_rates"] == [0.5, 0.75, 1.0, 0.125]
    # same within one batch
    one, _ = run(ErpoRule(history=4), batch(*(("p", s, i) for i, s in enumerate(rates))))
    assert row(one, "p")["pass_rates"] == [0.5, 0.75, 1.0, 0.125]
    # update after the all-correct 5th group: mean over [0.25, 0.5, 0.75, 1.0] = 0.625
    assert ups[4]["mean_pass_rate"].item() == 0.625


def test_disabled_rule_is_plain_grpo() -> None:
    rule = ErpoRule(enabled=False)
    table, ups = run(rule, *(batch(("p", 1.0, v), ("q", 0.5, v)) for v in (1, 2, 3)))
    assert table["temperature"].to_list() == [1.0, 1.0]
    assert all(u.height == 0 and dict(u.schema) == UPDATE_SCHEMA for u in ups)
    assert row(table, "p")["times_residual"] == 3  # history still kept
    np.testing.assert_array_equal(temperature_lookup(table, ["p", "x"], rule), np.array([1.0, 1.0], np.float32))


def test_untouched_rows_unchanged_and_lookup() -> None:
    table, _ = run(ErpoRule(), batch(("a", 1.0, 1), ("b", 0.5, 1)))
    before = row(table, "b")
    table, _ = update(table, batch(("a", 1.0, 2)), ErpoRule(), now=5000.0)
    assert row(table, "b") == before
    assert table.height == 2 and dict(table.schema) == TABLE_SCHEMA
    np.testing.assert_array_equal(
        temperature_lookup(table, ["a", "zz", "b"]), np.array([1.2, 1.0, 1.0], dtype=np.float32)
    )


# ---------------------------------------------------------------------------------------------
# Vectorised update == reference loop

POOL = [f"p{i}" for i in range(8)]
group_rows = st.lists(
    st.tuples(st.sampled_from(POOL), st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.integers(0, 50)),
    min_size=0,
    max_size=20,
)
rules = st.builds(
    ErpoRule,
    delta_tau=st.sampled_from([0.0, 0.1, 0.3]),
    tau_max=st.sampled_from([1.2, 1.5, 3.0]),
    history=st.integers(1, 4),
    decay=st.sampled_from([0.0, 0.5]),
    enabled=st.booleans(),
)


def _sorted(df: pl.DataFrame) -> list[dict]:
    return df.sort("prompt_id").to_dicts()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule=rules, batches=st.lists(group_rows, min_size=1, max_size=4))
def test_update_matches_reference_loop(rule: ErpoRule, batches: list[list[tuple[str, float, int]]]) -> None:
    table, ref = empty_table(), {}
    for i, rows in enumerate(batches):
        now = 100.0 + i
        table, ups = update(table, batch(*rows) if rows else batch(), rule, now)
        ref, ref_ups = reference_update(ref, rows, rule, now)
        assert _sorted(table) == _sorted(from_dict_table(ref))
        assert ups.to_dicts() == pl.DataFrame(ref_ups, schema=UPDATE_SCHEMA).to_dicts()
        assert set(ups["reason"].to_list()) <= set(REASONS)
        assert ups["reason"].null_count() == 0
    # the dict view round-trips
    assert _sorted(from_dict_table(to_dict_table(table))) == _sorted(table)


def test_reference_update_mutates_only_its_argument() -> None:
    table, _ = run(ErpoRule(), batch(("a", 1.0, 1)))
    d = to_dict_table(table)
    snapshot_d = copy.deepcopy(d)
    reference_update(d, [("a", 1.0, 2)], ErpoRule(), 1.0)
    assert d != snapshot_d and row(table, "a")["times_seen"] == 1


# ---------------------------------------------------------------------------------------------
# Snapshot


def test_snapshot_round_trip_with_offsets(tmp_path) -> None:
    table, _ = run(ErpoRule(), batch(("a", 1.0, 1), ("b", 0.5, 1), ("a", 0.0, 2)))
    offsets = {("run-trajectories", 0): 120, ("run-trajectories", 3): 7}
    path = tmp_path / "erpo.parquet"
    snapshot(table, offsets, path, seen_tickets=["e0-000001"], scored_attempts=["e0-000001/0", "e0-000001/1"])
    loaded = load_snapshot(path)
    assert loaded.offsets == offsets
    assert (loaded.seen_tickets, loaded.scored_attempts) == (["e0-000001"], ["e0-000001/0", "e0-000001/1"])
    assert dict(loaded.table.schema) == TABLE_SCHEMA
    assert _sorted(loaded.table) == _sorted(table)
    assert os.listdir(tmp_path) == ["erpo.parquet"]  # no temporary file left behind
    # overwrite in place, still a single file
    snapshot(loaded.table, {("run-trajectories", 0): 121}, path)
    again = load_snapshot(path)
    assert again.offsets == {("run-trajectories", 0): 121} and again.seen_tickets == again.scored_attempts == []
    assert os.listdir(tmp_path) == ["erpo.parquet"]


def test_load_snapshot_missing_file(tmp_path) -> None:
    loaded = load_snapshot(tmp_path / "absent.parquet")
    assert loaded.table.height == 0 and dict(loaded.table.schema) == TABLE_SCHEMA and loaded.offsets == {}
    assert loaded.seen_tickets == loaded.scored_attempts == []


def test_load_snapshot_rejects_foreign_parquet(tmp_path) -> None:
    path = tmp_path / "other.parquet"
    pl.DataFrame({"x": [1]}).write_parquet(path)
    with pytest.raises(ValueError, match="no format version .* reads version '1' only"):
        load_snapshot(path)


def test_load_snapshot_of_another_version_names_both_versions(tmp_path) -> None:
    """A snapshot of an older format is refused, never read half-way."""
    table, _ = run(ErpoRule(), batch(("a", 1.0, 1)))
    path = tmp_path / "old.parquet"
    table.write_parquet(path, metadata={"rlstream.erpo.snapshot_version": "0", "rlstream.erpo.offsets": "[]"})
    assert SNAPSHOT_VERSION == "1"
    with pytest.raises(ValueError, match=r"old.parquet: ERPO snapshot of format version '0'; this build reads "
                                         r"version '1' only"):
        load_snapshot(path)
    # The right version without its de-duplication ids is not read either (they would start empty).
    table.write_parquet(path, metadata={"rlstream.erpo.snapshot_version": "1", "rlstream.erpo.offsets": "[]"})
    with pytest.raises(ValueError, match="lacks the metadata"):
        load_snapshot(path)


# ---------------------------------------------------------------------------------------------
# HistoryStore: the in-place form the reward service holds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule=rules, start=group_rows, batches=st.lists(group_rows, min_size=1, max_size=4))
def test_store_matches_reference_loop_from_an_existing_table(rule, start, batches) -> None:
    """A store built from a table with history, fed chained batches, equals the dict loop; its
    tail is merged into the main index on the way (TAIL_MAX = 2)."""
    ref, _ = reference_update({}, start, rule, 1.0)
    store = HistoryStore(rule, from_dict_table(ref))
    store.TAIL_MAX = 2
    for i, rows in enumerate(batches):
        ups = store.apply(batch(*rows) if rows else batch(), 10.0 + i)
        ref, ref_ups = reference_update(ref, rows, rule, 10.0 + i)
        assert _sorted(store.to_frame()) == _sorted(from_dict_table(ref))
        assert ups.to_dicts() == pl.DataFrame(ref_ups, schema=UPDATE_SCHEMA).to_dicts()
    assert len(store) == len(ref)
    ids = POOL + ["never-seen"]
    want = [ref[p]["temperature"] if p in ref and rule.enabled else rule.tau0 for p in ids]
    np.testing.assert_array_equal(store.temperatures(ids), np.array(want, np.float32))


def test_store_survives_hash_collisions(monkeypatch) -> None:
    """Under seed 0 every id hashes to the same key: the store must notice (stored id differs,
    or two new ids share a key), move to another seed and give the loop's result."""
    real = HistoryStore._hash

    def weak(self, ids):
        return np.zeros(ids.len(), np.uint64) if self._seed == 0 else real(self, ids)

    monkeypatch.setattr(HistoryStore, "_hash", weak)
    rule = ErpoRule()
    store = HistoryStore(rule)
    rows = [("a", 1.0, 1), ("b", 0.5, 1), ("a", 1.0, 2), ("c", 0.0, 2)]
    store.apply(batch(*rows), 5.0)
    ref, _ = reference_update({}, rows, rule, 5.0)
    assert store._seed >= 1
    assert _sorted(store.to_frame()) == _sorted(from_dict_table(ref))
    # a table loaded under the weak hash is re-indexed too, and lookups find the right rows
    again = HistoryStore(rule, store.to_frame())
    assert again._seed >= 1
    np.testing.assert_array_equal(again.temperatures(["a", "b", "zz"]), np.array([1.2, 1.0, 1.0], np.float32))
    # one indexed prompt, then a new id with the same key: the hit's stored id differs
    one = HistoryStore(rule, from_dict_table({"a": ref["a"]}))
    assert one._seed == 0
    np.testing.assert_array_equal(one.temperatures(["b"]), np.array([1.0], np.float32))  # not a's 1.2
    one.apply(batch(("b", 1.0, 3)), 6.0)
    assert one._seed >= 1 and row(one.to_frame(), "b")["times_seen"] == 1
    assert row(one.to_frame(), "a")["times_seen"] == 2


def test_store_rejects_bad_tables_and_groups_without_changing() -> None:
    table, _ = run(ErpoRule(), batch(("a", 1.0, 1)))
    with pytest.raises(ValueError, match="duplicate prompt_id"):
        HistoryStore(ErpoRule(), pl.concat([table, table]))
    with pytest.raises(ValueError, match="null values"):
        HistoryStore(ErpoRule(), table.with_columns(pl.lit(None, pl.Int64).alias("last_version")))
    store = HistoryStore(ErpoRule(), table)
    before = store.to_frame()
    with pytest.raises(ValueError, match="outside"):
        store.apply(batch(("a", 1.0, 2), ("b", 2.0, 2)), 1.0)
    assert store.to_frame().equals(before)


def test_store_history_longer_than_rule_keeps_the_tail() -> None:
    """A snapshot written with history 4, loaded under history 2, keeps the last two rates."""
    table, _ = run(ErpoRule(history=4), batch(("a", 0.25, 1), ("a", 0.5, 2), ("a", 0.75, 3)))
    store = HistoryStore(ErpoRule(history=2), table)
    assert row(store.to_frame(), "a")["pass_rates"] == approx([0.5, 0.75])
