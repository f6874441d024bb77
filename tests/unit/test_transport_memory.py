"""The in-memory transport tier (`kafka.bootstrap_servers = "memory://..."`): the real `Producer`,
`Consumer` and `ensure_topics` on an in-process broker, with Kafka's group semantics where the
services depend on them."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from factories import trajectory_group
from pipeline.config import KafkaConfig
from pipeline.transport.consumer import Consumer
from pipeline.transport.memory import MemoryBroker
from pipeline.transport.producer import Producer
from pipeline.transport.topics import ensure_topics, topic_name
from schemas import TRAJECTORY, Ragged, encode, headers_for
from schemas.codec import declared_bytes


@pytest.fixture()
def mem():
    cfg = KafkaConfig(bootstrap_servers=f"memory://{uuid.uuid4().hex[:8]}", poll_stall_timeout_s=0)
    ensure_topics(cfg, "r", partitions={"trajectories": 4})
    yield cfg
    MemoryBroker.reset()


def _send(cfg, n: int, key_of=lambda i: f"p{i}".encode()) -> list[str]:
    p = Producer(cfg, "test")
    ids = []
    for i in range(n):
        g = trajectory_group(f"e0-{i:06d}", f"p{i}")
        ids.append(g["ticket_id"][0])
        p.send(topic_name("r", "trajectories"), TRAJECTORY, g, key=key_of(i))
    p.flush()
    return ids


def _drain(c: Consumer, polls: int = 3) -> list:
    out = []
    for _ in range(polls):
        out += c.poll(timeout_ms=10)
    return out


def test_topics_are_made_through_the_admin_client_that_clients_for_picks(mem, caplog):
    # A memory:// address gets the in-memory clients, any other address kafka-python's; topic
    # creation and `rlstream topics` then go through the admin client as they do on Kafka: an
    # existing topic keeps its partition count (the mismatch is logged), a missing one has none.
    from pipeline.transport.clients import KafkaClients, MemoryClients, clients_for
    from services.topics import partitions_now

    assert isinstance(clients_for(mem), MemoryClients)
    assert isinstance(clients_for(KafkaConfig(bootstrap_servers="localhost:9092")), KafkaClients)
    ensure_topics(mem, "r", partitions={"trajectories": 2})  # the fixture made it with 4
    assert "has 4 partitions, wanted 2 (kept as is)" in caplog.text
    names = [topic_name("r", t) for t in ("trajectories", "policy", "nowhere")]
    assert partitions_now(mem, names) == {names[0]: 4, names[1]: 1, names[2]: 0}


def test_messages_round_trip_with_headers_keys_and_one_partition_per_key(mem):
    ids = _send(mem, 12)
    c = Consumer(mem, "r", ["trajectories"], group_id="g", client_id="c", deadletter=None)
    got = _drain(c)
    assert sorted(d.columns["ticket_id"][0] for d in got) == sorted(ids)
    assert all(d.topic == "trajectories" and d.kind.name == "Trajectory" for d in got)
    assert dict(got[0].headers) == dict(headers_for(TRAJECTORY))
    by_key = {}
    for d in got:
        by_key.setdefault(d.key, set()).add(d.partition)
    assert all(len(parts) == 1 for parts in by_key.values()) and len({d.partition for d in got}) > 1
    assert sum(c.positions().values()) == 12


def test_a_group_resumes_from_its_commits_and_a_groupless_reader_from_the_beginning(mem):
    _send(mem, 6)
    c = Consumer(mem, "r", ["trajectories"], group_id="g", client_id="c", deadletter=None)
    assert len(_drain(c)) == 6 and c.commit()
    c.close()
    _send(mem, 3, key_of=lambda i: f"q{i}".encode())
    again = Consumer(mem, "r", ["trajectories"], group_id="g", client_id="c2", deadletter=None)
    assert len(_drain(again)) == 3  # only what came after the commit
    reader = Consumer(mem, "r", ["trajectories"], group_id=None, client_id="all", deadletter=None)
    assert len(_drain(reader)) == 9
    with pytest.raises(Exception, match="consumer group"):
        reader.commit()


def test_undecodable_bytes_are_dead_lettered_and_consumption_goes_on(mem):
    p = Producer(mem, "test")
    p.send_raw(topic_name("r", "trajectories"), b"\x00not arrow", headers_for(TRAJECTORY), key=b"x")
    p.flush()
    _send(mem, 2)
    c = Consumer(mem, "r", ["trajectories"], group_id="g", client_id="c", deadletter=p)
    assert len(_drain(c)) == 2 and c.stats["deadlettered"] == 1
    dead = _drain(Consumer(mem, "r", ["deadletter"], group_id=None, client_id="d", deadletter=None))
    assert len(dead) == 1 and dead[0].columns["payload"][0] == b"\x00not arrow"
    assert dead[0].columns["reason"][0].startswith("undecodable")
    assert dead[0].columns["signature"][0] == ""  # no dead-letter key configured


def test_dead_letters_are_signed_with_the_runs_key(mem, tmp_path):
    from pipeline.transport.signature import create_key, read_key, verify

    cfg = mem.model_copy(update={"dead_letter_key_file": create_key(tmp_path / "dead-letter.key")})
    assert (tmp_path / "dead-letter.key").stat().st_mode & 0o777 == 0o600
    p = Producer(cfg, "test")
    p.send_raw(topic_name("r", "trajectories"), b"\x00not arrow", headers_for(TRAJECTORY), key=b"x")
    p.flush()
    c = Consumer(cfg, "r", ["trajectories"], group_id="g", client_id="c", deadletter=p)
    _drain(c)
    (dead,) = _drain(Consumer(mem, "r", ["deadletter"], group_id=None, client_id="d", deadletter=None))
    row = {k: v[0] for k, v in dead.columns.items()}
    key = read_key(tmp_path / "dead-letter.key")
    fields = (row["source_topic"], row["source_partition"], row["source_offset"], row["reason"], row["payload_sha256"])
    assert verify(key, *fields, row["signature"])
    assert not verify(b"another run's key", *fields, row["signature"])
    assert not verify(key, row["source_topic"], row["source_partition"], row["source_offset"] + 1, *fields[3:],
                      row["signature"])


def test_group_members_share_partitions_and_a_stale_member_cannot_commit(mem):
    assigned, revoked = {}, {}

    def member(name):
        return Consumer(mem, "r", ["trajectories"], group_id="g", client_id=name, deadletter=None,
                        on_assign=lambda ps, n=name: assigned.setdefault(n, []).append(ps) or {},
                        on_revoke=lambda ps, n=name: revoked.setdefault(n, []).append(ps))

    a = member("a")
    a.poll(timeout_ms=0)
    assert assigned["a"] == [[("trajectories", p) for p in range(4)]]
    b = member("b")
    b.poll(timeout_ms=0)  # b joined: a new generation
    assert "b" not in assigned  # ... but a still holds every partition: nothing for b yet
    assert not a.commit_offsets({("trajectories", 0): 0})  # a has not seen it yet: refused, as by Kafka
    a.poll(timeout_ms=0)  # a catches up: revoked everything, took its half back
    assert revoked["a"] == [[("trajectories", p) for p in range(4)]]
    b.poll(timeout_ms=0)  # now b takes the half a released
    halves = [set(assigned["a"][-1]), set(assigned["b"][-1])]
    assert halves[0] | halves[1] == {("trajectories", p) for p in range(4)} and not halves[0] & halves[1]
    own = next(iter(halves[0]))
    assert a.commit_offsets({own: 0}) and not a.commit_offsets({next(iter(halves[1])): 0})
    b.close()  # b leaves (revoking its half): a gets everything again at its next poll
    assert revoked["b"] == [sorted(halves[1])]
    _send(mem, 8)
    assert len(_drain(a)) == 8


def test_a_topic_created_after_the_subscription_is_assigned(mem):
    from factories import policy_update
    from schemas import POLICY_UPDATE

    c = Consumer(mem, "late", ["policy"], group_id="g", client_id="c", deadletter=None)
    assert c.poll(timeout_ms=0) == []  # the run's topics do not exist yet
    ensure_topics(mem, "late")
    p = Producer(mem, "test")
    p.send(topic_name("late", "policy"), POLICY_UPDATE, policy_update(), key=b"policy")
    p.flush()
    assert len(_drain(c)) == 1


def test_a_commit_asked_for_in_on_revoke_lands_and_a_blocking_one_in_a_raw_listener_is_refused(mem):
    """As on kafka-python 3 (tests/integration/test_transport.py has the real-broker case): the
    client runs listeners on its IO loop and refuses a blocking commit there; `Consumer` defers the
    commit `on_revoke` asks for and awaits it before the partitions go."""
    from kafka import ConsumerRebalanceListener
    from kafka.structs import OffsetAndMetadata

    from pipeline.transport.memory import MemoryConsumerClient

    _send(mem, 8)
    group = f"r.{uuid.uuid4().hex[:6]}"

    def member(name: str) -> Consumer:
        def on_revoke(parts):
            assert c.commit_offsets({p: o for p, o in c.positions().items() if p in parts})

        c = Consumer(mem, "r", ["trajectories"], group, name, deadletter=None, on_revoke=on_revoke)
        return c

    a = member("a")
    assert len(_drain(a)) == 8
    b = member("b")  # joins: a revokes (and commits) at its next poll
    _drain(a, 1)
    broker = MemoryBroker.named(mem.bootstrap_servers)
    committed = broker.groups[group].committed
    assert sum(committed.values()) == 8 and len(committed) == 4
    a.close()
    b.close()

    class Blocking(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked):
            raw.commit({tp: OffsetAndMetadata(0, "", -1) for tp in revoked})

        def on_partitions_assigned(self, assigned):
            pass

    raw = MemoryConsumerClient(broker, f"{group}-raw")
    raw.subscribe([topic_name("r", "trajectories")], listener=Blocking())
    raw.poll(10)
    with pytest.raises(RuntimeError, match="Cannot block on net.run"):
        raw.close()


def test_large_groups_go_arrow_compressed_and_a_bomb_is_dead_lettered_as_too_large(mem):
    # Over `arrow_compression_min_bytes` a group is sent Arrow-compressed (zstd) and decodes as it
    # was sent; over the consumer's `max_decoded_bytes` it is dead-lettered before decompressing.
    cfg = mem.model_copy(update={"arrow_compression_min_bytes": 64 * 1024, "max_decoded_bytes": 16 << 20})
    small = trajectory_group("e0-000000", "p0")
    big = trajectory_group("e0-000001", "p1")
    n = 8 << 20  # 64 MiB of zeros once decoded
    big["completion_token_ids"] = Ragged(np.zeros(n, dtype=np.int32), np.linspace(0, n, 5).astype(np.int32))
    big["behavior_logprobs"] = Ragged(np.zeros(n, dtype=np.float32), np.linspace(0, n, 5).astype(np.int32))
    medium = {k: v for k, v in big.items()}
    m = 32 * 1024  # 256 KiB of ids and log-probs: over the compression threshold, under the bound
    medium["ticket_id"] = np.array(["e0-000002"] * 4, dtype=object)
    medium["completion_token_ids"] = Ragged(np.arange(m, dtype=np.int32) % 7, np.linspace(0, m, 5).astype(np.int32))
    medium["behavior_logprobs"] = Ragged(np.zeros(m, dtype=np.float32), np.linspace(0, m, 5).astype(np.int32))
    p = Producer(cfg, "test")
    for g in (small, big, medium):
        p.send(topic_name("r", "trajectories"), TRAJECTORY, g, key=b"k")
    p.flush()
    c = Consumer(cfg, "r", ["trajectories"], group_id="g", client_id="c", deadletter=p)
    got = _drain(c)
    assert [d.columns["ticket_id"][0] for d in got] == ["e0-000000", "e0-000002"]
    assert len(got[1].value) < 64 * 1024 < declared_bytes(got[1].value)  # compressed on the wire
    assert got[0].value == encode(TRAJECTORY, small)  # small: sent uncompressed
    np.testing.assert_array_equal(got[1].columns["completion_token_ids"].values, medium["completion_token_ids"].values)
    dead = _drain(Consumer(cfg, "r", ["deadletter"], group_id=None, client_id="d", deadletter=None))
    assert len(dead) == 1 and dead[0].columns["reason"][0].startswith("too_large")


def _raiser(filename: str, name: str):
    """A function that raises ValueError, compiled as if it were ``name`` in ``filename``."""
    scope: dict = {}
    exec(compile(f"def {name}():\n    raise ValueError('boom')\n", filename, "exec"), scope)
    return scope[name]


def test_only_errors_raised_reading_a_record_mark_it_unreadable():
    import os

    from pipeline.transport.clients import raised_reading_records

    site = os.path.join(os.sep, "venv", "site-packages", "kafka")
    cases = {(os.path.join(site, "record", "default_records.py"), "_maybe_uncompress"): True,
             (os.path.join(site, "codec.py"), "snappy_decode"): True,
             (os.path.join(site, "consumer", "fetcher.py"), "_unpack_records"): True,
             (os.path.join(site, "consumer", "fetcher.py"), "send_fetches"): False,
             (os.path.join(site, "conn.py"), "recv"): False,
             (os.path.join(site, "coordinator", "base.py"), "ensure_coordinator_ready"): False}
    for (filename, name), expected in cases.items():
        try:
            _raiser(filename, name)()
        except ValueError as e:
            assert raised_reading_records(e) is expected, (filename, name)


def test_a_client_error_outside_record_reading_loses_no_record(mem):
    # The client raises a ValueError that has nothing to do with a record (a bug or a failure in
    # its connection code): before, any ValueError marked the record at the consumer's position
    # unreadable and skipped it, with no payload kept. Now it is the transport's failure.
    from pipeline.transport.clients import TransportError

    ensure_topics(mem, "one", partitions={"trajectories": 1})  # the error is then pinned on the only partition
    p = Producer(mem, "test")
    for i in range(3):
        p.send(topic_name("one", "trajectories"), TRAJECTORY, trajectory_group(f"e0-{i:06d}", f"p{i}"), key=b"k")
    p.flush()
    sent = range(3)
    consumer = Consumer(mem, "one", ["trajectories"], group_id="g", client_id="c", deadletter=None)
    real_poll = consumer._consumer.poll
    consumer._consumer.poll = lambda **kw: _raiser(os.path.join(os.sep, "kafka", "conn.py"), "recv")()
    with pytest.raises(TransportError, match="outside reading a record"):
        consumer.poll(timeout_ms=5)
    assert consumer.stats["dropped"] == 0 and consumer.stats.get("deadlettered", 0) == 0
    consumer._consumer.poll = real_poll
    got = [d for _ in range(5) for d in consumer.poll(timeout_ms=5)]
    assert len(got) == len(sent)
