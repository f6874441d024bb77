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


# --------------------------------------------------------------------------------------------
# Hostile records for every topic of a running run (the end-to-end fuzz test)

import os  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from factories import policy_update, scored_group, temperature_update, ticket, trajectory_group  # noqa: E402
from malformed import _semantic  # noqa: E402
from schemas import (  # noqa: E402
    DEAD_LETTER, POLICY_UPDATE, PROMPT_TICKET, SCORED_TRAJECTORY, TEMPERATURE_UPDATE, TRAJECTORY, encode,
    headers_for, take)
from schemas.codec import to_record_batch  # noqa: E402

TOPIC_KINDS = {"prompts": PROMPT_TICKET, "trajectories": TRAJECTORY, "scored": SCORED_TRAJECTORY,
               "temperature": TEMPERATURE_UPDATE, "policy": POLICY_UPDATE, "deadletter": DEAD_LETTER}
FAR = 10**9
"""A policy version the run never reaches: every hostile announcement is newer than the engine's."""


def _dead_letter() -> dict:
    return {"source_topic": np.array(["x.trajectories"], object), "source_partition": np.array([0], np.int32),
            "source_offset": np.array([0], np.int64), "reason": np.array(["undecodable: x"], object),
            "schema_header": np.array([None], object), "schema_version_header": np.array([None], object),
            "payload": np.array([b"x"], object), "payload_bytes": np.array([1], np.int64),
            "payload_sha256": np.array(["0" * 64], object), "dead_at": np.array([0.0]),
            "signature": np.array(["ab" * 32], object)}  # forged: no key signs it


def valid_columns(topic: str, rng: np.random.Generator) -> dict:
    """Well-formed columns of the topic's kind (the base every semantic break starts from)."""
    k = int(rng.integers(0, 10**6))
    return {"prompts": lambda: ticket(f"e0-{k:06d}", f"p{k}"),
            "trajectories": lambda: trajectory_group(f"e0-{k:06d}", f"p{k}"),
            "scored": lambda: scored_group([1, 0, 1, 0], ticket_id=f"e0-{k:06d}", prompt_id=f"p{k}"),
            "temperature": lambda: temperature_update(f"p{k}"),
            "policy": lambda: policy_update(FAR + k),
            "deadletter": _dead_letter}[topic]()


def _with(cols: dict, **changes) -> dict:
    cols = dict(cols)
    for name, value in changes.items():
        n = len(next(iter(cols.values())))
        cols[name] = np.full(n, value, dtype=cols[name].dtype) if np.isscalar(value) or value is None else value
    return cols


def _encode_unchecked(kind, cols: dict, schema: pa.Schema | None = None) -> bytes:
    """IPC bytes of columns past `encode`'s checks (e.g. a nullable copy of the schema)."""
    batch = to_record_batch(kind, cols)
    if schema is not None:
        batch = pa.RecordBatch.from_arrays(batch.columns, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _null_in(kind, cols: dict) -> bytes:
    batch = to_record_batch(kind, cols)
    j = next(i for i, f in enumerate(kind.schema) if not f.nullable and not pa.types.is_list(f.type))
    col = batch.column(j)
    nulled = pa.array([None] + col.to_pylist()[1:], type=col.type)
    schema = pa.schema([f.with_nullable(True) if i == j else f for i, f in enumerate(kind.schema)])
    arrays = [nulled if i == j else batch.column(i) for i in range(batch.num_columns)]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return sink.getvalue().to_pybytes()


def _two_batches(kind, cols: dict) -> bytes:
    batch = to_record_batch(kind, cols)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, kind.schema) as w:
        w.write_batch(batch)
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _bad_offsets(kind, cols: dict) -> bytes:
    """A string column whose offsets run past its data (decodes; fails Arrow's full validation)."""
    name = next(f.name for f in kind.schema if pa.types.is_string(f.type))
    marker = "Z" * 4093
    payload = encode(kind, _with(cols, **{name: np.array([marker] * len(cols[name]), dtype=object)}))
    good = struct.pack("<2i", 0, 4093)
    assert good in payload
    return payload.replace(good, struct.pack("<2i", 0, 1 << 30), 1)


def _bomb(kind, cols: dict) -> bytes:
    """A zstd-compressed message whose first buffer declares 1 TiB once decompressed (Arrow
    allocates what a buffer declares; the consumer must refuse it from the framing)."""
    payload = encode(kind, cols, "zstd")
    body = next(m for m in pa.ipc.MessageReader.open_stream(payload) if m.type == "record batch").body.to_pybytes()
    start = payload.rindex(body)  # the body's first bytes: its first non-empty buffer's declared length
    return payload[:start] + struct.pack("<q", 1 << 40) + payload[start + 8 :]


def _semantic_breaks(topic: str, rng: np.random.Generator, policy_root: Path, prompt_ids: list[str]) -> dict:
    """name -> columns that decode but carry a value the topic's consumer must refuse
    (``prompt_ids``: the run's own, so a check that looks past the prompt is reached)."""
    k = int(rng.integers(0, 10**6))
    real = str(prompt_ids[int(rng.integers(0, len(prompt_ids)))]) if prompt_ids else "p1"
    if topic == "prompts":
        return {"ticket_id_unicode_digit": ticket("e0-00000\u0663", "p1"),
                "ticket_epoch_mismatch": ticket("e3-000001", "p1", epoch=0),
                "ticket_attempt_negative": ticket("e0-000001", "p1", attempt=-1),
                "ticket_attempt_huge": ticket("e0-000001", "p1", attempt=10**6),
                "ticket_prompt_empty": ticket("e0-000001", "p1", text=""),
                "ticket_answer_empty": ticket("e0-000001", "p1", answer=""),
                "ticket_prompt_id_unicode": ticket("e0-000001", "p\u00e9"),
                "ticket_prompt_too_long_for_engine": ticket("e0-000001", "p1", text="1+" * 200 + "1=")}
    if topic == "trajectories":
        name, g = _semantic(rng)
        return {f"group_{name}": g,
                "group_ticket_unicode_digit": trajectory_group("e0-00000\u0663", "p1"),
                "group_attempt_huge": trajectory_group("e0-000001", "p1", attempt=10**6)}
    if topic == "scored":
        g = scored_group([1, 0, 1, 0], ticket_id=f"e0-{k:06d}", prompt_id=f"p{k}")
        return {"scored_reward_nan": _with(g, reward=np.array([np.nan, 0, 1, 0], np.float32)),
                "scored_pass_rate_wrong": _with(g, group_pass_rate=np.float32(0.9)),
                "scored_status_unknown": _with(g, verify_status="great"),
                "scored_ticket_unicode_digit": _with(g, ticket_id="e0-00000\u0663"),
                "scored_unknown_ticket": scored_group([1, 0], ticket_id="e99-000001", prompt_id=real),
                "scored_future_version": scored_group([1, 0], ticket_id="e0-000001", prompt_id=real, version=FAR)}
    if topic == "temperature":
        return {"temperature_nan": temperature_update(temperature=np.nan),
                "temperature_negative": temperature_update(temperature=-1.0),
                "temperature_too_high": temperature_update(temperature=7.5),
                "temperature_inf": temperature_update(temperature=np.inf),
                "temperature_reason_unknown": temperature_update(reason="because"),
                "temperature_prompt_id_unicode": temperature_update(prompt_id="p\u0663")}
    if topic == "policy":
        v = FAR + 10 + k
        (fifo, link, fake), traps = _traps(policy_root), range(FAR + 1, FAR + 4)
        return {"policy_version_negative": policy_update(-5),
                "policy_sha_malformed": policy_update(v, sha256="xyz"),
                "policy_uri_outside_run": policy_update(v, uri="/etc"),
                "policy_uri_traversal": policy_update(v, uri=str(policy_root / ".." / ".." / f"v{v:06d}")),
                "policy_folder_fifo": policy_update(traps[0], uri=str(fifo)),
                "policy_folder_symlink": policy_update(traps[1], uri=str(link)),
                "policy_manifest_hash_wrong": policy_update(traps[2], uri=str(fake))}
    return {"deadletter_absurd_values": _with(_dead_letter(), source_offset=np.array([-7], np.int64))}


def _traps(policy_root: Path) -> tuple[Path, Path, Path]:
    return tuple(policy_root / f"v{FAR + i:06d}" for i in (1, 2, 3))


def prepare_policy_traps(policy_root: Path) -> None:
    """Make the folders the policy breaks point at: a FIFO, a symlink out of the run, a folder whose
    manifest does not hash to what is announced."""
    policy_root.mkdir(parents=True, exist_ok=True)
    fifo, link, fake = _traps(policy_root)
    if not fifo.exists():
        os.mkfifo(fifo)
    if not link.is_symlink():
        os.symlink("/tmp", link)
    if not fake.exists():
        fake.mkdir()
        (fake / "manifest.json").write_text('{"format": "rlstream-policy/1", "files": {}}')


@dataclass
class Injector:
    """Writes hostile records into a run's topics and remembers where each landed."""

    bootstrap: str
    run: str
    policy_root: Path
    max_message_bytes: int
    prompt_ids: list[str] = field(default_factory=list)
    """The run's prompt ids (some breaks need a prompt the consumer knows)."""
    sent: list[tuple[str, int, int, str]] = field(default_factory=list)
    """(logical topic, partition, offset, class)."""

    def __post_init__(self) -> None:
        self.producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=20,
                                      max_request_size=self.max_message_bytes + 2**20, acks="all")
        self._futures: list = []

    def _send(self, topic: str, cls: str, value: bytes, headers, key: bytes | None = None) -> None:
        future = self.producer.send(f"{self.run}.{topic}", value=value, key=key or uuid.uuid4().bytes,
                                    headers=list(headers))
        self._futures.append((topic, cls, future))

    def flush(self) -> None:
        self.producer.flush()
        for topic, cls, f in self._futures:
            meta = f.get(timeout=60)
            self.sent.append((topic, meta.partition, meta.offset, cls))
        self._futures.clear()

    def one(self, topic: str, rng: np.random.Generator) -> None:
        """One hostile record for ``topic``, its class drawn at random (every class comes up)."""
        kind = TOPIC_KINDS[topic]
        hdr = headers_for(kind)
        cols = valid_columns(topic, rng)
        other = POLICY_UPDATE if kind is not POLICY_UPDATE else TRAJECTORY
        generic = {
            "garbage": lambda: (rng.bytes(int(rng.integers(0, 400))), hdr),
            "truncated": lambda: (encode(kind, cols)[: int(rng.integers(1, 64))], hdr),
            "two_batches": lambda: (_two_batches(kind, cols), hdr),
            "headers_missing": lambda: (encode(kind, cols), []),
            "header_version_unknown": lambda: (encode(kind, cols), [("schema", kind.name.encode()),
                                                                   ("schema_version", b"99")]),
            "header_value_not_utf8": lambda: (encode(kind, cols), [("schema", b"\xff\xfe"), ("schema_version", b"1")]),
            "header_other_kind": lambda: (encode(other, valid_columns("policy" if other is POLICY_UPDATE
                                                                      else "trajectories", rng)),
                                          headers_for(other)),
            "payload_other_kind": lambda: (encode(other, valid_columns("policy" if other is POLICY_UPDATE
                                                                       else "trajectories", rng)), hdr),
            "null_in_required_field": lambda: (_null_in(kind, cols), hdr),
            "zero_rows": lambda: (encode(kind, take(cols, np.array([], dtype=np.int64))), hdr),
            "arrow_offsets_out_of_range": lambda: (_bad_offsets(kind, cols), hdr),
            "decompression_bomb": lambda: (_bomb(kind, cols), hdr),
        }
        semantic = _semantic_breaks(topic, rng, self.policy_root, self.prompt_ids)
        choice = int(rng.integers(0, len(generic) + len(semantic) + len(UNREADABLE)))
        if choice < len(generic):
            cls = list(generic)[choice]
            value, headers = generic[cls]()
            self._send(topic, cls, value, headers)
        elif choice < len(generic) + len(semantic):
            cls = list(semantic)[choice - len(generic)]
            self._send(topic, cls, encode(kind, semantic[cls]), hdr)
        else:
            cls = list(UNREADABLE)[choice - len(generic) - len(semantic)]
            self.flush()  # the rewrite must touch this record's batch only
            meta = send_unreadable(self.producer, f"{self.run}.{topic}", cls, encode(kind, cols), hdr,
                                   key=uuid.uuid4().bytes)
            self.sent.append((topic, meta.partition, meta.offset, cls))

    def oversized(self, topic: str) -> None:
        """A record just under the broker's size limit: its dead letter must be cut to fit."""
        self._send(topic, "oversized", b"\x00" * (self.max_message_bytes - 4096), headers_for(TOPIC_KINDS[topic]))

    def close(self) -> None:
        self.flush()
        self.producer.close()
