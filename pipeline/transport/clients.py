"""The broker clients under the transport, and the one place that chooses them: kafka-python's
for a Kafka cluster, or the in-process broker's (`pipeline.transport.memory`) for
``kafka.bootstrap_servers = "memory://<name>"``. Above `clients_for`, the topic admin, the producer
and the consumer run the same code on either.

Also here: the kafka-python settings a run's `KafkaConfig` makes (addresses, security, sizes,
timeouts), and everything the transport relies on inside kafka-python (the coroutine behind a
commit, the fetcher's record reading); kafka-python is pinned to the minor version this was
checked on.
"""

from __future__ import annotations

import os
import re
import traceback
from typing import Any, Literal

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.partitioner.default import murmur2

from pipeline.config import KafkaConfig
from pipeline.transport.memory import (
    MemoryAdminClient,
    MemoryBroker,
    MemoryConsumerClient,
    MemoryProducerClient,
    is_memory,
)

_MIN_FETCH_MAX_BYTES = 50 * 1024 * 1024  # kafka-python's default fetch_max_bytes


class TransportError(RuntimeError):
    """Messages could not be delivered to the broker."""


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
    for frame in traceback.extract_tb(error.__traceback__):
        if any(part in frame.filename for part in _RECORD_CODE) or (
                frame.filename.endswith("fetcher.py") and frame.name in _RECORD_FUNCTIONS):
            return True
    return False


def unreadable_partition(client: Any, error: BaseException) -> TopicPartition | None:
    """The partition whose records raised ``error`` in ``client``: the one kafka-python's fetcher
    was unpacking (its `_next_partition_records`), or the one the error names, or the only one
    assigned; None if none of them is assigned to ``client``."""
    records = getattr(getattr(client, "_fetcher", None), "_next_partition_records", None)
    tp = getattr(records, "topic_partition", None)
    if tp is None:
        m = re.search(r"TopicPartition\(topic='([^']*)', partition=(\d+)\)", str(error))
        tp = TopicPartition(m.group(1), int(m.group(2))) if m else None
    assigned = client.assignment()
    if tp is None and len(assigned) == 1:
        tp = next(iter(assigned))
    return tp if tp in assigned else None


class KafkaConsumerClient(KafkaConsumer):
    """kafka-python's consumer with the two calls the transport makes beyond its public API, which
    `MemoryConsumerClient` answers too."""

    @staticmethod
    def partition_of(key: bytes, partitions: int) -> int:
        """Index, among a topic's sorted partitions, of the one a producer sends ``key`` to: Kafka's
        murmur2 of the key, as kafka-python and the Java client hash it."""
        return (murmur2(key) & 0x7FFFFFFF) % partitions

    async def commit_from_listener(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit from a rebalance listener, which kafka-python 3 runs on its IO loop, where the
        blocking `commit` is refused: await the coroutine behind `commit` instead."""
        await self._coordinator._commit_offsets_sync_async(offsets)


class KafkaClients:
    """kafka-python clients of the cluster at ``kafka.bootstrap_servers``."""

    def __init__(self, cfg: KafkaConfig) -> None:
        self._cfg = cfg

    def admin(self, client_id: str) -> KafkaAdminClient:
        return KafkaAdminClient(client_id=client_id, **client_kwargs(self._cfg, "admin"))

    def producer(self, client_id: str) -> KafkaProducer:
        return KafkaProducer(client_id=client_id, **client_kwargs(self._cfg, "producer"))

    def consumer(self, client_id: str, group_id: str | None, auto_offset_reset: str) -> KafkaConsumerClient:
        return KafkaConsumerClient(client_id=client_id, group_id=group_id, auto_offset_reset=auto_offset_reset,
                                   **client_kwargs(self._cfg, "consumer"))


class MemoryClients:
    """Clients of the in-process broker of a ``memory://<name>`` address (which needs no client ids)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    def admin(self, client_id: str) -> MemoryAdminClient:
        return MemoryAdminClient(self._broker)

    def producer(self, client_id: str) -> MemoryProducerClient:
        return MemoryProducerClient(self._broker)

    def consumer(self, client_id: str, group_id: str | None, auto_offset_reset: str) -> MemoryConsumerClient:
        return MemoryConsumerClient(self._broker, group_id, auto_offset_reset)


def clients_for(cfg: KafkaConfig) -> KafkaClients | MemoryClients:
    """The clients of ``cfg.bootstrap_servers``: the only place the transport tells a Kafka cluster
    from the in-memory broker."""
    if is_memory(cfg.bootstrap_servers):
        return MemoryClients(MemoryBroker.named(cfg.bootstrap_servers))
    return KafkaClients(cfg)
