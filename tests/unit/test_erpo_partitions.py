"""ERPO state per partition: snapshots per partition, handover between workers, de-duplication by
(ticket, attempt) for output and by ticket for the table, and the rebuild from a scored topic."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.erpo.partitions import PartitionedHistory, load_tables, rebuild_from_scored, snapshot_path
from pipeline.erpo.rule import ErpoRule
from pipeline.erpo.store import GROUP_SCHEMA

RULE = ErpoRule()


def _groups(*rows):
    return pl.DataFrame({"prompt_id": [p for p, _ in rows], "pass_rate": [r for _, r in rows],
                         "policy_version": [0] * len(rows)}, schema=GROUP_SCHEMA)


def test_a_partition_moves_between_workers_with_its_history(tmp_path):
    a = PartitionedHistory(RULE, tmp_path, dedup_window=100, snapshot_every=2)
    assert a.assign(0).position == 0 and a.assign(1).position == 0
    assert a.classify(0, "e0-000001", 0) == "apply"
    a.apply(0, _groups(("p0", 1.0)), now=1.0)  # all correct: tau 1.0 -> 1.1
    a.processed({0})
    assert a.classify(0, "e0-000001", 0) == "duplicate"  # the same attempt again (re-delivery)
    assert a.classify(0, "e0-000001", 1) == "send"  # a later attempt: scored and sent, not counted
    assert a.due() == [] and a.apply(0, _groups(("p0", 1.0)), now=2.0)[0].height == 1
    a.processed({0, 5})  # (5: not owned)
    assert a.due() == [0]
    a.save(0, position=42)
    a.revoke(0)
    assert snapshot_path(tmp_path, 0).exists() and not snapshot_path(tmp_path, 1).exists()
    # Another worker takes partition 0: same temperature, same counts, same de-duplication.
    b = PartitionedHistory(RULE, tmp_path, dedup_window=100, snapshot_every=2)
    state = b.assign(0)
    assert state.position == 42
    np.testing.assert_allclose(state.store.temperatures(["p0"]), [1.2], atol=1e-6)
    assert state.store.to_frame()["times_seen"].to_list() == [2]
    assert b.classify(0, "e0-000001", 0) == "duplicate" and b.classify(0, "e0-000001", 2) == "send"
    assert b.classify(0, "e0-000002", 0) == "apply"
    tables = load_tables(tmp_path)
    assert tables["partition"].to_list() == [0] and tables["prompt_id"].to_list() == ["p0"]


def _scored_rows(rows):
    """Lake rows of the scored topic: (partition, offset, ticket, group, prompt, pass rate)."""
    return pl.DataFrame({"_partition": [r[0] for r in rows], "_offset": [r[1] for r in rows],
                         "ticket_id": [r[2] for r in rows], "group_id": [r[3] for r in rows],
                         "prompt_id": [r[4] for r in rows], "group_pass_rate": [r[5] for r in rows],
                         "policy_version": [0] * len(rows)})


def test_rebuild_takes_each_tickets_first_group_in_offset_order():
    # Partition 0: p0 all-correct twice (t1, t2), t1 scored again after a restart (offset 7) and a
    # later attempt of t2 (offset 9, another group); rows of one group repeat (one per sample).
    rows = [(0, 3, "t1", "g1", "p0", 1.0), (0, 3, "t1", "g1", "p0", 1.0), (0, 5, "t2", "g2", "p0", 1.0),
            (0, 7, "t1", "g1b", "p0", 0.0), (0, 9, "t2", "g2b", "p0", 0.5), (1, 0, "t3", "g3", "p1", 0.5)]
    table = rebuild_from_scored(_scored_rows(rows), RULE).sort("prompt_id")
    assert table["times_seen"].to_list() == [2, 1]
    assert table["pass_rates"].to_list() == [[1.0, 1.0], [0.5]]
    np.testing.assert_allclose(table["temperature"].to_numpy(), [1.2, 1.0], atol=1e-6)
    # Out-of-order rows are put back in offset order first.
    shuffled = _scored_rows(rows[::-1])
    assert rebuild_from_scored(shuffled, RULE).sort("prompt_id")["pass_rates"].to_list() == [[1.0, 1.0], [0.5]]
