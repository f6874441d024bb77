"""The lake: partitioned Parquet files per (topic, version), read back de-duplicated."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.lake import report as q
from pipeline.lake.store import LakeWriter, read_topic, topics_in


def _policy(version: int) -> dict:
    return {"version": np.array([version], np.int64), "step": np.array([version], np.int64),
            "uri": np.array([f"/p/v{version}"], object), "sha256": np.array(["0" * 64], object),
            "dtype": np.array(["float32"], object), "created_at": np.array([float(version)])}


def _ticket(i: int, version: int) -> dict:
    return {"ticket_id": np.array([f"t{i}"], object), "attempt": np.array([0], np.int32),
            "prompt_id": np.array([f"p{i % 3}"], object),
            "text": np.array(["1+1="], object), "answer": np.array(["2"], object), "epoch": np.array([0], np.int32),
            "issued_version": np.array([version], np.int64), "issued_at": np.array([0.0])}


def test_partitions_and_rereading_after_a_rerecord(tmp_path):
    w = LakeWriter(tmp_path, "0")
    for i in range(6):
        w.add("prompts", _ticket(i, version=i // 2), partition=i % 2, offset=i, timestamp_ms=1000 + i)
    w.add("policy", _policy(1), partition=0, offset=0, timestamp_ms=1500)
    assert w.buffered_rows == 7 and w.buffered_bytes > 0
    paths = w.flush()
    assert w.buffered_rows == 0 and w.written_rows == 7
    assert sorted(p.parent.name for p in paths) == ["version=0", "version=1", "version=1", "version=2"]
    assert not list(tmp_path.rglob("*.tmp"))
    # A recorder that died before committing records offsets 4 and 5 again, in a later file.
    w2 = LakeWriter(tmp_path, "0")
    for i in (4, 5):
        w2.add("prompts", _ticket(i, version=i // 2), partition=i % 2, offset=i, timestamp_ms=1000 + i)
    w2.flush()
    df = read_topic(tmp_path, "prompts")
    assert df["ticket_id"].to_list() == [f"t{i}" for i in range(6)]  # once each, in broker time order
    assert df["version"].to_list() == [0, 0, 1, 1, 2, 2]
    assert topics_in(tmp_path) == ["policy", "prompts"]
    assert read_topic(tmp_path, "scored").is_empty()


def test_report_queries_by_hand():
    scored = pl.DataFrame({
        "group_id": ["a", "a", "b", "b", "c", "c"], "prompt_id": ["p", "p", "q", "q", "p", "p"],
        "policy_version": [0, 0, 1, 1, 3, 3], "group_pass_rate": [1.0, 1.0, 0.5, 0.5, 0.0, 0.0],
        "reward": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], "temperature": [1.0, 1.0, 1.0, 1.0, 1.1, 1.1],
        "_timestamp_ms": [10, 10, 20, 20, 40, 40],
    })
    g = q.groups(scored)
    assert g["pass_rate"].to_list() == [1.0, 0.5, 0.0] and g["reward"].to_list() == [1.0, 0.5, 0.0]
    v = q.by_version(g, width=2)  # bins 0 (versions 0, 1) and 2 (version 3)
    assert v["groups"].to_list() == [2, 1]
    assert v["reward"].to_list() == [0.75, 0.0]
    assert v["all_correct"].to_list() == [0.5, 0.0] and v["all_wrong"].to_list() == [0.0, 1.0]
    assert v["hot_share"].to_list() == [0.0, 1.0]
    # policies v1 at t=15 and v3 at t=30: group b (v1, t=20) lag 0; c (v3, t=40) lag 0; a (t=10) none yet
    policy = pl.DataFrame({"_timestamp_ms": [15, 30], "version": [1, 3]})
    lags = q.staleness(g, policy).sort("time_ms")
    assert lags["lag"].to_list() == [0, 0, 0]
    policy = pl.DataFrame({"_timestamp_ms": [5, 30], "version": [2, 4]})  # newer weights out already
    assert q.staleness(g, policy).sort("time_ms")["lag"].to_list() == [2, 1, 1]
    mine, updates = q.lineage(g, pl.DataFrame({"prompt_id": ["p"], "_timestamp_ms": [12], "temperature": [1.1],
                                               "reason": ["all_correct_raise"], "decided_at_version": [0]}), "p")
    assert mine["group_id"].to_list() == ["a", "c"] and updates["temperature"].to_list() == [1.1]
