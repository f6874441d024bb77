"""The trajectory lake: every message of a run as Parquet, partitioned by topic and policy version.

Layout (Hive-style, so Polars/DuckDB/Spark read it as one dataset)::

    <lake>/topic=<logical topic>/version=<policy version>/part-<writer>-<seq>.parquet

Each file holds the message's own columns (its Arrow schema from `schemas/`) plus the Kafka
coordinates ``_partition``, ``_offset`` and ``_timestamp_ms``. The version of a row is the policy
version the message belongs to: ``policy_version`` of trajectories and scored groups,
``issued_version`` of tickets, ``decided_at_version`` of temperature updates, ``version`` of policy
updates; dead letters go under ``version=-1``.

Files are written to a temporary name and renamed, so readers never see a partial file. The
recorder commits its offsets only after the files covering them are renamed, so the lake holds
everything that flowed; a recorder killed between the two writes those records again on restart,
so the lake is at-least-once, and :func:`read_topic` de-duplicates by (partition, offset).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.transport.topics import TOPICS
from schemas import DEAD_LETTER, Columns, to_record_batch

#: The column holding the policy version of each topic's rows (None: no version, stored as -1).
VERSION_COLUMN: dict[str, str | None] = {
    "prompts": "issued_version",
    "trajectories": "policy_version",
    "scored": "policy_version",
    "temperature": "decided_at_version",
    "policy": "version",
    "deadletter": None,
}
META_COLUMNS = ("_partition", "_offset", "_timestamp_ms")


def unrecorded_table(topic: str) -> str:
    """The lake table of the records of logical ``topic`` the recorder could not write as rows."""
    return f"unrecorded-{topic}"


class LakeWriter:
    """Buffers decoded messages per (topic, version) and writes them as Parquet files.

    Memory is bounded by the caller flushing when :attr:`buffered_bytes` or
    :attr:`buffered_rows` pass its limits. :meth:`flush` writes every buffer and returns the
    paths written.
    """

    def __init__(self, root: Path, writer_id: str, compression: str = "zstd") -> None:
        self.root = Path(root)
        self.writer_id = writer_id
        self.compression = compression
        self._buffers: dict[tuple[str, int], list[pa.RecordBatch]] = defaultdict(list)
        self._seq = 0
        self.buffered_rows = 0
        self.buffered_bytes = 0
        self.written_rows = 0

    def add(self, topic: str, columns: Columns, partition: int, offset: int, timestamp_ms: int) -> None:
        """Buffer one decoded message of logical ``topic`` read at (partition, offset)."""
        kind = TOPICS[topic].kind
        batch = to_record_batch(kind, columns)
        n = batch.num_rows
        batch = batch.append_column("_partition", pa.array(np.full(n, partition, np.int32)))
        batch = batch.append_column("_offset", pa.array(np.full(n, offset, np.int64)))
        batch = batch.append_column("_timestamp_ms", pa.array(np.full(n, timestamp_ms, np.int64)))
        vcol = VERSION_COLUMN[topic]
        versions = np.asarray(columns[vcol]) if vcol else np.full(n, -1, np.int64)
        for v in np.unique(versions):
            rows = batch if versions.size and (versions == v).all() else batch.filter(pa.array(versions == v))
            self._buffers[(topic, int(v))].append(rows)
        self.buffered_rows += n
        self.buffered_bytes += batch.nbytes

    def add_unrecorded(self, topic: str, dead_letter: Columns, partition: int, offset: int, timestamp_ms: int) -> None:
        """Buffer a record of logical ``topic`` that could not be recorded as its rows: its bytes
        and the reason, as a DeadLetter row (``dead_letter``), in the table `unrecorded_table`
        (``topic`` partition and offset as for any row), so the lake says what it lacks."""
        batch = to_record_batch(DEAD_LETTER, dead_letter)
        batch = batch.append_column("_partition", pa.array(np.full(1, partition, np.int32)))
        batch = batch.append_column("_offset", pa.array(np.full(1, offset, np.int64)))
        batch = batch.append_column("_timestamp_ms", pa.array(np.full(1, timestamp_ms, np.int64)))
        self._buffers[(unrecorded_table(topic), -1)].append(batch)
        self.buffered_rows += 1
        self.buffered_bytes += batch.nbytes

    def flush(self) -> list[Path]:
        written = []
        for (topic, version), batches in self._buffers.items():
            folder = self.root / f"topic={topic}" / f"version={version}"
            folder.mkdir(parents=True, exist_ok=True)
            self._seq += 1
            final = folder / f"part-{self.writer_id}-{self._seq:08d}-{uuid.uuid4().hex[:8]}.parquet"
            with atomic_path(final) as tmp:
                pq.write_table(pa.Table.from_batches(batches), tmp, compression=self.compression)
            written.append(final)
            self.written_rows += sum(b.num_rows for b in batches)
        self._buffers.clear()
        self.buffered_rows = self.buffered_bytes = 0
        return written


def upgrade(rows: pl.DataFrame, topic: str) -> pl.DataFrame:
    """Rows recorded under an older schema version, with the columns added since filled in:
    ``attempt`` 0 (before ticket leases, every group answered a ticket's first issue), a dead
    letter's ``payload_bytes``, ``payload_sha256`` and ``signature`` (-1, "" and "": not recorded,
    unsigned)."""
    names = TOPICS[topic].kind.schema.names
    fill = {"attempt": pl.lit(0, pl.Int32), "payload_bytes": pl.lit(-1, pl.Int64), "payload_sha256": pl.lit(""),
            "signature": pl.lit("")}
    missing = [pl_col.alias(name) for name, pl_col in fill.items() if name in names and name not in rows.columns]
    return rows.with_columns(missing) if missing else rows


def message_batch(message: pl.DataFrame, topic: str) -> pa.RecordBatch:
    """One recorded message's rows (as `read_topic` gives them, partitioned by `_partition` and
    `_offset`) as the Arrow record batch it was sent as: the lake's own columns dropped, the
    topic's schema in its order and types."""
    schema = TOPICS[topic].kind.schema
    table = message.drop([*META_COLUMNS, "version"]).to_arrow().select(schema.names).cast(schema)
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema)


def topics_in(lake: Path) -> list[str]:
    return sorted(p.name.split("=", 1)[1] for p in Path(lake).glob("topic=*") if p.is_dir())


def read_topic(lake: Path, topic: str) -> pl.DataFrame:
    """Every row of ``topic`` in the lake, de-duplicated by message, sorted by broker time (then
    partition and offset), with a ``version`` column from the path. An empty frame if the topic
    was never recorded.

    A message re-recorded after a recorder restart appears in two files with the same
    (partition, offset); only the copy in the first file (by name, i.e. by writer sequence) is
    kept, whole."""
    files = sorted(Path(lake).glob(f"topic={topic}/version=*/*.parquet"), key=lambda f: f.name)
    if not files:
        return pl.DataFrame()
    df = pl.concat([
        pl.read_parquet(f).with_columns(pl.lit(int(f.parent.name.split("=", 1)[1]), pl.Int64).alias("version"),
                                        pl.lit(i, pl.Int32).alias("_file"))
        for i, f in enumerate(files)
    ], how="vertical_relaxed")
    first = df.group_by("_partition", "_offset", "version").agg(pl.col("_file").min())
    return (df.join(first, on=["_partition", "_offset", "version", "_file"], how="semi")
            .sort("_timestamp_ms", "_partition", "_offset", maintain_order=True)
            .drop("_file"))
