"""Records a buggy or hostile producer could write, including ones the Kafka client cannot read.

kafka-python's producer only writes well-formed record batches, so the unreadable ones are made by
rewriting a batch the producer just built (`rewriting`): a CRC that does not match, a compression
codec whose library this machine lacks (snappy, lz4), a header key that is not UTF-8. The broker
(Tansu) stores them as they are; a consumer's client raises when it reaches them.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator

from kafka import KafkaProducer
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecordsBuilder
from kafka.record.util import calc_crc32c

_ATTRS, _CRC = DefaultRecordBatchBuilder.ATTRIBUTES_OFFSET, DefaultRecordBatchBuilder.CRC_OFFSET
BAD_KEY_MARK = "\x7fKEY"
"""A header key `rewrite_header_key` turns into bytes that are not UTF-8."""


def _fix_crc(buf: bytearray) -> None:
    struct.pack_into(">I", buf, _CRC, calc_crc32c(memoryview(buf)[_ATTRS:]))


def break_crc(buf: bytearray) -> None:
    buf[-1] ^= 0xFF


def codec(n: int) -> Callable[[bytearray], None]:
    """Claim compression codec ``n`` (2 snappy, 3 lz4) for an uncompressed batch."""
    def rewrite(buf: bytearray) -> None:
        attrs = struct.unpack_from(">h", buf, _ATTRS)[0]
        struct.pack_into(">h", buf, _ATTRS, (attrs & ~0x7) | n)
        _fix_crc(buf)
    return rewrite


def bad_header_key(buf: bytearray) -> None:
    i = bytes(buf).find(BAD_KEY_MARK.encode())
    assert i > 0, "the record has no header key to rewrite"
    buf[i:i + 4] = b"\xff\xfeKE"
    _fix_crc(buf)


UNREADABLE = {"bad_crc": break_crc, "snappy_without_library": codec(2), "lz4_without_library": codec(3),
              "header_key_not_utf8": bad_header_key}


@contextlib.contextmanager
def rewriting(transform: Callable[[bytearray], None]) -> Iterator[None]:
    """Apply ``transform`` to every record batch built meanwhile (in this process)."""
    original = MemoryRecordsBuilder.close

    def close(self):
        fresh = not self._closed
        original(self)
        if fresh:
            transform(self._buffer)

    MemoryRecordsBuilder.close = close
    try:
        yield
    finally:
        MemoryRecordsBuilder.close = original


def send_unreadable(producer: KafkaProducer, topic: str, kind: str, value: bytes,
                    headers: list[tuple[str, bytes]], key: bytes | None = None):
    """Send one record the consumer's client cannot read; its RecordMetadata. ``producer`` must
    not compress (the rewrites assume a plain batch) and sends nothing else meanwhile."""
    if kind == "header_key_not_utf8":
        headers = list(headers) + [(BAD_KEY_MARK, b"x")]
    with rewriting(UNREADABLE[kind]):
        future = producer.send(topic, value=value, key=key, headers=headers)
        producer.flush()
    return future.get(timeout=30)
