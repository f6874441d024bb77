"""The consumer of a run's Arrow messages (kafka-python, or the in-memory broker through
`pipeline.transport.clients`). Its guarantees (what is dead-lettered, what a position means, when a
commit is refused) are one argument that reads top to bottom here.

Delivery is at least once: a consumer commits, per partition, the offset after the last record
`poll` returned, and the service calls `commit()` only after the results of those records were
produced and flushed.

A record that breaks a consumer is data, not a crash (`pipeline.transport.deadletters`). That
covers a record the client cannot read at all (a corrupt batch, a compression codec whose library
is missing, a header key that is not UTF-8: `poll` finds which partition and offset and skips it),
bytes that do not decode (`schemas.decode`, with full Arrow validation, no empty messages), and,
through `Consumer.guard`, a decoded record whose values a service rejects or whose processing
raises.

Partition ownership: a service that keeps state per partition passes `on_assign` (returns the
offsets to continue from, e.g. those of its restored state) and `on_revoke` (flush that state
before another member takes the partition), the model of Kafka Streams' state stores.

Tansu (the embedded broker) reports a wrong "latest" offset, so nothing here relies on it:
group consumers fall back to "earliest", and consumers without a group seek to the beginning.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kafka import AsyncConsumerRebalanceListener, OffsetAndMetadata, TopicPartition
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaConfigurationError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

from pipeline.config import KafkaConfig
from pipeline.transport.clients import TransportError, clients_for, raised_reading_records, unreadable_partition
from pipeline.transport.deadletters import DeadLetters, RecordRejected
from pipeline.transport.metrics import BYTES, MESSAGES, OUTAGES, REBALANCE_COMMITS
from pipeline.transport.producer import Producer
from pipeline.transport.topics import TOPICS, topic_name
from pipeline.transport.watchdog import StallWatchdog, exit_wedged
from schemas import Columns, DecodeError, MessageKind, decode, encode, headers_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One decoded message."""

    topic: str
    """Logical topic name (e.g. `"scored"`)."""
    partition: int
    offset: int
    key: bytes | None
    kind: MessageKind
    columns: Columns
    timestamp_ms: int
    """Producer (create) timestamp of the record."""
    value: bytes = b""
    """The record's bytes as received (kept for a dead letter of the whole message; the decoded
    columns are views of it, so keeping it costs nothing)."""
    headers: tuple[tuple[str, bytes], ...] = ()


PartitionKey = tuple[str, int]
"""(logical topic, partition)."""

MAX_SKIPS_PER_POLL = 100
"""Unreadable records one `Consumer.poll` may skip before it returns (empty) to its caller."""


class _Rebalance(AsyncConsumerRebalanceListener):
    """Keeps the consumer's positions to partitions it owns and lets the service restore and flush
    partition state (`on_assign` / `on_revoke`).

    kafka-python 3 runs rebalance listeners on its IO loop, where a blocking call back into the
    client is refused ("Cannot block on net.run() from the IO thread"), so a synchronous commit
    from a hook used to fail the rebalance, and the poll that ran it took the error for a bad record.
    The hooks stay synchronous: a commit `on_revoke` asks for (`Consumer.commit_offsets` while the
    hook runs) is collected and awaited here, before the partitions go to another member."""

    def __init__(self, owner: Consumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        owner = self._owner
        keys = sorted(owner._logical_key(tp) for tp in revoked)
        if owner._on_revoke is not None and keys:
            owner._listener_commits = {}
            try:
                owner._on_revoke(keys)
            except BaseException as e:
                owner._hook_error = e
                raise
            finally:
                offsets, owner._listener_commits = owner._listener_commits, None
            if offsets:
                await owner._commit_from_listener(offsets)
        for key in keys:
            owner._positions.pop(key, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        owner = self._owner
        keys = sorted(owner._logical_key(tp) for tp in assigned)
        if owner._on_assign is None or not keys:
            return
        try:
            seeks = owner._on_assign(keys)
        except BaseException as e:
            owner._hook_error = e
            raise
        for (t, p), offset in seeks.items():
            owner._consumer.seek(TopicPartition(topic_name(owner._run, t), p), offset)
            owner._positions[(t, p)] = offset


class Consumer:
    """Reads Arrow messages of a run's logical topics; what cannot be read, decoded or used goes
    to the dead-letter topic, and consumption goes on.

    With a `group_id`: joins the group (partitions shared among members), resumes from the
    group's committed offsets, or from the earliest offset when there are none (or from what
    `on_assign` returns). Without one: reads every partition of the topics from the beginning (how
    each rollout process rebuilds the `temperature` table and finds the latest `policy`); `commit`
    is then unavailable.
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        run: str,
        topics: list[str],
        group_id: str | None,
        client_id: str,
        deadletter: Producer | None,
        from_beginning: bool = True,
        on_assign: Callable[[list[PartitionKey]], dict[PartitionKey, int]] | None = None,
        on_revoke: Callable[[list[PartitionKey]], None] | None = None,
    ) -> None:
        """`deadletter` receives what cannot be used; with None it is only logged and counted in
        `stats["dropped"]` (the recorder: the consumer that owns the record dead-letters it).
        `from_beginning=False` starts at the broker's end offset (not reliable on Tansu) where
        there is no committed offset. `on_assign(partitions)` runs when the group gives this member
        partitions and returns offsets to continue from (e.g. of restored state); `on_revoke`
        runs before they go to another member (flush their state there)."""
        unknown = [t for t in topics if t not in TOPICS]
        if unknown or not topics:
            raise ValueError(f"unknown or no topics {unknown}; known: {sorted(TOPICS)}")
        if (on_assign or on_revoke) and group_id is None:
            raise ValueError("on_assign/on_revoke need a consumer group")
        self._run = run
        self._logical = {topic_name(run, t): t for t in topics}
        self._group_id = group_id
        self._dead = DeadLetters(cfg, run, deadletter)
        self._on_assign, self._on_revoke = on_assign, on_revoke
        self._listener_commits: dict[PartitionKey, int] | None = None
        """While `on_revoke` runs: the offsets it asked to commit (see `_Rebalance`)."""
        self._hook_error: BaseException | None = None
        """What `on_assign`/`on_revoke` raised inside the client, to raise from `poll` as it was."""
        self._positions: dict[PartitionKey, int] = {}
        self._max_decoded_bytes = cfg.max_decoded_bytes
        self._delivered = 0
        self._consumer = clients_for(cfg).consumer(client_id, group_id, "earliest" if from_beginning else "latest")
        self._watchdog = StallWatchdog(cfg.poll_stall_timeout_s, exit_wedged(client_id),
                                       name=f"poll-watchdog-{client_id}") if cfg.poll_stall_timeout_s else None
        if group_id is not None:
            self._consumer.subscribe(topics=list(self._logical), listener=_Rebalance(self))
            return
        partitions = self._all_partitions(cfg.request_timeout_ms / 1000)
        self._consumer.assign(partitions)
        if from_beginning:
            self._consumer.seek_to_beginning(*partitions)
        else:
            self._consumer.seek_to_end(*partitions)

    def _all_partitions(self, timeout_s: float) -> list[TopicPartition]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = {t: self._consumer.partitions_for_topic(t) for t in self._logical}
            missing = [t for t, ps in found.items() if not ps]
            if not missing:
                return [TopicPartition(t, p) for t, ps in found.items() for p in sorted(ps)]
            if time.monotonic() > deadline:
                raise TransportError(f"topics {missing} not found (run ensure_topics first)")
            time.sleep(0.1)

    @property
    def stats(self) -> dict[str, int]:
        """Records decoded and returned; sent to dead letters; unusable and not kept."""
        return {"delivered": self._delivered} | self._dead.counts

    def home_partition(self, topic: str, key: bytes) -> int | None:
        """The partition a producer's partitioner sends ``key`` to on logical ``topic`` (Kafka's
        murmur2 of the key, as kafka-python and the Java client hash it; the in-memory broker's
        crc32), from the topic's partition count as this consumer sees it; None while that count
        is unknown. A record found elsewhere was placed there by hand, not by its key."""
        parts = self._consumer.partitions_for_topic(topic_name(self._run, topic))
        if not parts:
            return None
        ordered = sorted(parts)
        return ordered[self._consumer.partition_of(key, len(ordered))]

    def _logical_key(self, tp: TopicPartition) -> PartitionKey:
        return self._logical[tp.topic], tp.partition

    def _fetch(self, timeout_ms: int, max_records: int | None) -> dict[TopicPartition, list]:
        """kafka-python's poll, riding out broker outages and skipping records it cannot read
        (up to `MAX_SKIPS_PER_POLL` in one call, so a run of them does not cost a poll each)."""
        if self._watchdog is not None:
            self._watchdog.enter()
        try:
            for _ in range(MAX_SKIPS_PER_POLL):
                try:
                    return self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
                except KafkaError as e:
                    if self._hook_error is not None:
                        # The service's own on_assign/on_revoke raised (the client wraps it in a
                        # KafkaError): the service's error, not a record's. Raised as it was.
                        hook_error, self._hook_error = self._hook_error, None
                        raise hook_error from e
                    if e.retriable:
                        # The broker is down or restarting: deliver nothing, keep positions, try again later.
                        OUTAGES.labels("poll").inc()
                        log.warning("poll failed (%r); retrying", e)
                        time.sleep(min(timeout_ms / 1000, 1.0))
                        return {}
                    if isinstance(e, KafkaConfigurationError) or not raised_reading_records(e):
                        raise
                    self._skip_unreadable(e)
                except (ValueError, OSError, EOFError, ArithmeticError, LookupError, TypeError) as e:
                    # Decompression of a hostile batch raises the codec library's own errors; the
                    # same exception types from anywhere else in the client are the client's.
                    if not raised_reading_records(e):
                        raise TransportError(f"the Kafka client failed outside reading a record: "
                                             f"{type(e).__name__}: {e}") from e
                    self._skip_unreadable(e)
                timeout_ms = 0
            return {}
        finally:
            if self._watchdog is not None:
                self._watchdog.leave()

    def _skip_unreadable(self, error: BaseException) -> None:
        """The client raised while reading records (corrupt batch, codec library missing, header
        key not UTF-8, ...) and would raise again at the same offset forever (and kafka-python 3.0
        spins if polled there again). Find the partition, dead-letter the offset it is stuck at
        and seek past it."""
        tp = unreadable_partition(self._consumer, error)
        if tp is None:
            raise error
        offset = self._consumer.position(tp)
        MESSAGES.labels(self._logical[tp.topic], self._dead.outcome).inc()
        self._dead.send(tp.topic, tp.partition, offset, None, [], "unreadable_record",
                        f"unreadable_record: {type(error).__name__}: {error}")
        self._dead.flush()
        self._consumer.seek(tp, offset + 1)

    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[Delivery]:
        """Decoded records, in offset order per partition; what cannot be read or decoded is
        dead-lettered (and the dead-letter producer flushed) before this returns. If that flush
        fails, the error propagates and `positions()` does not advance past this poll's records."""
        fetched = self._fetch(timeout_ms, max_records)
        deliveries: list[Delivery] = []
        advanced: dict[PartitionKey, int] = {}
        bad = 0
        for tp, records in fetched.items():
            logical = self._logical[tp.topic]
            expected = TOPICS[logical].kind
            decoded = 0
            for rec in records:
                value = rec.value or b""
                headers = tuple(rec.headers or ())
                BYTES.labels(logical, "consumed").inc(len(value))
                try:
                    kind, columns = decode(expected, value, headers, self._max_decoded_bytes)
                except Exception as e:  # noqa: BLE001 -- DecodeError, or anything else the bytes provoke
                    code = e.reason if isinstance(e, DecodeError) else "undecodable"
                    self._dead.send(tp.topic, tp.partition, rec.offset, value, headers, code, f"{code}: {e}")
                    bad += 1
                    continue
                decoded += 1
                deliveries.append(Delivery(logical, tp.partition, rec.offset, rec.key, kind, columns, rec.timestamp,
                                           value, headers))
            if records:
                advanced[(logical, tp.partition)] = records[-1].offset + 1
            if decoded:
                MESSAGES.labels(logical, "consumed").inc(decoded)
            if len(records) > decoded:
                MESSAGES.labels(logical, self._dead.outcome).inc(len(records) - decoded)
        if bad:
            self._dead.flush()
        self._positions.update(advanced)
        self._delivered += len(deliveries)
        return deliveries

    def dead_letter(self, delivery: Delivery, columns: Columns, code: str, reason: str) -> None:
        """Send part of a decoded delivery (e.g. one invalid group, re-encoded as its kind) to the
        dead-letter topic with `reason` (`code` labels the metric). Flushed with the service's
        next flush, which comes before its commit."""
        if self._dead.producer is None:
            raise TransportError("this consumer has no dead-letter producer")
        self._dead.send(topic_name(self._run, delivery.topic), delivery.partition, delivery.offset,
                        encode(delivery.kind, columns), headers_for(delivery.kind), code, reason)

    def reject(self, delivery: Delivery, code: str, reason: str) -> None:
        """Dead-letter a whole decoded delivery, byte for byte."""
        self._dead.send(topic_name(self._run, delivery.topic), delivery.partition, delivery.offset, delivery.value,
                        delivery.headers, code, reason)

    @contextlib.contextmanager
    def guard(self, delivery: Delivery) -> Iterator[None]:
        """Apply one delivery: `RecordRejected`, or any other exception its processing raises,
        dead-letters it (whole) and the block is left; the service goes on with the next one.
        Broker failures (`TransportError`) are not the record's fault and propagate. Use it only
        where nothing of the delivery has been used yet; past that point, `guard_part`."""
        try:
            yield
        except TransportError:
            raise
        except RecordRejected as e:
            self.reject(delivery, e.code, str(e))
        except Exception as e:  # noqa: BLE001 -- one record must not end the service
            log.exception("processing %s[%d]@%d failed", delivery.topic, delivery.partition, delivery.offset)
            self.reject(delivery, "apply_failed", f"apply_failed: {type(e).__name__}: {e}")

    @contextlib.contextmanager
    def guard_part(self, delivery: Delivery, columns: Columns) -> Iterator[None]:
        """Apply one part of a delivery (a group, a ticket) once others of it may have been used:
        an exception dead-letters only ``columns``, re-encoded as the delivery's kind, with
        ``apply_failed``, so a dead letter never names what was used. `TransportError` propagates."""
        try:
            yield
        except TransportError:
            raise
        except Exception as e:  # noqa: BLE001 -- one part must not end the service
            log.exception("processing part of %s[%d]@%d failed", delivery.topic, delivery.partition, delivery.offset)
            self.dead_letter(delivery, columns, "apply_failed", f"apply_failed: {type(e).__name__}: {e}")

    def positions(self) -> dict[PartitionKey, int]:
        """(logical topic, partition) -> offset after the last record `poll` returned (or the
        offset `seek` set), for partitions this consumer currently owns: what `commit` commits."""
        return dict(self._positions)

    def commit(self) -> bool:
        """Commit `positions()` for the group. Call only once the results of the polled records
        are produced and flushed. False if a rebalance refused it (see `commit_offsets`)."""
        return self.commit_offsets(self.positions())

    def commit_offsets(self, offsets: dict[PartitionKey, int]) -> bool:
        """Commit explicit next offsets, keyed by (logical topic, partition). Returns False if the
        commit did not happen: the broker was unreachable (a later commit covers these offsets),
        or the group rebalanced meanwhile, in which case the partitions' next owner continues from
        the last committed offsets (or from its restored state) and what this member did since
        is done again and de-duplicated downstream: the commit rolls back, the service goes on.
        Inside `on_revoke` the commit is made when the hook returns, before the partitions go."""
        if self._group_id is None:
            raise TransportError("commit needs a consumer group (this consumer has group_id=None)")
        if not offsets:
            return True
        if self._listener_commits is not None:
            self._listener_commits.update(offsets)
            return True
        try:
            self._consumer.commit(self._kafka_offsets(offsets))
            return True
        except KafkaError as e:
            return self._commit_failed(e)

    async def _commit_from_listener(self, offsets: dict[PartitionKey, int]) -> bool:
        """The commit `on_revoke` asked for, awaited on the client's IO loop (see `_Rebalance`)."""
        try:
            await self._consumer.commit_from_listener(self._kafka_offsets(offsets))
            return True
        except KafkaError as e:
            return self._commit_failed(e)

    def _kafka_offsets(self, offsets: dict[PartitionKey, int]) -> dict[TopicPartition, OffsetAndMetadata]:
        return {TopicPartition(topic_name(self._run, t), p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}

    def _commit_failed(self, e: KafkaError) -> bool:
        """False for a commit a rebalance refused or an outage lost (see `commit_offsets`); raises
        anything else."""
        if isinstance(e, (CommitFailedError, RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError)):
            REBALANCE_COMMITS.inc()
            log.warning("commit refused by a rebalance (%s); the partitions' next owner continues from the last "
                        "commit", type(e).__name__)
            return False
        if not e.retriable:
            raise e
        # Safe to skip: the results are flushed, so a later commit covers these offsets and a
        # re-delivery before it is de-duplicated downstream.
        OUTAGES.labels("commit").inc()
        log.warning("commit failed (%r); the next commit will cover these offsets", e)
        return False

    def assigned(self) -> set[PartitionKey]:
        """(logical topic, partition) currently assigned to this consumer (empty until the group
        is joined)."""
        return {self._logical_key(tp) for tp in self._consumer.assignment()}

    def seek(self, offsets: dict[PartitionKey, int]) -> None:
        """Continue these assigned partitions from these next offsets. (A group member restores
        the partitions it is given through `on_assign`.)"""
        assigned = self._consumer.assignment()
        for (t, p), o in offsets.items():
            tp = TopicPartition(topic_name(self._run, t), p)
            if tp not in assigned:
                raise ValueError(f"partition {t}[{p}] is not assigned to this consumer")
            self._consumer.seek(tp, o)
            self._positions[(t, p)] = o

    def close(self) -> None:
        """Leave the group (without committing) and close the client."""
        if self._watchdog is not None:
            self._watchdog.close()
        self._consumer.close(autocommit=False)
