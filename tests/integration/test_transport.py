"""Producer/consumer against the real Tansu broker: offsets, consumer groups, dead letters."""

from __future__ import annotations

import time

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from pipeline.config import KafkaConfig
from pipeline.transport.clients import TransportError, client_kwargs
from pipeline.transport.consumer import Consumer, Delivery
from pipeline.transport.producer import Producer
from pipeline.transport.topics import ensure_topics, topic_name
from schemas import (
    DEAD_LETTER,
    TEMPERATURE_UPDATE,
    TRAJECTORY,
    Columns,
    Ragged,
    encode,
    headers_for,
)

pytestmark = pytest.mark.integration


def trajectories(tag: str, n: int = 2) -> Columns:
    """A message of `n` trajectory rows whose traj_ids are `<tag>-<i>`."""
    s = lambda v: np.array([v] * n, dtype=object)  # noqa: E731
    return {
        "traj_id": np.array([f"{tag}-{i}" for i in range(n)], dtype=object),
        "group_id": s(f"g-{tag}"),
        "ticket_id": s(f"t-{tag}"),
        "attempt": np.zeros(n, dtype=np.int32),
        "prompt_id": s(f"p-{tag}"),
        "sample_idx": np.arange(n, dtype=np.int32),
        "group_size": np.full(n, n, dtype=np.int32),
        "policy_version": np.zeros(n, dtype=np.int64),
        "temperature": np.ones(n, dtype=np.float32),
        "prompt_text": s("What is 2+2?"),
        "prompt_token_ids": Ragged.from_list([[3838, 374, 220, 17]] * n, np.int32),
        "completion_token_ids": Ragged.from_list([[19] * i for i in range(n)], np.int32),
        "behavior_logprobs": Ragged.from_list([[-0.5] * i for i in range(n)], np.float32),
        "completion_text": s("4"),
        "finish_reason": s("stop"),
        "answer": s("4"),
        "created_at": np.full(n, 1.7e9),
    }


def temperature_update(prompt_id: str, temperature: float) -> Columns:
    return {
        "prompt_id": np.array([prompt_id], dtype=object),
        "temperature": np.array([temperature], dtype=np.float32),
        "reason": np.array(["all_correct_raise"], dtype=object),
        "times_seen": np.array([1], dtype=np.int32),
        "mean_pass_rate": np.array([1.0], dtype=np.float32),
        "all_correct_streak": np.array([1], dtype=np.int32),
        "decided_at_version": np.array([0], dtype=np.int64),
        "decided_at": np.array([1.7e9]),
    }


def poll_until(consumer: Consumer, n: int, timeout_s: float = 30) -> list[Delivery]:
    """Poll until `n` deliveries arrived (fails the test otherwise), then check nothing more comes."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} deliveries after {timeout_s}s"
        got += consumer.poll(timeout_ms=200)
    got += consumer.poll(timeout_ms=500)
    assert len(got) == n, f"expected {n} deliveries, got {len(got)}"
    return got


def traj_tags(deliveries: list[Delivery]) -> list[str]:
    return [tid for d in deliveries for tid in d.columns["traj_id"].tolist()]


def test_group_commit_resumes_after_committed_offsets(kafka_cfg: KafkaConfig, run_name: str) -> None:
    ensure_topics(kafka_cfg, run_name)
    ensure_topics(kafka_cfg, run_name)  # idempotent
    producer = Producer(kafka_cfg, "test-producer")
    topic = topic_name(run_name, "trajectories")
    first = [f"a{i}" for i in range(8)]
    second = [f"b{i}" for i in range(6)]
    for tag in first:
        producer.send(topic, TRAJECTORY, trajectories(tag), key=tag.encode())
    producer.flush()
    assert producer.stats == {topic: 8}

    group = f"{run_name}-reward"
    a = Consumer(kafka_cfg, run_name, ["trajectories"], group, "reward-a", deadletter=None)
    got = poll_until(a, 8)
    assert sorted(traj_tags(got)) == sorted(f"{t}-{i}" for t in first for i in range(2))
    for d in got:
        assert d.topic == "trajectories" and d.kind is TRAJECTORY and d.key == d.columns["prompt_id"][0][2:].encode()
        assert d.columns["behavior_logprobs"][1].tolist() == [-0.5]
    last = {}
    for d in got:
        last[(d.topic, d.partition)] = max(last.get((d.topic, d.partition), -1), d.offset)
    expected = {tp: off + 1 for tp, off in last.items()}
    assert a.positions() == expected
    a.commit()
    # the reward's routing check computes where the producer's partitioner put every key
    assert all(d.partition == a.home_partition("trajectories", d.key) for d in got)

    # What the broker holds for the group is exactly what commit() said.
    probe = KafkaConsumer(group_id=group, **client_kwargs(kafka_cfg, "consumer"))
    try:
        for (t, p), off in expected.items():
            assert probe.committed(TopicPartition(topic_name(run_name, t), p)) == off
    finally:
        probe.close(autocommit=False)

    for tag in second:
        producer.send(topic, TRAJECTORY, trajectories(tag), key=tag.encode())
    producer.flush()
    assert sorted(traj_tags(poll_until(a, 6))) == sorted(f"{t}-{i}" for t in second for i in range(2))
    a.close()  # second batch consumed but not committed

    b = Consumer(kafka_cfg, run_name, ["trajectories"], group, "reward-b", deadletter=None)
    redelivered = poll_until(b, 6)
    assert sorted(traj_tags(redelivered)) == sorted(f"{t}-{i}" for t in second for i in range(2))
    b.commit()
    b.close()
    producer.close()


def test_undecodable_records_go_to_deadletter_and_consumption_continues(kafka_cfg: KafkaConfig, run_name: str) -> None:
    ensure_topics(kafka_cfg, run_name)
    producer = Producer(kafka_cfg, "test-producer")
    topic = topic_name(run_name, "trajectories")
    key = b"same-partition"
    garbage = bytes(np.random.default_rng(7).integers(0, 256, 300, dtype=np.uint8))
    good_payload = encode(TRAJECTORY, trajectories("x"))
    bad_version = [("schema", b"Trajectory"), ("schema_version", b"99")]
    futures = [
        producer.send(topic, TRAJECTORY, trajectories("v0"), key=key),
        producer.send_raw(topic, garbage, headers_for(TRAJECTORY), key=key),
        producer.send(topic, TRAJECTORY, trajectories("v1"), key=key),
        producer.send_raw(topic, good_payload, bad_version, key=key),
        producer.send(topic, TRAJECTORY, trajectories("v2"), key=key),
        producer.send_raw(topic, good_payload, [], key=key),  # no headers at all, and last
    ]
    producer.flush()
    meta = [f.get(timeout=10) for f in futures]
    partition = meta[0].partition
    assert {m.partition for m in meta} == {partition}
    offsets = [m.offset for m in meta]

    dl_producer = Producer(kafka_cfg, "test-deadletter")
    consumer = Consumer(kafka_cfg, run_name, ["trajectories"], f"{run_name}-g", "reward", deadletter=dl_producer)
    got = poll_until(consumer, 3)
    assert [d.columns["traj_id"][0] for d in got] == ["v0-0", "v1-0", "v2-0"]
    assert [d.offset for d in got] == [offsets[0], offsets[2], offsets[4]]
    assert consumer.stats == {"delivered": 3, "deadlettered": 3, "dropped": 0}
    # The dead-lettered last record counts as handled.
    assert consumer.positions() == {("trajectories", partition): offsets[5] + 1}
    consumer.commit()
    consumer.close()

    reader = Consumer(kafka_cfg, run_name, ["deadletter"], None, "operator", deadletter=None)
    dead = poll_until(reader, 3)
    assert all(d.kind is DEAD_LETTER for d in dead)
    rows = [{k: v[0] for k, v in d.columns.items()} for d in dead]
    rows.sort(key=lambda r: r["source_offset"])
    assert [r["source_offset"] for r in rows] == [offsets[1], offsets[3], offsets[5]]
    assert all(r["source_topic"] == topic and r["source_partition"] == partition for r in rows)
    assert rows[0]["reason"].startswith("undecodable: ")
    assert rows[0]["payload"] == garbage
    assert (rows[0]["schema_header"], rows[0]["schema_version_header"]) == ("Trajectory", str(TRAJECTORY.version))
    assert rows[1]["reason"].startswith("unknown_version: ")
    assert rows[1]["payload"] == good_payload
    assert (rows[1]["schema_header"], rows[1]["schema_version_header"]) == ("Trajectory", "99")
    assert rows[2]["reason"].startswith("missing_header: ")
    assert (rows[2]["schema_header"], rows[2]["schema_version_header"]) == (None, None)
    reader.close()
    producer.close()
    dl_producer.close()


def test_without_group_every_partition_is_read_from_the_beginning(kafka_cfg: KafkaConfig, run_name: str) -> None:
    ensure_topics(kafka_cfg, run_name)
    producer = Producer(kafka_cfg, "test-reward")
    topic = topic_name(run_name, "temperature")
    prompts = [f"prompt-{i}" for i in range(16)]
    futures = {p: producer.send(topic, TEMPERATURE_UPDATE, temperature_update(p, 1.1), key=p.encode()) for p in prompts}
    producer.flush()
    placed = {p: f.get(timeout=10).partition for p, f in futures.items()}
    assert len(set(placed.values())) == 4  # the keys spread over all four partitions

    # Two independent readers (e.g. two rollout processes) each see every update.
    for client in ("rollout-0", "rollout-1"):
        reader = Consumer(kafka_cfg, run_name, ["temperature"], None, client, deadletter=None)
        got = poll_until(reader, 16)
        assert {d.columns["prompt_id"][0]: d.partition for d in got} == placed
        assert all(d.kind is TEMPERATURE_UPDATE and d.columns["temperature"][0] == np.float32(1.1) for d in got)
        with pytest.raises(TransportError, match="group"):
            reader.commit()
        reader.close()
    producer.close()


@pytest.mark.parametrize("group", [False, True])
def test_seek_restores_positions(kafka_cfg: KafkaConfig, run_name: str, group: bool) -> None:
    """Without a group a consumer seeks itself; a group member continues where `on_assign` says
    (how a service restores partition state) and tells `on_revoke` what it hands back."""
    ensure_topics(kafka_cfg, run_name)
    producer = Producer(kafka_cfg, "test-learner")
    topic = topic_name(run_name, "trajectories")
    for i in range(5):
        producer.send(topic, TRAJECTORY, trajectories(f"s{i}", n=1), key=b"k")
    producer.flush()
    partition = producer.send(topic, TRAJECTORY, trajectories("s5", n=1), key=b"k").get(timeout=10).partition
    producer.flush()

    revoked = []
    hooks = dict(on_assign=lambda parts: {p: 4 for p in parts if p == ("trajectories", partition)},
                 on_revoke=revoked.extend) if group else {}
    consumer = Consumer(
        kafka_cfg, run_name, ["trajectories"], f"{run_name}-g" if group else None, "reader", deadletter=None, **hooks
    )
    if not group:
        consumer.seek({("trajectories", partition): 4})
    got = poll_until(consumer, 2)
    assert traj_tags(got) == ["s4-0", "s5-0"]
    assert consumer.positions() == {("trajectories", partition): 6}
    consumer.close()
    producer.close()


def test_records_the_client_cannot_read_are_dead_lettered_and_skipped(kafka_cfg: KafkaConfig, run_name: str) -> None:
    """A corrupt batch, a codec whose library is missing, a header key that is not UTF-8: kafka-python
    raises at the same offset on every poll. The consumer finds the partition, dead-letters the
    offset with the reason and goes on; records around them arrive."""
    from kafka import KafkaProducer

    from hostile import UNREADABLE, send_unreadable

    ensure_topics(kafka_cfg, run_name, partitions={"trajectories": 2})
    topic = topic_name(run_name, "trajectories")
    raw = KafkaProducer(bootstrap_servers=kafka_cfg.bootstrap_servers, linger_ms=0)
    good = encode(TRAJECTORY, trajectories("g", n=1))
    sent, bad = [], {}
    for i, kind in enumerate(UNREADABLE):
        sent.append(raw.send(topic, value=good, key=b"k", headers=headers_for(TRAJECTORY)).get(timeout=10))
        meta = send_unreadable(raw, topic, kind, good, headers_for(TRAJECTORY), key=b"k")
        bad[(meta.partition, meta.offset)] = kind
    sent.append(raw.send(topic, value=good, key=b"other", headers=headers_for(TRAJECTORY)).get(timeout=10))
    raw.flush()
    raw.close()
    dlq = Producer(kafka_cfg, "dlq")
    consumer = Consumer(kafka_cfg, run_name, ["trajectories"], f"{run_name}-g", "reader", deadletter=dlq)
    got = poll_until(consumer, len(sent), timeout_s=60)
    assert sorted((d.partition, d.offset) for d in got) == sorted((m.partition, m.offset) for m in sent)
    assert consumer.stats["deadlettered"] == len(UNREADABLE)
    dead = Consumer(kafka_cfg, run_name, ["deadletter"], None, "dlq-reader", deadletter=None)
    letters = poll_until(dead, len(UNREADABLE))
    found = {(int(d.columns["source_partition"][0]), int(d.columns["source_offset"][0])): d.columns["reason"][0]
             for d in letters}
    assert set(found) == set(bad)
    assert all(r.startswith("unreadable_record: ") for r in found.values()), found
    assert all(d.columns["payload_bytes"][0] == -1 for d in letters)
    for c in (consumer, dead):
        c.close()
    dlq.close()


def test_a_record_that_breaks_processing_is_dead_lettered_whole_and_cut_to_fit(kafka_cfg: KafkaConfig,
                                                                               run_name: str) -> None:
    """`guard`: whatever one record's processing raises sends that record to the dead letters (its
    bytes cut to fit a request, with the whole size and sha256) and the loop goes on."""
    import hashlib

    cfg = kafka_cfg.model_copy(update={"max_message_bytes": 300_000})
    ensure_topics(cfg, run_name)
    producer = Producer(cfg, "p")
    topic = topic_name(run_name, "trajectories")
    big = trajectories("big", n=1)
    big["completion_text"] = np.array(["x" * 250_000], dtype=object)
    for cols in (trajectories("a", n=1), big, trajectories("b", n=1)):
        producer.send(topic, TRAJECTORY, cols, key=b"k")
    producer.flush()
    consumer = Consumer(cfg, run_name, ["trajectories"], f"{run_name}-g", "reader", deadletter=producer)
    seen = []
    for d in poll_until(consumer, 3):
        with consumer.guard(d):
            if d.columns["traj_id"][0] == "big-0":
                raise ZeroDivisionError("the service's own bug")
            seen.append(d.columns["traj_id"][0])
    producer.flush()
    assert seen == ["a-0", "b-0"]
    dead = Consumer(cfg, run_name, ["deadletter"], None, "dlq-reader", deadletter=None)
    [letter] = poll_until(dead, 1)
    original = [d for d in got_values(cfg, run_name) if len(d) > 200_000][0]
    row = {k: v[0] for k, v in letter.columns.items()}
    assert row["reason"].startswith("apply_failed: ZeroDivisionError: the service's own bug")
    assert row["payload_bytes"] == len(original) > len(row["payload"]) > 0
    assert row["payload_sha256"] == hashlib.sha256(original).hexdigest() and original.startswith(row["payload"])
    for c in (consumer, dead):
        c.close()
    producer.close()


def got_values(cfg: KafkaConfig, run: str) -> list[bytes]:
    reader = Consumer(cfg, run, ["trajectories"], None, "values", deadletter=None)
    values = [d.value for d in poll_until(reader, 3)]
    reader.close()
    return values


def test_producer_refuses_a_kind_on_the_wrong_topic(kafka_cfg: KafkaConfig, run_name: str) -> None:
    producer = Producer(kafka_cfg, "test")
    with pytest.raises(ValueError, match="PolicyUpdate"):
        producer.send(topic_name(run_name, "policy"), TRAJECTORY, trajectories("x"))
    producer.close()


def test_on_revoke_commits_before_the_partitions_go_at_a_rebalance_and_at_close(kafka_cfg: KafkaConfig,
                                                                               run_name: str) -> None:
    """What the reward service does: `on_revoke` snapshots its partitions and commits their offsets.
    kafka-python 3 runs rebalance listeners on its IO loop, where a blocking commit is refused
    ("Cannot block on net.run() from the IO thread"): the commit a hook asks for must still land,
    at a rebalance (a second member joins) and when the member closes."""
    ensure_topics(kafka_cfg, run_name)
    producer = Producer(kafka_cfg, "test")
    topic = topic_name(run_name, "trajectories")
    for i in range(12):
        producer.send(topic, TRAJECTORY, trajectories(f"s{i}", n=1), key=f"k{i}".encode())
    producer.flush()
    producer.close()
    group = f"{run_name}-g"
    revoked: dict[str, list] = {"a": [], "b": []}

    def member(name: str) -> Consumer:
        c: Consumer

        def on_revoke(parts):
            revoked[name].extend(parts)
            assert c.commit_offsets({p: o for p, o in c.positions().items() if p in parts})

        c = Consumer(kafka_cfg, run_name, ["trajectories"], group, name, deadletter=None, on_revoke=on_revoke)
        return c

    a = member("a")
    got = poll_until(a, 12)
    assert len(got) == 12 and not revoked["a"]
    b = member("b")  # joins: the group rebalances and `a` hands over its partitions first
    deadline = time.monotonic() + 30
    while not revoked["a"] and time.monotonic() < deadline:
        a.poll(timeout_ms=200)
        b.poll(timeout_ms=200)
    assert revoked["a"], "the rebalance never revoked a's partitions"
    probe = KafkaConsumer(bootstrap_servers=kafka_cfg.bootstrap_servers, group_id=group, enable_auto_commit=False)
    try:
        parts = probe.partitions_for_topic(topic) or set()
        assert sum(probe.committed(TopicPartition(topic, p)) or 0 for p in parts) == 12
    finally:
        probe.close()
    a.close()  # a revoke at close commits too (here: its new partitions, nothing new to commit)
    b.close()
    assert revoked["b"] or revoked["a"]


def test_an_error_in_a_partition_hook_is_the_services_not_a_records(kafka_cfg: KafkaConfig, run_name: str) -> None:
    """`on_assign` raising (a state store that cannot be restored) reaches the service from `poll`
    as it was raised; no record is taken for unreadable and skipped."""
    ensure_topics(kafka_cfg, run_name)
    producer = Producer(kafka_cfg, "test")
    producer.send(topic_name(run_name, "trajectories"), TRAJECTORY, trajectories("s0", n=1), key=b"k")
    producer.flush()
    producer.close()

    def on_assign(parts):
        raise OSError("snapshot unreadable")

    c = Consumer(kafka_cfg, run_name, ["trajectories"], f"{run_name}-g", "hooked", deadletter=None,
                 on_assign=on_assign)
    with pytest.raises(OSError, match="snapshot unreadable"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            c.poll(timeout_ms=200)
    assert c.stats["dropped"] == 0
    c.close()
