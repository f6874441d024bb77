"""Recorder: every topic of a run into the Parquet lake (`pipeline.lake.store`), exactly what flowed.

Consumes all topics in its own consumer group (`<run>.recorder`), buffers decoded messages per
(topic, policy version) and writes them out when the buffer passes `recorder.flush_rows` rows or
`recorder.flush_mb`, or `recorder.flush_every_s` after the last write; offsets are committed only
after the files covering them are in place. On SIGTERM it drains what the topics hold (until two
polls come back empty), writes, commits and exits, so a launcher that stops it last records the
whole run.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge

from pipeline.config import RunConfig
from pipeline.flow.commit import Committer
from pipeline.lake.store import LakeWriter
from pipeline.transport.consumer import Consumer
from pipeline.transport.deadletters import dead_letter_row
from pipeline.transport.topics import TOPICS, topic_name
from schemas import num_rows
from services.common import StopFlag, worker_id
from services.metrics import serve

log = logging.getLogger(__name__)

ROWS = Counter("rlstream_recorder_rows_total", "Rows written to the lake, by logical topic.", ["topic"])
FILES = Counter("rlstream_recorder_files_total", "Parquet files written to the lake.")
BUFFERED = Gauge("rlstream_recorder_buffered_bytes", "Bytes of decoded messages waiting to be written.")
UNRECORDED = Counter("rlstream_recorder_unrecorded_total", "Records that decoded but could not be written as rows "
                     "(kept as bytes in the lake's unrecorded-<topic> table), by logical topic.", ["topic"])


def lake_dir(cfg: RunConfig):
    return cfg.recorder.lake_dir or cfg.workdir / "lake"


def run(cfg: RunConfig, worker_index: int = 0, stop=None) -> None:
    """Record until SIGTERM (or until ``stop`` is true: a caller in-process passes ``True`` to
    record what the topics hold and return)."""
    stop = StopFlag() if stop is None else stop
    rc = cfg.recorder
    root = lake_dir(cfg)
    consumer = Consumer(cfg.kafka, cfg.name, list(TOPICS), group_id=f"{cfg.name}.recorder",
                        client_id=f"{cfg.name}-recorder-{worker_id()}", deadletter=None)
    committer = Committer(consumer)  # no producer: the recorder sends nothing
    writer = LakeWriter(root, f"{worker_index}")
    serve(cfg, "recorder", str(worker_index))
    log.info("recorder ready: %d topics into %s", len(TOPICS), root)
    last_flush = time.monotonic()
    rows_by_topic: dict[str, int] = {}

    def write(positions: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        FILES.inc(len(writer.flush()))
        return positions  # the files now in place cover every record polled

    def flush() -> None:
        nonlocal last_flush
        committer.commit(write)
        for topic, n in rows_by_topic.items():
            ROWS.labels(topic).inc(n)
        rows_by_topic.clear()
        BUFFERED.set(0)
        last_flush = time.monotonic()

    def take(deliveries) -> None:
        for d in deliveries:
            try:
                writer.add(d.topic, d.columns, d.partition, d.offset, d.timestamp_ms)
            except Exception as e:  # noqa: BLE001 -- one record must not end the recorder, nor vanish
                # It decoded but cannot be written as rows: its bytes go to the lake's table of
                # unrecorded records (the reconciliation counts them), never silently past the commit.
                # If even that fails, the recorder stops before committing past it.
                log.exception("cannot record %s[%d]@%d as rows; keeping its bytes", d.topic, d.partition, d.offset)
                reason = f"unrecordable: {type(e).__name__}: {e}"
                writer.add_unrecorded(d.topic, dead_letter_row(topic_name(cfg.name, d.topic), d.partition, d.offset,
                                                               d.value, d.headers, reason, len(d.value)),
                                      d.partition, d.offset, d.timestamp_ms)
                UNRECORDED.labels(d.topic).inc()
                continue
            rows_by_topic[d.topic] = rows_by_topic.get(d.topic, 0) + num_rows(d.columns)
        BUFFERED.set(writer.buffered_bytes)

    try:
        while not stop:
            take(consumer.poll(timeout_ms=rc.poll_timeout_ms))
            due = time.monotonic() - last_flush >= rc.flush_every_s
            if writer.buffered_rows >= rc.flush_rows or writer.buffered_bytes >= rc.flush_mb * 2**20 or (
                    due and writer.buffered_rows):
                flush()
        empty = 0
        while empty < 2:  # drain what the topics still hold
            got = consumer.poll(timeout_ms=rc.poll_timeout_ms)
            take(got)
            empty = 0 if got else empty + 1
            if writer.buffered_bytes >= rc.flush_mb * 2**20:
                flush()
        flush()
    finally:
        consumer.close()
        log.info("recorder stopped: %d rows in %s (undecodable, left to the dead-letter topic: %d)",
                 writer.written_rows, root, consumer.stats["dropped"])
