"""Dead letters: what a consumer does with a record it cannot use (Kafka Streams' "log and
continue"). The record goes to the run's `deadletter` topic as a `DeadLetter` message with its
source, its reason and its bytes kept byte for byte, cut to fit the producer's request size (with
the whole value's size and sha256), signed with the run's key when there is one
(`pipeline.transport.signature`); and the consumer carries on.

`RecordRejected` is how a service says that a decoded record is bad (`Consumer.guard`).
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from pipeline.config import KafkaConfig
from pipeline.transport import signature
from pipeline.transport.metrics import DEAD_LETTERS
from pipeline.transport.producer import Producer
from pipeline.transport.topics import logical_name, topic_name
from schemas import DEAD_LETTER, SCHEMA_HEADER, VERSION_HEADER, Columns

log = logging.getLogger(__name__)


class RecordRejected(Exception):
    """Raised inside `Consumer.guard` to dead-letter the delivery with a reason code and text."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


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


class DeadLetters:
    """Where one consumer sends what it cannot use: the run's dead-letter topic through
    ``producer``; or, with no producer (the recorder: the topic's own consumer dead-letters the
    record), only the log and the `dropped` count."""

    def __init__(self, cfg: KafkaConfig, run: str, producer: Producer | None) -> None:
        self.producer = producer
        self._run = run
        self._max_bytes = max(1024, cfg.max_message_bytes - 64 * 1024)
        self._key = (signature.read_key(cfg.dead_letter_key_file)
                     if cfg.dead_letter_key_file is not None and producer is not None else None)
        self.counts: dict[str, int] = {"deadlettered": 0, "dropped": 0}
        """Records sent to the dead-letter topic; unusable and not kept."""

    @property
    def outcome(self) -> str:
        """The `MESSAGES` outcome of a record that comes here."""
        return "deadlettered" if self.producer is not None else "dropped"

    def send(self, full_topic: str, partition: int, offset: int, payload: bytes | None, headers, code: str,
             reason: str) -> None:
        """Send one record (``payload`` None: it could not be read at all) or part of one to the
        dead-letter topic (`code` labels the metric), or log and count it as dropped."""
        if self.producer is None:
            log.error("dropping %s[%d]@%d: %s", full_topic, partition, offset, reason[:500])
            self.counts["dropped"] += 1
            return
        log.warning("dead-lettering %s[%d]@%d: %s", full_topic, partition, offset, reason[:500])
        DEAD_LETTERS.labels(logical_name(full_topic), code).inc()
        self.counts["deadlettered"] += 1
        row = dead_letter_row(full_topic, partition, offset, payload, headers, reason, self._max_bytes, self._key)
        self.producer.send(topic_name(self._run, "deadletter"), DEAD_LETTER, row)

    def flush(self) -> None:
        """Flush the dead-letter producer, if there is one."""
        if self.producer is not None:
            self.producer.flush()
