"""The commit protocol (`pipeline.flow.commit`): flush, persist, commit, in that order; a flush or
persist that fails commits nothing. First with in-memory fakes that log every call, then with the
real `Producer` and `Consumer` on the in-memory broker, where "nothing committed" means the group's
next member reads the records again."""

from __future__ import annotations

import uuid

import pytest

import pipeline.flow.commit as commit_module
from factories import trajectory_group
from pipeline.config import KafkaConfig
from pipeline.flow.commit import Committer
from pipeline.transport.consumer import Consumer
from pipeline.transport.producer import Producer
from pipeline.transport.topics import ensure_topics, topic_name
from pipeline.transport.memory import MemoryBroker
from schemas import TRAJECTORY

POSITIONS = {("trajectories", 0): 7, ("trajectories", 1): 3}


class FakeProducer:
    def __init__(self, name: str, calls: list, fail: bool = False) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    def flush(self) -> None:
        self.calls.append(("flush", self.name))
        if self.fail:
            raise RuntimeError("sends not acknowledged")


class FakeConsumer:
    def __init__(self, calls: list, accepted: bool = True) -> None:
        self.calls, self.accepted = calls, accepted

    def positions(self) -> dict:
        return dict(POSITIONS)

    def commit_offsets(self, offsets: dict) -> bool:
        self.calls.append(("commit", offsets))
        return self.accepted


def test_flush_every_producer_then_persist_then_commit_what_the_state_covers(monkeypatch):
    calls = []
    monkeypatch.setattr(commit_module, "failpoint", lambda name: calls.append(("failpoint", name)))

    def persist(positions):
        calls.append(("persist", positions))
        return {("trajectories", 1): 3}  # only partition 1's state was saved

    c = Committer(FakeConsumer(calls), [FakeProducer("a", calls), FakeProducer("b", calls)],
                  flushed_failpoint="reward.produced")
    assert c.commit(persist) is True
    assert calls == [("flush", "a"), ("flush", "b"), ("failpoint", "reward.produced"), ("persist", POSITIONS),
                     ("commit", {("trajectories", 1): 3})]


def test_without_state_the_positions_are_committed_after_the_flush():
    calls = []
    assert Committer(FakeConsumer(calls), [FakeProducer("a", calls)]).commit() is True
    assert calls == [("flush", "a"), ("commit", POSITIONS)]


def test_a_failed_flush_persists_and_commits_nothing():
    calls = []
    c = Committer(FakeConsumer(calls), [FakeProducer("a", calls, fail=True), FakeProducer("b", calls)])
    with pytest.raises(RuntimeError, match="not acknowledged"):
        c.commit(lambda positions: calls.append(("persist", positions)) or positions)
    assert calls == [("flush", "a")]


def test_a_failed_persist_commits_nothing():
    calls = []

    def persist(positions):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        Committer(FakeConsumer(calls), [FakeProducer("a", calls)]).commit(persist)
    assert calls == [("flush", "a")]


def test_a_refused_commit_is_reported_after_the_state_is_persisted():
    calls = []
    committed = Committer(FakeConsumer(calls, accepted=False)).commit(
        lambda positions: calls.append(("persist", positions)) or positions)
    assert committed is False and calls == [("persist", POSITIONS), ("commit", POSITIONS)]


@pytest.fixture()
def mem():
    cfg = KafkaConfig(bootstrap_servers=f"memory://{uuid.uuid4().hex[:8]}", poll_stall_timeout_s=0)
    ensure_topics(cfg, "r", partitions={"trajectories": 1})
    yield cfg
    MemoryBroker.reset()


def _consume_all(cfg: KafkaConfig, client_id: str) -> tuple[Consumer, list]:
    c = Consumer(cfg, "r", ["trajectories"], group_id="g", client_id=client_id, deadletter=None)
    got = []
    for _ in range(3):
        got += c.poll(timeout_ms=10)
    return c, got


def test_on_the_memory_broker_a_failed_persist_leaves_the_records_to_the_next_member(mem):
    p = Producer(mem, "test")
    for i in range(4):
        p.send(topic_name("r", "trajectories"), TRAJECTORY, trajectory_group(f"e0-{i:06d}", "p0"), key=b"p0")
    p.flush()
    first, got = _consume_all(mem, "first")
    assert len(got) == 4

    def persist(positions):
        raise OSError("disk full")

    with pytest.raises(OSError):
        Committer(first, [p]).commit(persist)
    first.close()
    second, again = _consume_all(mem, "second")  # nothing was committed: every record comes again
    assert len(again) == 4
    assert Committer(second, [p]).commit(lambda positions: positions) is True
    second.close()
    third, rest = _consume_all(mem, "third")  # committed: the group continues after them
    assert rest == []
    third.close()
