"""The reward service's (and the recorder's) loop in-process, on the in-memory transport tier: trajectories in, scored
groups and ERPO temperatures out, a ticket's second group scored but not counted twice, a hostile
record dead-lettered, commits that follow the per-partition snapshots, and a second worker taking
half of the partitions with their state. (The real-broker and kill tests of the same service are
in tests/integration and tests/faults.)"""

from __future__ import annotations

import uuid
import zlib

import numpy as np
import pytest

from factories import trajectory_group
from pipeline.config import RunConfig
from pipeline.transport.consumer import Consumer
from pipeline.transport.memory import MemoryBroker
from pipeline.transport.producer import Producer
from pipeline.transport.topics import ensure_topics, topic_name
from pipeline.verify.verifier import VerifierPool
from schemas import TRAJECTORY, encode, headers_for
from services.reward import Reward

PARTS = 4


@pytest.fixture()
def cfg(tmp_path) -> RunConfig:
    cfg = RunConfig.model_validate({
        "name": "r", "workdir": str(tmp_path),
        "kafka": {"bootstrap_servers": f"memory://{uuid.uuid4().hex[:8]}", "poll_stall_timeout_s": 0},
        "metrics": {"enabled": False}, "reward": {"verifier_workers": 0, "poll_timeout_ms": 10},
        "erpo": {"snapshot_every": 1}})
    ensure_topics(cfg.kafka, "r", partitions={"trajectories": PARTS})
    yield cfg
    MemoryBroker.reset()


def _send(cfg, groups) -> None:
    p = Producer(cfg.kafka, "rollout")
    for g in groups:
        p.send(topic_name("r", "trajectories"), TRAJECTORY, g, key=str(g["prompt_id"][0]).encode())
    p.flush()


def _read(cfg, topic: str) -> list:
    c = Consumer(cfg.kafka, "r", [topic], group_id=None, client_id=f"read-{topic}", deadletter=None)
    return [d for _ in range(3) for d in c.poll(timeout_ms=5)]


def _steps(worker: Reward, n: int = 4) -> None:
    with VerifierPool(0, 5.0, 4000) as pool:
        for _ in range(n):
            worker.step(pool)


def test_scores_shapes_and_emits_temperatures_once_per_ticket(cfg):
    correct = trajectory_group("e0-000001", "p1")  # 4 x "3" against 3: all correct
    mixed = trajectory_group("e0-000002", "p2", texts=["3", "4", "3", "x"])
    again = trajectory_group("e0-000001", "p1", attempt=1)  # the same ticket re-issued: counted once
    _send(cfg, [correct, mixed, again])
    p = Producer(cfg.kafka, "hostile")
    p.send_raw(topic_name("r", "trajectories"), b"garbage", headers_for(TRAJECTORY), key=b"p9")
    p.flush()
    worker = Reward(cfg, 0)
    _steps(worker)

    scored = _read(cfg, "scored")
    by_ticket = {}
    for d in scored:
        by_ticket.setdefault((d.columns["ticket_id"][0], int(d.columns["attempt"][0])), d.columns)
    assert set(by_ticket) == {("e0-000001", 0), ("e0-000002", 0), ("e0-000001", 1)}
    m = by_ticket[("e0-000002", 0)]
    assert m["reward"].tolist() == [1, 0, 1, 0] and m["verify_status"].tolist()[1:] == ["wrong", "correct", "no_answer"]
    assert np.allclose(m["group_pass_rate"], 0.5)
    c = by_ticket[("e0-000001", 0)]
    assert np.allclose(c["group_pass_rate"], 1.0) and c["reward"].tolist() == [1, 1, 1, 1]
    temps = _read(cfg, "temperature")
    raised = [d for d in temps if d.columns["prompt_id"][0] == "p1"]
    assert len(raised) == 1 and raised[0].columns["reason"][0] == "all_correct_raise"  # once, not per attempt
    assert raised[0].columns["temperature"][0] == pytest.approx(cfg.erpo.tau0 + cfg.erpo.delta_tau)
    dead = _read(cfg, "deadletter")
    assert len(dead) == 1 and dead[0].columns["payload"][0] == b"garbage"
    # commits follow the snapshots: the group's committed offsets are every record's
    worker._snapshot(sorted(worker.history.parts))
    probe = Consumer(cfg.kafka, "r", ["trajectories"], group_id="r.reward", client_id="probe", deadletter=None)
    assert probe.poll(timeout_ms=5) == []  # nothing left uncommitted for the group
    assert worker.groups == 2 and worker.consumer.stats["deadlettered"] == 1


def test_a_second_worker_takes_half_the_partitions_with_their_state(cfg):
    prompts = [f"p{i}" for i in range(12)]
    _send(cfg, [trajectory_group(f"e0-{i:06d}", p) for i, p in enumerate(prompts)])
    first = Reward(cfg, 0)
    _steps(first)
    assert sorted(first.history.parts) == list(range(PARTS)) and len(first.history) == 12
    second = Reward(cfg, 1)
    _steps(second, 1)  # joins: a new generation
    _steps(first, 1)  # hands over half, snapshotted
    _steps(second, 2)  # takes them from the snapshots
    mine, theirs = set(first.history.parts), set(second.history.parts)
    assert mine | theirs == set(range(PARTS)) and not mine & theirs and mine and theirs
    assert len(first.history) + len(second.history) == 12  # no prompt lost, none in both
    # the next groups of the moved prompts land on the second worker, which knows their history
    _send(cfg, [trajectory_group(f"e1-{i:06d}", p) for i, p in enumerate(prompts)])
    _steps(first, 2)
    _steps(second, 2)
    temps = [d for d in _read(cfg, "temperature")]
    times_seen = {}
    for d in temps:
        times_seen[d.columns["prompt_id"][0]] = max(times_seen.get(d.columns["prompt_id"][0], 0),
                                                    int(d.columns["times_seen"][0]))
    assert set(times_seen) == set(prompts) and set(times_seen.values()) == {2}


def test_a_failed_step_commits_nothing_and_saves_no_state(cfg, monkeypatch):
    """The client revokes on close (kafka-python does, and so does the memory broker): after a
    failed step that must not snapshot and commit positions past results never sent."""
    from pipeline.transport.clients import TransportError

    _send(cfg, [trajectory_group(f"e0-{i:06d}", f"p{i}") for i in range(6)])
    worker = Reward(cfg, 0)

    def broker_gone(*args, **kwargs):
        raise TransportError("sends not acknowledged in time")

    monkeypatch.setattr(worker.producer, "flush", broker_gone)
    with pytest.raises(TransportError):
        worker.run()
    assert worker.failed and not list((cfg.workdir / "erpo").glob("trajectories-p*.parquet"))
    again = Reward(cfg, 1)  # the group's next member redoes every record
    _steps(again)
    assert again.groups == 6


def test_a_group_under_another_prompts_key_is_dead_lettered_not_scored(cfg):
    # One record keyed "p1" carrying a group of p1 and one of p2 (a multi-prompt record), and one
    # keyed "p3" carrying p4's group: p2's and p4's ERPO history would start in a partition their
    # own key does not hash to. Only p1's group is scored; the others are dead-lettered as miskeyed.
    from schemas import concat

    both = concat([trajectory_group("e0-000001", "p1"), trajectory_group("e0-000002", "p2")])
    p = Producer(cfg.kafka, "rollout")
    p.send(topic_name("r", "trajectories"), TRAJECTORY, both, key=b"p1")
    p.send(topic_name("r", "trajectories"), TRAJECTORY, trajectory_group("e0-000003", "p4"), key=b"p3")
    p.flush()
    worker = Reward(cfg, 0)
    _steps(worker)
    scored = _read(cfg, "scored")
    assert sorted({d.columns["prompt_id"][0] for d in scored}) == ["p1"]
    dead = _read(cfg, "deadletter")
    assert sorted(d.columns["reason"][0].split(":")[0] for d in dead) == ["miskeyed", "miskeyed"]
    assert worker.groups == 1


def test_a_group_with_its_own_key_in_another_partition_is_dead_lettered_not_scored(cfg):
    # The right key, but a producer chose the partition: p1's ERPO history would start a second
    # time in a partition its key does not hash to (before: scored and applied there).
    topic = topic_name("r", "trajectories")
    broker = MemoryBroker.named(cfg.kafka.bootstrap_servers)
    home = zlib.crc32(b"p1") % broker.partitions_of(topic)
    g = trajectory_group("e0-000001", "p1")
    broker.append(topic, b"p1", encode(TRAJECTORY, g), headers_for(TRAJECTORY),
                  partition=(home + 1) % broker.partitions_of(topic))
    p = Producer(cfg.kafka, "rollout")
    p.send(topic, TRAJECTORY, trajectory_group("e0-000002", "p1"), key=b"p1")  # the same prompt, at home
    p.flush()
    worker = Reward(cfg, 0)
    _steps(worker)
    assert [d.columns["ticket_id"][0] for d in _read(cfg, "scored")] == ["e0-000002"]
    (dead,) = _read(cfg, "deadletter")
    assert dead.columns["reason"][0].startswith(f"miskeyed: key b'p1' belongs in partition {home}")
    assert worker.groups == 1


def test_a_record_the_recorder_cannot_write_is_kept_as_bytes_in_the_lake(cfg, monkeypatch):
    # A trajectory that decodes but whose lake write raises: before, the recorder logged it and
    # committed past it; the lake lost it with no trace. Now its bytes are in the lake's
    # unrecorded-trajectories table and the reconciliation counts it.
    from pipeline.lake.store import LakeWriter, read_topic, unrecorded_table
    from services import recorder

    _send(cfg, [trajectory_group("e0-000001", "p1"), trajectory_group("e0-000002", "p2")])
    real_add = LakeWriter.add

    def add(self, topic, columns, partition, offset, timestamp_ms):
        if topic == "trajectories" and columns["ticket_id"][0] == "e0-000002":
            raise OSError("no space left on device")
        return real_add(self, topic, columns, partition, offset, timestamp_ms)

    monkeypatch.setattr(LakeWriter, "add", add)
    recorder.run(cfg, 0, stop=True)
    lake = cfg.workdir / "lake"
    assert read_topic(lake, "trajectories")["ticket_id"].unique().to_list() == ["e0-000001"]
    [kept] = read_topic(lake, unrecorded_table("trajectories")).iter_rows(named=True)
    assert kept["source_topic"] == "r.trajectories" and kept["reason"].startswith("unrecordable: OSError")
    sent = [d for d in _read(cfg, "trajectories") if d.columns["ticket_id"][0] == "e0-000002"]
    assert kept["payload"] == sent[0].value and kept["payload_bytes"] == len(sent[0].value)
    assert (kept["_partition"], kept["_offset"]) == (sent[0].partition, sent[0].offset)
