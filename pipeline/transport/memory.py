"""An in-memory broker for the fast test tier: ``kafka.bootstrap_servers = "memory://<name>"``.

The transport's `Producer`, `Consumer` and `ensure_topics` talk to it instead of Kafka when the
bootstrap address says ``memory://`` (`pipeline.transport.clients.clients_for`): everything above the client (Arrow encoding, headers,
decoding and validation, dead letters, positions, commits, partition ownership callbacks) is the
same code as against a real broker, so a service's loop runs in-process in a unit test. What only
a broker shows (the wire, outages, kill -9, Tansu's quirks) stays in the real-broker tier.

The clients implement the part of kafka-python's ``KafkaProducer`` / ``KafkaConsumer`` /
``KafkaAdminClient`` API that the transport uses, with Kafka's semantics where they matter to the services:

- topics with partitions, records with key, value, headers, offset and timestamp; a keyed record
  goes to ``crc32(key) mod partitions`` (one key, one partition, as with Kafka's partitioner);
- consumer groups: members share the partitions (round-robin over the sorted partitions, by member
  order); a member joining or leaving, or a topic created under a subscription, starts a new
  generation, and each member sees it at its next ``poll``: its partitions revoked first
  (``on_partitions_revoked``), then its new ones (``on_partitions_assigned``), positions from the
  group's committed offsets or the earliest. As in Kafka's eager protocol, a partition goes to its
  new owner only after the previous owner has revoked it (the new owner gets it at a later poll),
  so two members never hold one partition; ``close`` revokes (as kafka-python's does) and leaves;
- a commit from a member of an older generation, or for a partition it does not own, is refused
  with ``CommitFailedError``, as Kafka refuses it after a rebalance; a member revoking its
  partitions may still commit them (Kafka's eager protocol: revocation happens before the rejoin);
- listeners run as kafka-python 3 runs them, on the client's IO loop: an async listener is
  awaited, and a blocking ``commit`` from inside one raises ``RuntimeError`` (the listener awaits
  ``commit_from_listener`` instead, as `pipeline.transport.clients.KafkaConsumerClient` does);
- ``poll`` waits up to its timeout for records, starting at another partition each time, so a
  small ``max_records`` does not starve the later partitions.

Brokers live in this process, one per name (`MemoryBroker.named`); `MemoryBroker.reset` forgets them.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Literal

from kafka import TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError

SCHEME = "memory://"


def is_memory(bootstrap_servers: str) -> bool:
    return bootstrap_servers.startswith(SCHEME)


def key_partition(key: bytes, partitions: int) -> int:
    """The partition a keyed record goes to: crc32 of the key mod the partition count."""
    return zlib.crc32(key) % partitions


@dataclass(frozen=True)
class Record:
    """One stored record, shaped like kafka-python's ``ConsumerRecord`` where the transport reads it."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass
class _Group:
    members: list[str] = field(default_factory=list)
    generation: int = 0
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    subscriptions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    owner: dict[TopicPartition, str] = field(default_factory=dict)
    """Who holds each partition now (until it revokes it)."""

    def assignment(self, member: str, partitions_of) -> set[TopicPartition]:
        """Round-robin of the sorted partitions of the group's topics over its members in join order."""
        topics = sorted({t for ts in self.subscriptions.values() for t in ts})
        parts = [TopicPartition(t, p) for t in topics for p in range(partitions_of(t))]
        if member not in self.members:
            return set()
        i, n = self.members.index(member), len(self.members)
        return {tp for k, tp in enumerate(parts) if k % n == i and tp.topic in self.subscriptions[member]}


class MemoryBroker:
    """Topics and consumer groups of one in-memory broker (see the module docstring)."""

    _brokers: dict[str, MemoryBroker] = {}
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.topics: dict[str, list[list[Record]]] = {}
        self.groups: dict[str, _Group] = {}
        self.cond = threading.Condition()
        self._member_ids = itertools.count()
        self._to_lose: dict[str, int] = {}
        self.lost: list[Record] = []
        """Records acknowledged and lost on purpose (`lose_acknowledged`)."""

    @classmethod
    def named(cls, bootstrap_servers: str) -> MemoryBroker:
        """The broker of a ``memory://<name>`` address (created on first use)."""
        name = bootstrap_servers[len(SCHEME):].split(",")[0]
        with cls._lock:
            return cls._brokers.setdefault(name, cls())

    @classmethod
    def reset(cls) -> None:
        with cls._lock:
            cls._brokers.clear()

    def create_topic(self, name: str, partitions: int) -> bool:
        """Create topic ``name``; False if it exists (it keeps its partitions)."""
        with self.cond:
            if name in self.topics:
                return False
            self.topics[name] = [[] for _ in range(partitions)]
            for group in self.groups.values():  # subscribers get its partitions at their next poll
                if any(name in topics for topics in group.subscriptions.values()):
                    group.generation += 1
            return True

    def partitions_of(self, topic: str) -> int:
        return len(self.topics.get(topic, ()))

    def append(self, topic: str, key: bytes | None, value: bytes, headers, partition: int | None = None) -> Record:
        """Add a record where its key hashes to (or the emptiest partition), or to ``partition``
        when given (as a Kafka producer may choose one)."""
        with self.cond:
            if topic not in self.topics:
                raise KafkaError(f"unknown topic {topic!r} (topics are not created automatically)")
            parts = self.topics[topic]
            if partition is not None:
                p = partition
            else:
                p = (key_partition(key, len(parts)) if key is not None
                     else min(range(len(parts)), key=lambda i: len(parts[i])))
            rec = Record(topic, p, len(parts[p]), int(time.time() * 1000), key, bytes(value), list(headers or []))
            lost = self._to_lose.get(topic, 0) > 0
            if lost:
                self._to_lose[topic] -= 1
                self.lost.append(rec)
            parts[p].append(None if lost else rec)  # a lost record leaves a hole at its offset
            self.cond.notify_all()
            return rec

    def lose_acknowledged(self, topic: str, count: int = 1) -> None:
        """The next ``count`` records produced to ``topic`` are acknowledged (the producer gets their
        partition and offset) and then lost: no consumer ever reads them, as when a broker acks a
        produce and dies before it is stored (Tansu on SeaweedFS, killed). They are kept in `lost`."""
        with self.cond:
            self._to_lose[topic] = self._to_lose.get(topic, 0) + count

    def new_member(self) -> str:
        return f"member-{next(self._member_ids)}"


class _Future:
    """A send's outcome, already decided (appending in memory cannot fail later)."""

    def __init__(self, record: Record | None, error: BaseException | None) -> None:
        self.record, self.error = record, error

    def add_errback(self, fn, *args) -> _Future:
        if self.error is not None:
            fn(*args, self.error)
        return self

    def get(self, timeout=None) -> Record:
        if self.error is not None:
            raise self.error
        return self.record


class MemoryAdminClient:
    """``KafkaAdminClient``'s create_topics / wait_for_topics / describe_topics / close on a
    `MemoryBroker`. Topic configs are accepted and ignored: nothing is compacted or expires here."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    def create_topics(self, new_topics: list[NewTopic], raise_errors: Literal[False]) -> dict:
        """Create the topics; one that exists is reported in the result, as kafka-python reports it
        with ``raise_errors=False`` (the only way the transport calls it)."""
        results = []
        for topic in new_topics:
            created = self.broker.create_topic(topic.name, topic.num_partitions)
            results.append({"name": topic.name, "error_code": 0 if created else TopicAlreadyExistsError.errno,
                            "error_message": None if created else "topic exists"})
        return {"topics": results}

    def wait_for_topics(self, topic_names: list[str], timeout_ms: int = 10000) -> None:
        """A created topic is there at once."""

    def describe_topics(self, topics: list[str]) -> list[dict]:
        """Name and partitions of each topic (none for a topic that does not exist)."""
        return [{"name": name, "partitions": [{"partition": p} for p in range(self.broker.partitions_of(name))]}
                for name in topics]

    def close(self) -> None:
        """Nothing to release."""


class MemoryProducerClient:
    """``KafkaProducer``'s ``send`` / ``flush`` / ``close`` on a `MemoryBroker`."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers=None) -> _Future:
        try:
            return _Future(self.broker.append(topic, key, value, headers), None)
        except KafkaError as e:
            return _Future(None, e)

    def flush(self, timeout=None) -> None:
        """Every send is stored when it returns."""

    def close(self, timeout=None) -> None:
        """Nothing to release."""


class MemoryConsumerClient:
    """``KafkaConsumer``'s subscribe/assign, seek, poll, position, commit and close on a
    `MemoryBroker` (see the module docstring for the group semantics)."""

    def __init__(self, broker: MemoryBroker, group_id: str | None, auto_offset_reset: str = "earliest") -> None:
        self.broker, self.group_id = broker, group_id
        self.reset = auto_offset_reset
        self.member = broker.new_member()
        self.listener = None
        self.generation = -1
        self.assigned: set[TopicPartition] = set()
        self.pending: set[TopicPartition] = set()
        """Partitions of this generation still held by their previous owner."""
        self.positions: dict[TopicPartition, int] = {}
        self._start = 0
        self._in_listener = self._revoking = False

    # -- membership
    def subscribe(self, topics: list[str], listener=None) -> None:
        self.listener = listener
        with self.broker.cond:
            group = self.broker.groups.setdefault(self.group_id, _Group())
            group.subscriptions[self.member] = tuple(topics)
            if self.member not in group.members:
                group.members.append(self.member)
            group.generation += 1

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = set(partitions)
        for tp in partitions:
            self.positions.setdefault(tp, 0)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self.broker.partitions_of(topic)
        return set(range(n)) if n else None

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    @staticmethod
    def partition_of(key: bytes, partitions: int) -> int:
        """Index, among a topic's sorted partitions, of the one `MemoryBroker.append` puts ``key`` in."""
        return key_partition(key, partitions)

    def _rebalance(self) -> None:
        """Catch up with the group's generation (revoke everything, release it), then take the
        partitions of this generation that their previous owners have released."""
        if self.group_id is None:
            return
        with self.broker.cond:
            group = self.broker.groups[self.group_id]
            stale = group.generation != self.generation
        if stale:
            self._revoke_all()
            with self.broker.cond:
                self.pending = group.assignment(self.member, self.broker.partitions_of)
                self.generation = group.generation
        if not self.pending:
            return
        with self.broker.cond:
            free = {tp for tp in self.pending if group.owner.get(tp) in (None, self.member)}
            for tp in free:
                group.owner[tp] = self.member
            committed = dict(group.committed)
        if not free:
            return
        self.pending -= free
        self.assigned |= free
        for tp in free:
            self.positions[tp] = committed.get(tp, 0 if self.reset == "earliest" else self._end(tp))
        self._listen("on_partitions_assigned", set(free))

    def _revoke_all(self) -> None:
        """Give up every partition held (listener first, while still the owner), then release them."""
        if self.assigned:
            self._revoking = True
            try:
                self._listen("on_partitions_revoked", set(self.assigned))
            finally:
                self._revoking = False
        with self.broker.cond:
            group = self.broker.groups[self.group_id]
            for tp in self.assigned:
                if group.owner.get(tp) == self.member:
                    del group.owner[tp]
            self.broker.cond.notify_all()
        self.assigned, self.positions, self.pending = set(), {}, set()

    def _listen(self, method: str, partitions: set[TopicPartition]) -> None:
        """Run a listener hook as kafka-python 3 does: on the client's IO loop (an async listener
        is awaited), where a blocking call back into the client, a synchronous `commit`, is refused."""
        hook = getattr(self.listener, method, None)
        if hook is None:
            return
        self._in_listener = True
        try:
            if inspect.iscoroutinefunction(hook):
                asyncio.run(hook(partitions))
            else:
                hook(partitions)
        finally:
            self._in_listener = False

    def _end(self, tp: TopicPartition) -> int:
        return len(self.broker.topics[tp.topic][tp.partition])

    # -- positions
    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self.assigned:
            raise ValueError(f"{tp} is not assigned")
        self.positions[tp] = offset

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.seek(tp, 0)

    def seek_to_end(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.seek(tp, self._end(tp))

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    # -- records
    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        self._rebalance()
        deadline = time.monotonic() + timeout_ms / 1000
        with self.broker.cond:
            while True:
                out, budget = {}, max_records if max_records is not None else 500
                parts = sorted(self.assigned)
                self._start = (self._start + 1) % max(1, len(parts))
                for tp in parts[self._start:] + parts[: self._start]:
                    log = self.broker.topics[tp.topic][tp.partition]
                    span = log[self.positions[tp]: self.positions[tp] + budget]
                    records = [r for r in span if r is not None]  # lost records are holes
                    self.positions[tp] += len(span)
                    if records:
                        out[tp] = records
                        budget -= len(records)
                    if budget <= 0:
                        break
                left = deadline - time.monotonic()
                if out or left <= 0:
                    return out
                if self.pending:  # a partition may be released meanwhile: take it at the next poll
                    return out
                self.broker.cond.wait(left)

    def commit(self, offsets: dict) -> None:
        if self._in_listener:
            raise RuntimeError("Cannot block on net.run() from the IO thread itself (a rebalance listener called "
                               "a blocking commit; kafka-python 3 refuses it the same way)")
        self._commit(offsets)

    async def commit_from_listener(self, offsets: dict) -> None:
        """What a listener awaits instead of `commit`. While revoking, this member still owns the
        partitions in the generation it is leaving, and its commit is accepted (Kafka's eager
        rebalance: members commit in their revocation before they rejoin)."""
        self._commit(offsets)

    def _commit(self, offsets: dict) -> None:
        with self.broker.cond:
            group = self.broker.groups[self.group_id]
            if group.generation != self.generation and not self._revoking:
                raise CommitFailedError("the group rebalanced since this member's last poll")
            foreign = [tp for tp in offsets if tp not in self.assigned]
            if foreign:
                raise CommitFailedError(f"partitions {foreign} are not assigned to this member")
            for tp, meta in offsets.items():
                group.committed[tp] = meta.offset

    def committed(self, tp: TopicPartition) -> int | None:
        return self.broker.groups.get(self.group_id, _Group()).committed.get(tp)

    def close(self, autocommit: bool = False) -> None:
        if self.group_id is None:
            return
        self._revoke_all()
        with self.broker.cond:
            group = self.broker.groups.get(self.group_id)
            if group is not None and self.member in group.members:
                group.members.remove(self.member)
                group.subscriptions.pop(self.member, None)
                group.generation += 1
                self.broker.cond.notify_all()
