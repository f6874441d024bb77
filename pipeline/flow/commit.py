"""The commit protocol every consuming service runs: flush, persist, commit, in that order.

A consumer's committed offset says "every record before it is done"; "done" means its results are
acknowledged by the broker and the state it changed is on disk. So `Committer.commit` runs:

1. **flush** every producer the service writes its results (and dead letters) with: results
   acknowledged at the configured acks level, or an error;
2. **persist** the state the records changed (a callable the service passes: it gets the
   consumer's positions and returns the offsets its persisted state covers, which may be fewer
   partitions or lower offsets; none: there is no state and the positions are committed);
3. **commit** those offsets for the consumer group.

A flush or persist that raises propagates and nothing is committed: the group's offsets stay at
the last commit, so whoever owns the partitions next redoes the records since then from the last
persisted state, and downstream de-duplication (by ticket and attempt) absorbs the repeats. A
commit the broker refuses (a rebalance, an outage) returns False: the state is persisted, and a
later commit, or the partitions' next owner restoring that state, covers those offsets.

What the steps are in each service:

========  ==================  ====================================  ==========================================
service   flush               persist                               a failure before the commit
========  ==================  ====================================  ==========================================
rollout   trajectories, DLQ   nothing                               the tickets are re-delivered and generated again
reward    scored, temps, DLQ  ERPO snapshots of the due partitions  ``failed``: no snapshot on revoke or close;
                              at their positions                    the next owner restores the last snapshot
learner   dead letters        the checkpoint (model, optimiser,     resume from the previous checkpoint
                              learner state with these offsets)     (written to a temporary folder, renamed)
recorder  (no producer)       the lake's Parquet files              the records are written again; readers
                                                                    de-duplicate by (partition, offset)
========  ==================  ====================================  ==========================================

Quix Streams' `checkpointing/checkpoint.py` is the model; it commits before it flushes its state
stores, which a changelog topic makes recoverable. Here state has no changelog, so it is persisted
before the commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from pipeline.failpoints import failpoint

Offsets = dict[tuple[str, int], int]
"""(logical topic, partition) -> the next offset to consume."""


class Flushable(Protocol):
    def flush(self) -> None: ...


class Committable(Protocol):
    def positions(self) -> Offsets: ...

    def commit_offsets(self, offsets: Offsets) -> bool: ...


class Committer:
    """The commit protocol of one group consumer and the producers its results go out with."""

    def __init__(self, consumer: Committable, producers: Sequence[Flushable] = (),
                 flushed_failpoint: str | None = None) -> None:
        self.consumer = consumer
        self.producers = tuple(producers)
        self.flushed_failpoint = flushed_failpoint
        """The `pipeline.failpoints` point between the flush and the persist (the fault tests' window
        "results sent, offsets not committed")."""

    def commit(self, persist: Callable[[Offsets], Offsets] | None = None) -> bool:
        """Flush every producer, persist the state (``persist(positions)`` returns the offsets
        the persisted state covers), commit those offsets. Whatever a step raises propagates and
        nothing is committed; False if the broker refused the commit (see the module docstring)."""
        for producer in self.producers:
            producer.flush()
        if self.flushed_failpoint is not None:
            failpoint(self.flushed_failpoint)
        positions = self.consumer.positions()
        offsets = positions if persist is None else persist(positions)
        return self.consumer.commit_offsets(offsets)
