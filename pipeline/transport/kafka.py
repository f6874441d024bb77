"""Kafka transport: typed producer and consumer of Arrow messages (kafka-python).

One file of ~770 lines on purpose: the consumer's guarantees (what is dead-lettered, what a
position means, when a commit is refused) are one argument that reads top to bottom; the
in-memory client it can run on is its own module (`pipeline.transport.memory`).

Topics are named `<run>.<logical topic>`; `TOPICS` fixes which message kind each logical topic
carries. Consumers work in logical topic names (`"scored"`, not `"run7.scored"`) for
deliveries, positions and commits; the producer takes full Kafka topic names (see `topic_name`).

Delivery is at least once: a consumer commits, per partition, the offset after the last record
`poll` returned, and the service calls `commit()` only after the results of those records were
produced and flushed.

A record that breaks a consumer is data, not a crash (Kafka Streams' "log and continue"): it goes
to the run's `deadletter` topic with its reason, and the consumer carries on. That covers a record
the client cannot read at all (a corrupt batch, a compression codec whose library is missing, a
header key that is not UTF-8: `poll` finds which partition and offset and skips it), bytes that do
not decode (`schemas.decode`, with full Arrow validation, no empty messages), and, through
`Consumer.guard`, a decoded record whose values a service rejects or whose processing raises.
A dead letter keeps the value byte for byte, cut to fit the producer's request size (with the
whole value's size and sha256).

Partition ownership: a service that keeps state per partition passes `on_assign` (returns the
offsets to continue from, e.g. those of its restored state) and `on_revoke` (flush that state
before another member takes the partition), the model of Kafka Streams' state stores.

Tansu (the embedded broker) reports a wrong "latest" offset, so nothing here relies on it:
group consumers fall back to "earliest", and consumers without a group seek to the beginning.

``kafka.bootstrap_servers = "memory://<name>"`` puts the same classes on an in-process broker
(`pipeline.transport.memory`): the fast test tier, where a service's loop runs in a unit test.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from prometheus_client import Counter
from kafka import (
    AsyncConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka.admin import NewTopic
from kafka.partitioner.default import murmur2
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaConfigurationError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
    UnknownMemberIdError,
)
from kafka.producer.future import FutureRecordMetadata

from pipeline.config import KafkaConfig
from pipeline.transport import signature
from pipeline.transport.memory import MemoryBroker, MemoryConsumerClient, MemoryProducerClient, is_memory
from schemas import (
    DEAD_LETTER,
    POLICY_UPDATE,
    PROMPT_TICKET,
    SCHEMA_HEADER,
    SCORED_TRAJECTORY,
    TEMPERATURE_UPDATE,
    TRAJECTORY,
    VERSION_HEADER,
    Columns,
    DecodeError,
    MessageKind,
    decode,
    encode,
    encode_batch,
    headers_for,
    to_record_batch,
)

log = logging.getLogger(__name__)

# Per logical topic; `outcome` is produced, consumed, deadlettered (undecodable, sent to the
# dead-letter topic) or dropped (undecodable, consumer without a dead-letter producer).
MESSAGES = Counter("rlstream_transport_messages_total", "Kafka messages by logical topic and outcome.",
                   ["topic", "outcome"])
DEAD_LETTERS = Counter("rlstream_transport_dead_letters_total",
                       "Records or groups sent to the dead-letter topic, by logical source topic and reason code.",
                       ["topic", "reason"])
REBALANCE_COMMITS = Counter("rlstream_transport_commits_lost_total",
                            "Commits refused because the group rebalanced meanwhile (the partitions' next owner "
                            "continues from the last commit or from its restored state).")
OUTAGES = Counter("rlstream_transport_broker_errors_total",
                  "Retriable broker errors ridden out (broker down or restarting), by operation.", ["op"])
BYTES = Counter("rlstream_transport_bytes_total", "Kafka message payload bytes by logical topic and direction.",
                ["topic", "outcome"])


def _logical_of(full_topic: str) -> str:
    """`<run>.<topic>` -> `<topic>` (metric labels stay bounded across runs)."""
    return full_topic.rsplit(".", 1)[-1]

_MIN_FETCH_MAX_BYTES = 50 * 1024 * 1024  # kafka-python's default fetch_max_bytes


class TransportError(RuntimeError):
    """Messages could not be delivered to the broker."""


def dead_letter_row(full_topic: str, partition: int, offset: int, payload: bytes | None, headers, reason: str,
                    max_bytes: int, signing_key: bytes | None = None) -> Columns:
    """A DeadLetter message for one record (``payload`` None: it could not be read at all): its
    source, reason, schema headers, and its bytes cut to ``max_bytes`` with their whole size and
    sha256; signed with ``signing_key`` (`pipeline.transport.signature`) when there is one."""

    def header(name: str) -> str | None:
        for key, value in headers:
            if key == name:
                return None if value is None else value.decode("utf-8", "replace")
        return None

    whole = payload if payload is not None else b""
    digest = hashlib.sha256(whole).hexdigest() if payload is not None else ""
    reason = reason[:4000]
    return {
        "source_topic": np.array([full_topic], dtype=object),
        "source_partition": np.array([partition], dtype=np.int32),
        "source_offset": np.array([offset], dtype=np.int64),
        "reason": np.array([reason], dtype=object),
        "schema_header": np.array([header(SCHEMA_HEADER)], dtype=object),
        "schema_version_header": np.array([header(VERSION_HEADER)], dtype=object),
        "payload": np.array([whole[:max_bytes]], dtype=object),
        "payload_bytes": np.array([len(whole) if payload is not None else -1], dtype=np.int64),
        "payload_sha256": np.array([digest], dtype=object),
        "dead_at": np.array([time.time()], dtype=np.float64),
        "signature": np.array([signature.sign(signing_key, full_topic, partition, offset, reason, digest)
                               if signing_key is not None else ""], dtype=object),
    }


_RECORD_CODE = (os.sep + os.path.join("kafka", "record") + os.sep, os.sep + os.path.join("kafka", "codec.py"))
_RECORD_FUNCTIONS = frozenset({"_unpack_records", "_parse_fetched_data", "_maybe_raise_next_inline_exception",
                               "_maybe_skip_record"})
"""Where kafka-python reads a fetched record: its record-format and codec modules, and the fetcher
functions that unpack batches (kafka-python is pinned to the minor version this was checked on)."""


def raised_reading_records(error: BaseException) -> bool:
    """Whether the client raised ``error`` while reading a fetched record (a corrupt batch, a codec
    whose library is missing, a header key that is not UTF-8): then the record is at fault and is
    skipped. Raised anywhere else, the same exception types are a failure of the client or the
    connection, and skipping a record for them would lose it."""
    import traceback

    for frame in traceback.extract_tb(error.__traceback__):
        if any(part in frame.filename for part in _RECORD_CODE) or (
                frame.filename.endswith("fetcher.py") and frame.name in _RECORD_FUNCTIONS):
            return True
    return False


@dataclass(frozen=True)
class TopicSpec:
    """What a logical topic carries."""

    kind: MessageKind
    """The only message kind allowed on the topic."""
    partitions: int
    """Default partition count used by `ensure_topics`."""
    compacted: bool = False
    """Consumers need only the newest value per key (cleanup.policy=compact); else the topic gets
    `kafka.retention_hours`."""


TOPICS: dict[str, TopicSpec] = {
    "prompts": TopicSpec(PROMPT_TICKET, 4),
    "trajectories": TopicSpec(TRAJECTORY, 4),
    "scored": TopicSpec(SCORED_TRAJECTORY, 4),
    "temperature": TopicSpec(TEMPERATURE_UPDATE, 4, compacted=True),
    "policy": TopicSpec(POLICY_UPDATE, 1, compacted=True),
    "deadletter": TopicSpec(DEAD_LETTER, 1),
}
"""The six logical topics of a run (see DESIGN.md, "Topics")."""

POLICY_KEY = b"policy"
"""Key of every PolicyUpdate: one key, so a compacted `policy` topic keeps the newest announcement."""


def topic_configs(spec: TopicSpec, cfg: KafkaConfig) -> dict[str, str]:
    """Kafka topic configs of a logical topic: compaction, or retention from the run config; and
    `max.message.bytes` = `kafka.max_message_bytes`, so the topic itself accepts the largest
    message the producers may send (Kafka's broker default is 1 MiB: a group of 8 trajectories
    with 16k-token completions is about 1.6 MB)."""
    size = {"max.message.bytes": str(cfg.max_message_bytes)}
    if spec.compacted:
        return {"cleanup.policy": "compact"} | size
    hours = cfg.retention_hours
    return {"cleanup.policy": "delete", "retention.ms": str(-1 if hours < 0 else int(hours * 3_600_000))} | size


def topic_name(run: str, topic: str) -> str:
    """Full Kafka topic name of logical `topic` in `run`."""
    return f"{run}.{topic}"


def client_kwargs(cfg: KafkaConfig, role: Literal["admin", "producer", "consumer"]) -> dict[str, Any]:
    """kafka-python keyword arguments for a client of `role` (each client rejects unknown keys)."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers.split(","),
        "request_timeout_ms": cfg.request_timeout_ms,
        "bootstrap_timeout_ms": cfg.request_timeout_ms,
        "security_protocol": cfg.security_protocol,
    }
    if cfg.sasl_mechanism is not None:
        kwargs["sasl_mechanism"] = cfg.sasl_mechanism
    if cfg.sasl_username is not None:
        kwargs["sasl_plain_username"] = cfg.sasl_username
    if cfg.sasl_password is not None:
        kwargs["sasl_plain_password"] = cfg.sasl_password
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_check_hostname"] = cfg.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(cfg, name) is not None:
                kwargs[name] = str(getattr(cfg, name))
    if role == "producer":
        kwargs |= {
            "acks": {"all": "all", "1": 1, "0": 0}[cfg.acks],
            # Idempotence needs acks=all; turning it off explicitly avoids kafka-python's warning.
            "enable_idempotence": cfg.acks == "all",
            "compression_type": None if cfg.compression == "none" else cfg.compression,
            "linger_ms": cfg.linger_ms,
            "batch_size": min(cfg.batch_bytes, cfg.max_message_bytes),
            # Sends are retried through a broker outage for as long as `flush` waits for them.
            "delivery_timeout_ms": max(int(cfg.outage_timeout_s * 1000), cfg.request_timeout_ms + cfg.linger_ms),
            "max_request_size": cfg.max_message_bytes,
            "allow_auto_create_topics": False,
        }
    elif role == "consumer":
        fetch_max = max(cfg.max_message_bytes, _MIN_FETCH_MAX_BYTES)
        kwargs |= {
            "session_timeout_ms": cfg.session_timeout_ms,
            "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
            "max_poll_interval_ms": cfg.max_poll_interval_ms,
            "max_partition_fetch_bytes": cfg.max_message_bytes,
            "fetch_max_bytes": fetch_max,
            "receive_message_max_bytes": max(100_000_000, fetch_max + 1024 * 1024),
            "enable_auto_commit": False,
            "allow_auto_create_topics": False,
        }
    return kwargs


def ensure_topics(cfg: KafkaConfig, run: str, partitions: dict[str, int] | None = None) -> None:
    """Create the run's six topics if missing (idempotent) and wait until metadata shows them.

    `partitions` overrides the default partition count of some logical topics. Topics are created
    with `topic_configs` (compaction or retention); a broker that refuses topic configs gets the
    topics without them (logged). An existing topic keeps its partition count (a mismatch is
    logged).
    """
    counts = {name: spec.partitions for name, spec in TOPICS.items()} | (partitions or {})
    unknown = set(counts) - set(TOPICS)
    if unknown:
        raise ValueError(f"unknown topics {sorted(unknown)}; known: {sorted(TOPICS)}")
    wanted = {topic_name(run, t): n for t, n in counts.items()}
    if is_memory(cfg.bootstrap_servers):
        broker = MemoryBroker.named(cfg.bootstrap_servers)
        for name, n in wanted.items():
            broker.create_topic(name, n)
        return
    admin = KafkaAdminClient(client_id=f"{run}-admin", **client_kwargs(cfg, "admin"))

    def create(with_configs: bool) -> list[dict]:
        new = [NewTopic(topic_name(run, t), n, -1, topic_configs=topic_configs(TOPICS[t], cfg) if with_configs else {})
               for t, n in counts.items()]
        failed = []
        for topic in admin.create_topics(new, raise_errors=False)["topics"]:
            if topic["error_code"] == TopicAlreadyExistsError.errno:
                log.debug("topic %s already exists", topic["name"])
            elif topic["error_code"] != 0:
                failed.append(topic)
        return failed

    try:
        failed = create(with_configs=True)
        if failed:
            log.warning("the broker refused topic configs (%s); creating the topics without compaction/retention",
                        failed[0]["error_message"])
            failed = create(with_configs=False)
        if failed:
            raise TransportError(f"creating topic {failed[0]['name']} failed: error {failed[0]['error_code']} "
                                 f"{failed[0]['error_message']}")
        admin.wait_for_topics(list(wanted), timeout_ms=cfg.request_timeout_ms)
        for topic in admin.describe_topics(list(wanted)):
            if len(topic["partitions"]) != wanted[topic["name"]]:
                log.warning(
                    "topic %s has %d partitions, wanted %d (kept as is)",
                    topic["name"],
                    len(topic["partitions"]),
                    wanted[topic["name"]],
                )
    finally:
        admin.close()


def _check_topic_kind(topic: str, kind: MessageKind) -> None:
    spec = TOPICS.get(topic.rsplit(".", 1)[-1])
    if spec is not None and spec.kind.name != kind.name:
        raise ValueError(f"topic {topic!r} carries {spec.kind.name}, not {kind.name}")


def arrow_compression_for(cfg: KafkaConfig, batch: pa.RecordBatch) -> str | None:
    """The Arrow codec a message of `batch` is sent with: `kafka.arrow_compression` from
    `kafka.arrow_compression_min_bytes` of buffers up, else None (left to Kafka's compression)."""
    if cfg.arrow_compression == "none" or batch.get_total_buffer_size() < cfg.arrow_compression_min_bytes:
        return None
    return cfg.arrow_compression


class Producer:
    """Sends Arrow messages with their `schema`/`schema_version` headers.

    Sends are asynchronous; `flush()` waits for all of them and raises `TransportError` if any
    failed, so "flushed" means "acknowledged at the configured acks level".
    """

    def __init__(self, cfg: KafkaConfig, client_id: str) -> None:
        self._producer = (MemoryProducerClient(MemoryBroker.named(cfg.bootstrap_servers))
                          if is_memory(cfg.bootstrap_servers)
                          else KafkaProducer(client_id=client_id, **client_kwargs(cfg, "producer")))
        self._flush_timeout_s = cfg.outage_timeout_s
        self.max_message_bytes = cfg.max_message_bytes
        self._cfg = cfg
        self._failures: list[tuple[str, BaseException]] = []
        self.stats: dict[str, int] = {}
        """Messages handed to the client, per full topic name (failures surface in `flush`)."""

    def send(self, topic: str, kind: MessageKind, columns: Columns, key: bytes | None = None) -> FutureRecordMetadata:
        """Encode `columns` as one `kind` message (Arrow-compressed if large) and send it to full
        topic name `topic`."""
        _check_topic_kind(topic, kind)
        batch = to_record_batch(kind, columns)
        return self.send_raw(topic, encode_batch(kind, batch, arrow_compression_for(self._cfg, batch)),
                             headers_for(kind), key)

    def send_raw(
        self, topic: str, payload: bytes, headers: list[tuple[str, bytes]], key: bytes | None = None
    ) -> FutureRecordMetadata:
        """Send bytes as they are (replay, dead letters, tests); no validation."""
        future = self._producer.send(topic, value=payload, key=key, headers=headers)
        future.add_errback(self._on_error, topic)
        self.stats[topic] = self.stats.get(topic, 0) + 1
        MESSAGES.labels(_logical_of(topic), "produced").inc()
        BYTES.labels(_logical_of(topic), "produced").inc(len(payload))
        return future

    def _on_error(self, topic: str, exc: BaseException) -> None:
        log.error("send to %s failed: %r", topic, exc)
        self._failures.append((topic, exc))

    def flush(self, timeout: float | None = None) -> None:
        """Block until every send completed; `TransportError` if any failed since the last flush
        or the broker did not acknowledge within `timeout` (default `kafka.outage_timeout_s`: the
        client retries through a broker restart meanwhile)."""
        try:
            self._producer.flush(self._flush_timeout_s if timeout is None else timeout)
        except KafkaTimeoutError as e:
            raise TransportError(f"sends not acknowledged in time: {e}") from e
        if self._failures:
            failures, self._failures = self._failures, []
            topic, first = failures[0]
            raise TransportError(f"{len(failures)} sends failed; first to {topic}: {first!r}") from first

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush pending sends (at most `timeout_s`, so an unreachable broker cannot hang a
        shutting-down service) and close the client."""
        self._producer.close(timeout=timeout_s)


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


class RecordRejected(Exception):
    """Raised inside `Consumer.guard` to dead-letter the delivery with a reason code and text."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


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


MAX_SKIPS_PER_POLL = 100
"""Unreadable records one `Consumer.poll` may skip before it returns (empty) to its caller."""

EXIT_WEDGED = 75
"""Exit status of a service whose Kafka client stopped returning from poll (EX_TEMPFAIL)."""


class StallWatchdog:
    """Calls ``on_stall(seconds)`` from a daemon thread when a call bracketed by `enter`/`leave`
    has lasted longer than ``stall_s``. A thread cannot be interrupted safely out of a blocked
    client call, so the consumer's ``on_stall`` ends the process (a crash the services are built
    to survive) instead of leaving it silent forever."""

    def __init__(self, stall_s: float, on_stall, name: str, check_every_s: float | None = None) -> None:
        self.stall_s = stall_s
        self._on_stall = on_stall
        self._started: float | None = None
        self._closed = threading.Event()
        self._every = check_every_s if check_every_s is not None else min(5.0, stall_s / 4)
        threading.Thread(target=self._watch, name=name, daemon=True).start()

    def enter(self) -> None:
        self._started = time.monotonic()

    def leave(self) -> None:
        self._started = None

    def close(self) -> None:
        self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(self._every):
            started = self._started
            if started is not None and time.monotonic() - started > self.stall_s:
                self._on_stall(time.monotonic() - started)
                return


def _exit_wedged(client_id: str):
    def on_stall(seconds: float) -> None:
        log.critical("consumer %s: poll has not returned for %.0f s; the Kafka client is wedged "
                     "(kafka.poll_stall_timeout_s). Exiting with status %d for a restart.",
                     client_id, seconds, EXIT_WEDGED)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(EXIT_WEDGED)
    return on_stall


PartitionKey = tuple[str, int]
"""(logical topic, partition)."""


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
        self._deadletter = deadletter
        self._on_assign, self._on_revoke = on_assign, on_revoke
        self._listener_commits: dict[PartitionKey, int] | None = None
        """While `on_revoke` runs: the offsets it asked to commit (see `_Rebalance`)."""
        self._hook_error: BaseException | None = None
        """What `on_assign`/`on_revoke` raised inside the client, to raise from `poll` as it was."""
        self._positions: dict[PartitionKey, int] = {}
        self._dead_letter_max = max(1024, cfg.max_message_bytes - 64 * 1024)
        self._dead_letter_key = (signature.read_key(cfg.dead_letter_key_file)
                                 if cfg.dead_letter_key_file is not None and deadletter is not None else None)
        self._max_decoded_bytes = cfg.max_decoded_bytes
        self.stats: dict[str, int] = {"delivered": 0, "deadlettered": 0, "dropped": 0}
        """Records decoded and returned; sent to dead letters; unusable and not kept."""
        reset = "earliest" if from_beginning else "latest"
        self._consumer = (
            MemoryConsumerClient(MemoryBroker.named(cfg.bootstrap_servers), group_id, reset)
            if is_memory(cfg.bootstrap_servers)
            else KafkaConsumer(client_id=client_id, group_id=group_id, auto_offset_reset=reset,
                               **client_kwargs(cfg, "consumer")))
        self._watchdog = StallWatchdog(cfg.poll_stall_timeout_s, _exit_wedged(client_id),
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

    def home_partition(self, topic: str, key: bytes) -> int | None:
        """The partition a producer's partitioner sends ``key`` to on logical ``topic`` (Kafka's
        murmur2 of the key, as kafka-python and the Java client hash it; the in-memory broker's
        crc32), from the topic's partition count as this consumer sees it; None while that count
        is unknown. A record found elsewhere was placed there by hand, not by its key."""
        parts = self._consumer.partitions_for_topic(topic_name(self._run, topic))
        if not parts:
            return None
        ordered = sorted(parts)
        if isinstance(self._consumer, MemoryConsumerClient):
            return ordered[zlib.crc32(key) % len(ordered)]
        return ordered[(murmur2(key) & 0x7FFFFFFF) % len(ordered)]

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
        tp = self._unreadable_partition(error)
        if tp is None:
            raise error
        offset = self._consumer.position(tp)
        MESSAGES.labels(self._logical[tp.topic], "deadlettered" if self._deadletter is not None else "dropped").inc()
        self._dead(tp.topic, tp.partition, offset, None, [], "unreadable_record",
                   f"unreadable_record: {type(error).__name__}: {error}")
        if self._deadletter is not None:
            self._deadletter.flush()
        self._consumer.seek(tp, offset + 1)

    def _unreadable_partition(self, error: BaseException) -> TopicPartition | None:
        """The partition whose records raised: the one kafka-python's fetcher was unpacking (its
        `_next_partition_records`; kafka-python is pinned to the versions this was tested on), or
        the one the error names, or the only one assigned."""
        records = getattr(getattr(self._consumer, "_fetcher", None), "_next_partition_records", None)
        tp = getattr(records, "topic_partition", None)
        if tp is None:
            m = re.search(r"TopicPartition\(topic='([^']*)', partition=(\d+)\)", str(error))
            tp = TopicPartition(m.group(1), int(m.group(2))) if m else None
        assigned = self._consumer.assignment()
        if tp is None and len(assigned) == 1:
            tp = next(iter(assigned))
        return tp if tp in assigned else None

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
                    self._dead(tp.topic, tp.partition, rec.offset, value, headers, code, f"{code}: {e}")
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
                MESSAGES.labels(logical, "deadlettered" if self._deadletter is not None else "dropped").inc(
                    len(records) - decoded)
        if bad and self._deadletter is not None:
            self._deadletter.flush()
        self._positions.update(advanced)
        self.stats["delivered"] += len(deliveries)
        return deliveries

    def dead_letter(self, delivery: Delivery, columns: Columns, code: str, reason: str) -> None:
        """Send part of a decoded delivery (e.g. one invalid group, re-encoded as its kind) to the
        dead-letter topic with `reason` (`code` labels the metric). Flushed with the service's
        next flush, which comes before its commit."""
        if self._deadletter is None:
            raise TransportError("this consumer has no dead-letter producer")
        self._dead(topic_name(self._run, delivery.topic), delivery.partition, delivery.offset,
                   encode(delivery.kind, columns), headers_for(delivery.kind), code, reason)

    def reject(self, delivery: Delivery, code: str, reason: str) -> None:
        """Dead-letter a whole decoded delivery, byte for byte."""
        self._dead(topic_name(self._run, delivery.topic), delivery.partition, delivery.offset, delivery.value,
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

    def _dead(self, full_topic: str, partition: int, offset: int, payload: bytes | None, headers, code: str,
              reason: str) -> None:
        """Send one record (``payload`` None: it could not be read at all) or part of one to the
        dead-letter topic. A consumer without a dead-letter producer (the recorder) logs it and
        counts it as dropped: the topic's own consumer dead-letters it."""
        if self._deadletter is None:
            log.error("dropping %s[%d]@%d: %s", full_topic, partition, offset, reason[:500])
            self.stats["dropped"] += 1
            return
        log.warning("dead-lettering %s[%d]@%d: %s", full_topic, partition, offset, reason[:500])
        DEAD_LETTERS.labels(_logical_of(full_topic), code).inc()
        self.stats["deadlettered"] += 1
        row = dead_letter_row(full_topic, partition, offset, payload, headers, reason, self._dead_letter_max,
                              self._dead_letter_key)
        self._deadletter.send(topic_name(self._run, "deadletter"), DEAD_LETTER, row)

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
            if isinstance(self._consumer, MemoryConsumerClient):
                await self._consumer.commit_from_listener(self._kafka_offsets(offsets))
            else:  # the coroutine behind KafkaConsumer.commit (kafka-python is pinned to 3.0.x)
                await self._consumer._coordinator._commit_offsets_sync_async(self._kafka_offsets(offsets))
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
