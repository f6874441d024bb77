"""Snapshots of one ERPO history table: the table as Parquet, with what it accounts for in the
file's key-value metadata (the consumed offsets and the de-duplication ids).

One format, versioned by the metadata key ``rlstream.erpo.snapshot_version``: a file of any other
version (or none) is refused with an error naming both versions, never read half-way. A reward
worker writes one snapshot per `trajectories` partition it owns (`pipeline.erpo.partitions`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pipeline.atomic import atomic_path
from pipeline.erpo.store import check_table, empty_table

SNAPSHOT_VERSION = "1"
"""Format version written and the only one read."""
_VERSION_KEY = "rlstream.erpo.snapshot_version"
_OFFSETS_KEY = "rlstream.erpo.offsets"
_SEEN_KEY = "rlstream.erpo.seen_tickets"
_SCORED_KEY = "rlstream.erpo.scored_attempts"


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot file holds."""

    table: pl.DataFrame = field(default_factory=empty_table)
    """The history table (`pipeline.erpo.store.TABLE_SCHEMA`)."""
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    """(topic, partition) -> next offset to consume."""
    seen_tickets: list[str] = field(default_factory=list)
    """Tickets whose groups were applied to the table, oldest first."""
    scored_attempts: list[str] = field(default_factory=list)
    """``<ticket>/<attempt>`` of the groups scored and sent, oldest first."""


def snapshot(table: pl.DataFrame, offsets: Mapping[tuple[str, int], int], path: str | os.PathLike[str],
             seen_tickets: Sequence[str] = (), scored_attempts: Sequence[str] = ()) -> None:
    """Write the table to Parquet with the consumed offsets (and, for de-duplication, the ids of
    the tickets whose groups were applied and the ``<ticket>/<attempt>`` groups scored) in the
    file's key-value metadata.

    ``offsets`` maps (topic, partition) to the next offset to consume; it is stored as JSON
    (a list of ``[topic, partition, offset]``). The file is written to a temporary name in the
    same directory, fsynced, then renamed over ``path``, so a reader sees the old or the new
    snapshot, never a partial one.
    """
    check_table(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps([[str(t), int(p), int(o)] for (t, p), o in sorted(offsets.items())])
    with atomic_path(path) as tmp:
        table.write_parquet(
            tmp, metadata={_OFFSETS_KEY: payload, _VERSION_KEY: SNAPSHOT_VERSION,
                           _SEEN_KEY: json.dumps(list(seen_tickets)), _SCORED_KEY: json.dumps(list(scored_attempts))}
        )


def load_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read a :func:`snapshot`; a missing file gives an empty :class:`Snapshot`.

    Raises ``ValueError`` for a file of another format version (naming the version found and the
    one this build reads), one that lacks part of the metadata, or a table of another schema.
    """
    path = Path(path)
    if not path.exists():
        return Snapshot()
    meta = pl.read_parquet_metadata(path)
    found = meta.get(_VERSION_KEY)
    if found != SNAPSHOT_VERSION:
        what = f"format version {found!r}" if found is not None else "no format version (not an ERPO snapshot?)"
        raise ValueError(f"{path}: ERPO snapshot of {what}; this build reads version {SNAPSHOT_VERSION!r} only. "
                         "Remove it and the partition's table is rebuilt from the start of its topic partition")
    missing = [k for k in (_OFFSETS_KEY, _SEEN_KEY, _SCORED_KEY) if k not in meta]
    if missing:
        raise ValueError(f"{path}: ERPO snapshot of version {SNAPSHOT_VERSION!r} lacks the metadata {missing}")
    table = pl.read_parquet(path)
    check_table(table)
    return Snapshot(table, {(str(t), int(p)): int(o) for t, p, o in json.loads(meta[_OFFSETS_KEY])},
                    [str(t) for t in json.loads(meta[_SEEN_KEY])], [str(a) for a in json.loads(meta[_SCORED_KEY])])
