"""The producer of a run's Arrow messages: encodes typed columns (Arrow-compressed when large),
adds the `schema`/`schema_version` headers and sends them to full Kafka topic names; `flush`
says whether the broker acknowledged everything sent."""

from __future__ import annotations

import logging

import pyarrow as pa
from kafka.errors import KafkaTimeoutError
from kafka.producer.future import FutureRecordMetadata

from pipeline.config import KafkaConfig
from pipeline.transport.clients import TransportError, clients_for
from pipeline.transport.metrics import BYTES, MESSAGES
from pipeline.transport.topics import TOPICS, logical_name
from schemas import Columns, MessageKind, encode_batch, headers_for, to_record_batch

log = logging.getLogger(__name__)


def _check_topic_kind(topic: str, kind: MessageKind) -> None:
    spec = TOPICS.get(logical_name(topic))
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
        self._producer = clients_for(cfg).producer(client_id)
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
        MESSAGES.labels(logical_name(topic), "produced").inc()
        BYTES.labels(logical_name(topic), "produced").inc(len(payload))
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
