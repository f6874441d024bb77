"""Encode and decode wire messages: numpy columns <-> one Arrow IPC record batch.

A batch in memory is `Columns`: a dict from field name to a 1-D numpy array (numbers as typed
arrays, strings as object or `np.str_` arrays, binary as object arrays of bytes) or a `Ragged`
(list fields: flat values + offsets). Nothing is built row by row: numeric and list columns go
to Arrow without copies where the dtypes already match, and come back as read-only numpy views
of the received bytes. Strings decode to object arrays of `str`, binary to object arrays of
`bytes`, nullable fields to `None` where null.

Every message is described by two Kafka headers, `schema` and `schema_version`; `decode`
checks them and the IPC schema against `KINDS` and raises `DecodeError` with a short `reason`
code that consumers put in the dead-letter record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from schemas.messages import KINDS, MessageKind

SCHEMA_HEADER = "schema"
VERSION_HEADER = "schema_version"
_INT32_MAX = np.iinfo(np.int32).max
COMPRESSIONS = ("zstd", "lz4")
"""Arrow IPC body compressions `encode` accepts (Arrow's own buffer codecs, run in C++)."""
MAX_DECODED_BYTES = 256 * 1024 * 1024
"""Default bound on what one compressed message may declare it decompresses to."""


class SchemaError(ValueError):
    """Columns handed to `encode` do not fit the message kind (the message names the column)."""


class DecodeError(ValueError):
    """A received message cannot be decoded as a known kind.

    `reason` is one of: `missing_header`, `unknown_schema`, `wrong_schema` (a known kind, but
    not the one the consumer expected), `unknown_version`, `undecodable` (not an Arrow IPC
    stream of exactly one record batch), `schema_mismatch` (IPC fields differ from the kind's),
    `invalid_arrow` (buffers that fail Arrow's full validation, e.g. list offsets out of range),
    `unexpected_null` (a null in a non-nullable field), `empty` (no rows: every producer sends at
    least one), `too_large` (compressed buffers that declare more than the decoder's bound: a
    decompression bomb).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class Ragged:
    """A column of variable-length lists: row i is `values[offsets[i]:offsets[i + 1]]`.

    Invariants (checked): both arrays 1-D, `offsets` integer with `offsets[0] == 0`,
    non-decreasing, `offsets[-1] == len(values)`.
    """

    values: np.ndarray
    """All rows' items, concatenated."""
    offsets: np.ndarray
    """int32 or int64, length = rows + 1."""

    def __post_init__(self) -> None:
        if self.values.ndim != 1 or self.offsets.ndim != 1 or len(self.offsets) == 0:
            raise ValueError("Ragged needs 1-D values and non-empty 1-D offsets")
        if self.offsets.dtype not in (np.int32, np.int64):
            raise ValueError(f"Ragged offsets must be int32 or int64, got {self.offsets.dtype}")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.values):
            raise ValueError(
                f"Ragged offsets must run from 0 to len(values)={len(self.values)}, "
                f"got {self.offsets[0]}..{self.offsets[-1]}"
            )
        if len(self.offsets) > 2 and np.any(self.offsets[1:] < self.offsets[:-1]):
            raise ValueError("Ragged offsets must be non-decreasing")

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[float] | np.ndarray], dtype: npt.DTypeLike) -> Ragged:
        """Build from one sequence per row (copies); offsets are int32 unless they overflow."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] <= _INT32_MAX:
            offsets = offsets.astype(np.int32)
        if len(rows) and offsets[-1]:
            values = np.concatenate([np.asarray(r, dtype=dtype) for r in rows])
        else:
            values = np.zeros(0, dtype=dtype)
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Row i as a view into `values` (negative indices count from the end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """Number of items in each row (int64)."""
        return np.diff(self.offsets).astype(np.int64, copy=False)

    def equals(self, other: Ragged) -> bool:
        """Same rows, same value dtype (offset dtypes may differ)."""
        return (
            self.values.dtype == other.values.dtype
            and np.array_equal(self.offsets, other.offsets)
            and np.array_equal(self.values, other.values)
        )


Columns = dict[str, np.ndarray | Ragged]
"""A batch of rows as columns; see the module docstring for the dtypes."""


def headers_for(kind: MessageKind) -> list[tuple[str, bytes]]:
    """Kafka headers identifying a message of `kind`."""
    return [(SCHEMA_HEADER, kind.name.encode()), (VERSION_HEADER, str(kind.version).encode())]


def num_rows(columns: Columns) -> int:
    """Common length of all columns; `SchemaError` if they differ or there are none."""
    lengths = {name: len(col) for name, col in columns.items()}
    if not lengths:
        raise SchemaError("no columns")
    distinct = set(lengths.values())
    if len(distinct) != 1:
        raise SchemaError(f"columns have different lengths: {lengths}")
    return distinct.pop()


def take(columns: Columns, indices: np.ndarray) -> Columns:
    """Rows `indices` (any order, repeats and negative indices allowed) of every column,
    ragged-aware, vectorised."""
    n = num_rows(columns)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"indices out of range for {n} rows")
    idx = np.where(idx < 0, idx + n, idx)
    out: Columns = {}
    for name, col in columns.items():
        if isinstance(col, Ragged):
            starts = col.offsets[idx].astype(np.int64)
            lengths = col.offsets[idx + 1].astype(np.int64) - starts
            offsets = np.zeros(len(idx) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            # Position k of the output reads values[starts[row] + (k - offsets[row])].
            gather = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
            out[name] = Ragged(col.values[gather], offsets.astype(col.offsets.dtype))
        else:
            out[name] = col[idx]
    return out


def group_rows(columns: Columns) -> list[np.ndarray]:
    """Row indices of each group (rows sharing a ``group_id``), groups in order of first
    appearance, rows in order."""
    _, first, inverse = np.unique(columns["group_id"], return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    return [np.flatnonzero(inverse == g) for g in np.argsort(first)]


def split_groups(columns: Columns) -> list[Columns]:
    """The rows of a Trajectory or ScoredTrajectory batch, one Columns per group (see `group_rows`)."""
    return [take(columns, rows) for rows in group_rows(columns)]


def concat(batches: Sequence[Columns]) -> Columns:
    """Rows of all batches in order; every batch must have the same column names."""
    if not batches:
        raise ValueError("concat needs at least one batch")
    names = list(batches[0])
    for b in batches[1:]:
        if list(b) != names:
            raise SchemaError(f"concat: column names differ: {names} vs {list(b)}")
    out: Columns = {}
    for name in names:
        cols = [b[name] for b in batches]
        if isinstance(cols[0], Ragged):
            if not all(isinstance(c, Ragged) for c in cols):
                raise SchemaError(f"concat: column {name!r} is ragged in some batches only")
            shifts = np.cumsum([0] + [len(c.values) for c in cols[:-1]])
            offsets = np.concatenate(
                [cols[0].offsets[:1].astype(np.int64)]
                + [c.offsets[1:].astype(np.int64) + s for c, s in zip(cols, shifts)]
            )
            dtype = np.int32 if offsets[-1] <= _INT32_MAX else np.int64
            out[name] = Ragged(np.concatenate([c.values for c in cols]), offsets.astype(dtype))
        else:
            out[name] = np.concatenate(cols)
    return out


def _to_arrow(field: pa.Field, col: np.ndarray | Ragged) -> pa.Array:
    if pa.types.is_list(field.type):
        if not isinstance(col, Ragged):
            raise SchemaError(f"column {field.name!r} is a list field and needs a Ragged, got {type(col).__name__}")
        offsets = col.offsets
        if offsets.dtype != np.int32:
            if offsets[-1] > _INT32_MAX:
                raise SchemaError(f"column {field.name!r} has more than 2**31-1 items")
            offsets = offsets.astype(np.int32)
        try:
            values = pa.array(col.values, type=field.type.value_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise SchemaError(f"column {field.name!r} values do not fit {field.type.value_type}: {e}") from e
        return pa.ListArray.from_arrays(pa.array(offsets), values, type=field.type)
    if isinstance(col, Ragged):
        raise SchemaError(f"column {field.name!r} is {field.type}, not a list field")
    col = np.asarray(col)
    if col.ndim != 1:
        raise SchemaError(f"column {field.name!r} must be 1-D, got shape {col.shape}")
    if pa.types.is_integer(field.type) and col.dtype.kind not in "iu":
        raise SchemaError(f"column {field.name!r} is {field.type} but got dtype {col.dtype}")
    if pa.types.is_floating(field.type) and col.dtype.kind not in "iuf":
        raise SchemaError(f"column {field.name!r} is {field.type} but got dtype {col.dtype}")
    try:
        return pa.array(col, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SchemaError(f"column {field.name!r} does not fit {field.type}: {e}") from e


def encode(kind: MessageKind, columns: Columns, compression: str | None = None) -> bytes:
    """Columns -> Arrow IPC stream bytes holding one record batch of `kind`.

    `compression` (one of `COMPRESSIONS`, or None) compresses each buffer of the body with Arrow's
    own codec; any Arrow reader decompresses it. It pays for large messages only: it costs about
    0.3 ms per message whatever its size (bench/transport.py).

    Raises `SchemaError` (naming the column) for missing or extra columns, unequal lengths,
    values that do not fit the field type, or nulls in non-nullable fields.
    """
    return encode_batch(kind, to_record_batch(kind, columns), compression)


def encode_batch(kind: MessageKind, batch: pa.RecordBatch, compression: str | None = None) -> bytes:
    """One record batch already in `kind`'s schema -> Arrow IPC stream bytes (e.g. a replayed
    message read back from the lake); `compression` as for `encode`."""
    if not batch.schema.equals(kind.schema, check_metadata=False):
        raise SchemaError(f"{kind.name}: record batch schema {batch.schema} differs from {kind.schema}")
    if compression is not None and compression not in COMPRESSIONS:
        raise SchemaError(f"unknown Arrow compression {compression!r}; known: {list(COMPRESSIONS)} or None")
    sink = pa.BufferOutputStream()
    # One thread: every service is a process of its own, and Arrow's pool only adds hand-offs
    # (a 2 MB message compressed in 1.5 ms on one thread, 2.2 ms with the pool on 2 cores).
    options = pa.ipc.IpcWriteOptions(compression=compression, use_threads=False)
    with pa.ipc.new_stream(sink, kind.schema, options=options) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def to_record_batch(kind: MessageKind, columns: Columns) -> pa.RecordBatch:
    """Columns -> one Arrow record batch of `kind`'s schema (validated as for `encode`)."""
    names = kind.schema.names
    missing = [n for n in names if n not in columns]
    extra = [n for n in columns if n not in names]
    if missing or extra:
        raise SchemaError(f"{kind.name}: missing columns {missing}, unexpected columns {extra}")
    num_rows(columns)
    arrays = []
    for field in kind.schema:
        arr = _to_arrow(field, columns[field.name])
        if not field.nullable and arr.null_count:
            raise SchemaError(f"{kind.name}: column {field.name!r} is not nullable but has {arr.null_count} nulls")
        arrays.append(arr)
    return pa.RecordBatch.from_arrays(arrays, schema=kind.schema)


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def kind_from_headers(headers: Sequence[tuple[str, bytes | None]], expected: MessageKind | None = None) -> MessageKind:
    """The kind named by the `schema`/`schema_version` headers; `DecodeError` if unusable."""
    name_raw = _header(headers, SCHEMA_HEADER)
    version_raw = _header(headers, VERSION_HEADER)
    if name_raw is None or version_raw is None:
        absent = [h for h, v in ((SCHEMA_HEADER, name_raw), (VERSION_HEADER, version_raw)) if v is None]
        raise DecodeError("missing_header", f"message has no {' or '.join(absent)} header")
    name = name_raw.decode("utf-8", "replace")
    kind = KINDS.get(name)
    if kind is None:
        raise DecodeError("unknown_schema", f"unknown schema {name!r}; known: {sorted(KINDS)}")
    if expected is not None and kind.name != expected.name:
        raise DecodeError("wrong_schema", f"expected schema {expected.name!r}, got {kind.name!r}")
    if version_raw != str(kind.version).encode():
        raise DecodeError(
            "unknown_version",
            f"{kind.name} schema_version {version_raw.decode('utf-8', 'replace')!r} is not supported "
            f"(this build reads version {kind.version})",
        )
    return kind


def _from_arrow(arr: pa.Array) -> np.ndarray | Ragged:
    if isinstance(arr, pa.ListArray):
        offsets = arr.offsets.to_numpy()
        values = arr.values.to_numpy(zero_copy_only=False)
        if offsets[0] != 0 or offsets[-1] != len(values):  # sliced array: rebase
            values = values[offsets[0] : offsets[-1]]
            offsets = offsets - offsets[0]
        return Ragged(values, offsets)
    return arr.to_numpy(zero_copy_only=False)


def _fb_table(buf: memoryview, pos: int) -> tuple[int, memoryview]:
    """A flatbuffer table at `pos`: (its position, its vtable's field offsets)."""
    vtable = pos - int.from_bytes(buf[pos : pos + 4], "little", signed=True)
    size = int.from_bytes(buf[vtable : vtable + 2], "little")
    return pos, buf[vtable + 4 : vtable + size].cast("H")


def _fb_ref(buf: memoryview, table: tuple[int, memoryview], field: int) -> int | None:
    """Where table field `field` (a table or vector) points, None if absent."""
    pos, fields = table
    if field >= len(fields) or fields[field] == 0:
        return None
    at = pos + fields[field]
    return at + int.from_bytes(buf[at : at + 4], "little")


def declared_bytes(payload: bytes) -> int:
    """What the record batches of an Arrow IPC stream will occupy once decompressed, read from
    the stream's framing before anything is allocated.

    A compressed body buffer starts with its uncompressed length (int64, -1: stored as is), and
    Arrow allocates what it declares; a few kilobytes of zstd can declare gigabytes. Reads the
    RecordBatch flatbuffer (Message.fbs: `header` is field 2, RecordBatch's `buffers` field 2,
    `compression` field 3). Raises `ValueError` on framing it cannot read; Arrow's reader then
    reports the same stream as undecodable.
    """
    total = 0
    for message in pa.ipc.MessageReader.open_stream(payload):
        if message.type == "schema":
            continue
        if message.type != "record batch":  # dictionary batches (which also decompress) are never ours
            raise ValueError(f"unexpected {message.type} message")
        meta, body = memoryview(message.metadata), memoryview(message.body)
        root = _fb_table(meta, int.from_bytes(meta[0:4], "little"))
        header = _fb_ref(meta, root, 2)
        if header is None:
            raise ValueError("record batch message without a header")
        batch = _fb_table(meta, header)
        buffers = _fb_ref(meta, batch, 2)
        count = 0 if buffers is None else int.from_bytes(meta[buffers : buffers + 4], "little")
        spans = np.frombuffer(meta, dtype="<i8", count=2 * count, offset=buffers + 4).reshape(-1, 2) if count else ()
        compressed = _fb_ref(meta, batch, 3) is not None
        for offset, length in spans:
            # Every number is the sender's: a negative one would cancel another's bytes in the sum.
            offset, length = int(offset), int(length)
            if offset < 0 or length < 0 or offset + length > len(body):
                raise ValueError(f"buffer of {length} bytes at {offset} lies outside the {len(body)}-byte body")
            if not compressed or length < 8:
                total += length
                continue
            declared = int.from_bytes(body[offset : offset + 8], "little", signed=True)
            if declared < -1:
                raise ValueError(f"buffer at {offset} declares a negative length ({declared})")
            total += length - 8 if declared == -1 else declared
    return total


def decode(
    kind: MessageKind | None, payload: bytes, headers: Sequence[tuple[str, bytes | None]],
    max_decoded_bytes: int = MAX_DECODED_BYTES,
) -> tuple[MessageKind, Columns]:
    """Arrow IPC bytes + Kafka headers -> (kind, columns).

    `kind` is the kind the consumer expects (None accepts any known kind). A message whose
    buffers would take more than `max_decoded_bytes` once decompressed is refused before any is
    decompressed. Raises `DecodeError` with a `reason` code; see its docstring.
    """
    found = kind_from_headers(headers, kind)
    try:
        size = declared_bytes(payload)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError, ValueError, TypeError,
            IndexError) as e:
        raise DecodeError("undecodable", f"{found.name}: not a valid Arrow IPC stream: {e}") from e
    if size > max_decoded_bytes:
        raise DecodeError("too_large", f"{found.name}: its buffers declare {size:,} bytes once decompressed, "
                                       f"over the bound of {max_decoded_bytes:,}")
    try:
        reader = pa.ipc.open_stream(payload, options=pa.ipc.IpcReadOptions(use_threads=False))
        batches = list(reader)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as e:
        raise DecodeError("undecodable", f"{found.name}: not a valid Arrow IPC stream: {e}") from e
    if len(batches) != 1:
        raise DecodeError("undecodable", f"{found.name}: expected 1 record batch, got {len(batches)}")
    batch = batches[0]
    if not batch.schema.equals(found.schema, check_metadata=False):
        try:
            got = ", ".join(f"{f.name}: {f.type}" + ("" if f.nullable else " not null") for f in batch.schema)
        except UnicodeDecodeError:
            got = "field names that are not UTF-8"
        raise DecodeError("schema_mismatch", f"{found.name} v{found.version}: IPC schema differs: got [{got}]")
    try:
        # Reading an IPC stream checks only its framing: offsets pointing outside their buffers
        # (which would read foreign memory or crash later) need the full, O(n) validation.
        batch.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise DecodeError("invalid_arrow", f"{found.name}: record batch fails validation: {e}") from e
    if batch.num_rows == 0:
        raise DecodeError("empty", f"{found.name}: the record batch has no rows")
    columns: Columns = {}
    for field, arr in zip(found.schema, batch.columns):
        if not field.nullable and arr.null_count:
            raise DecodeError("unexpected_null", f"{found.name}: {arr.null_count} nulls in non-nullable {field.name!r}")
        if isinstance(arr, pa.ListArray) and arr.values.null_count:
            raise DecodeError("unexpected_null", f"{found.name}: null list items in {field.name!r}")
        try:
            columns[field.name] = _from_arrow(arr)
        except (UnicodeDecodeError, pa.ArrowException) as e:  # what full validation let through
            raise DecodeError("invalid_arrow", f"{found.name}: column {field.name!r} does not convert: {e}") from e
    return found, columns
