"""ERPO's prompt-history table partitioned like the topic it is built from (Kafka Streams' state stores).

Tickets, trajectories and scored groups are keyed by prompt id, so every group of a prompt lands on
the same partition of the `trajectories` topic, and whichever reward worker owns that partition
owns the prompt's history. A worker therefore keeps one `PartitionState` per partition it is
assigned: the ERPO table of that partition's prompts, the tickets already applied to it (ERPO
counts a ticket once, its first scored attempt), the (ticket, attempt) groups already scored (a
stage de-duplicates its own output by attempt: a later attempt of a ticket whose first group was
lost must still be scored and sent), and the offset up to which all of it is accounted for.

Each partition's state is snapshotted on its own (`<workdir>/erpo/trajectories-p<NNN>.parquet`,
the table with the offset and the de-duplication ids in its metadata), every
`erpo.snapshot_every` batches that touched it and whenever the partition is revoked; the group
commit for a partition follows its snapshot. A worker assigned a partition loads its snapshot and
continues from the snapshot's offset, so the groups after it are applied exactly once more and a
prompt's history is never split between workers or restarted at tau0 after a rebalance. A worker
killed between snapshots costs the groups since its last snapshot a second scoring (the learner
ignores the duplicates). A partition without a snapshot is rebuilt from the partition's start.

`rebuild_from_scored` replays a run's scored topic (the lake) into the tables one worker would
have: the check that partitioned state, rebalances and restarts lost or split nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.dedupe import BoundedSet
from pipeline.erpo.rule import ErpoRule
from pipeline.erpo.snapshots import load_snapshot, snapshot
from pipeline.erpo.store import GROUP_SCHEMA, HistoryStore, empty_table

log = logging.getLogger(__name__)

TOPIC = "trajectories"


def snapshot_path(root: Path, partition: int) -> Path:
    return Path(root) / f"{TOPIC}-p{partition:03d}.parquet"


@dataclass
class PartitionState:
    """What one reward worker knows of one `trajectories` partition."""

    partition: int
    store: HistoryStore
    applied: BoundedSet
    """Tickets whose first scored group was applied to the table."""
    scored: BoundedSet
    """``<ticket>/<attempt>`` of every group scored and sent."""
    position: int
    """Next offset of the partition not yet accounted for (0: from the start)."""
    batches: int = 0
    """Batches with records of this partition since the last snapshot."""


def attempt_key(ticket_id: str, attempt: int) -> str:
    return f"{ticket_id}/{attempt}"


class PartitionedHistory:
    """The ERPO state of the partitions a worker owns; snapshots in ``root``."""

    def __init__(self, rule: ErpoRule, root: Path, dedup_window: int, snapshot_every: int) -> None:
        self.rule, self.root = rule, Path(root)
        self.dedup_window, self.snapshot_every = dedup_window, snapshot_every
        self.parts: dict[int, PartitionState] = {}

    def assign(self, partition: int) -> PartitionState:
        """Load the partition's snapshot (or start it empty, from offset 0)."""
        path = snapshot_path(self.root, partition)
        snap = load_snapshot(path)
        state = PartitionState(
            partition, HistoryStore(self.rule, snap.table),
            BoundedSet(self.dedup_window, snap.seen_tickets), BoundedSet(self.dedup_window, snap.scored_attempts),
            snap.offsets.get((TOPIC, partition), 0))
        self.parts[partition] = state
        log.info("partition %d: %d prompts restored from %s, continuing at offset %d", partition, len(state.store),
                 path if path.exists() else "(no snapshot)", state.position)
        return state

    def save(self, partition: int, position: int) -> None:
        """Snapshot the partition's state as accounting for every record before ``position``."""
        state = self.parts[partition]
        state.position, state.batches = position, 0
        snapshot(state.store.to_frame(), {(TOPIC, partition): position}, snapshot_path(self.root, partition),
                      list(state.applied), list(state.scored))

    def revoke(self, partition: int) -> None:
        self.parts.pop(partition, None)

    def scored_already(self, partition: int, ticket_id: str, attempt: int) -> bool:
        return attempt_key(ticket_id, attempt) in self.parts[partition].scored

    def classify(self, partition: int, ticket_id: str, attempt: int) -> str:
        """``duplicate`` (this attempt was scored already), ``apply`` (score it, send it and apply it
        to the table: the ticket's first group) or ``send`` (score and send only: a later attempt
        of a ticket the table has counted). Records the decision."""
        state = self.parts[partition]
        if not state.scored.add(attempt_key(ticket_id, attempt)):
            return "duplicate"
        return "apply" if state.applied.add(ticket_id) else "send"

    def apply(self, partition: int, groups: pl.DataFrame, now: float) -> tuple[pl.DataFrame, int]:
        """Apply groups (`GROUP_SCHEMA` rows) of one partition: (its temperature updates,
        prompts reactivated by them)."""
        state = self.parts[partition]
        before = int(state.store.column("times_reactivated").sum())
        updates = state.store.apply(groups, now)
        return updates, int(state.store.column("times_reactivated").sum()) - before

    def processed(self, partitions: set[int]) -> None:
        """A batch held records of these partitions (applied, duplicates or dead letters alike:
        their offsets move on, and a snapshot commits them)."""
        for p in partitions:
            if p in self.parts:
                self.parts[p].batches += 1

    def due(self) -> list[int]:
        """Partitions with records in `snapshot_every` batches since their snapshot."""
        return [p for p, s in self.parts.items() if s.batches >= self.snapshot_every]

    def column(self, name: str) -> np.ndarray:
        """A table column over every owned partition."""
        cols = [s.store.column(name) for s in self.parts.values()]
        return np.concatenate(cols) if cols else np.zeros(0)

    def __len__(self) -> int:
        return sum(len(s.store) for s in self.parts.values())


def load_tables(root: Path) -> pl.DataFrame:
    """Every partition's snapshot under ``root``, as one table (a column ``partition``)."""
    frames = []
    for path in sorted(Path(root).glob(f"{TOPIC}-p*.parquet")):
        table = load_snapshot(path).table
        frames.append(table.with_columns(pl.lit(int(path.stem.rsplit("p", 1)[1]), pl.Int32).alias("partition")))
    return pl.concat(frames) if frames else empty_table().with_columns(pl.lit(0, pl.Int32).alias("partition"))


def rebuild_from_scored(scored: pl.DataFrame, rule: ErpoRule) -> pl.DataFrame:
    """The ERPO table one worker would hold after applying a run's scored groups: per partition in
    offset order, the first scored group of each ticket. ``scored`` is the lake's scored topic
    (`pipeline.lake.store.read_topic`: rows with ``_partition``, ``_offset``)."""
    if scored.is_empty():
        return empty_table()
    groups = (scored.sort("_partition", "_offset")
              .unique("group_id", keep="first", maintain_order=True)
              .unique("ticket_id", keep="first", maintain_order=True))
    store = HistoryStore(rule)
    for _, part in groups.group_by("_partition", maintain_order=True):
        store.apply(part.select(prompt_id="prompt_id", pass_rate="group_pass_rate",
                                policy_version="policy_version").cast(GROUP_SCHEMA), 0.0)
    return store.to_frame()

