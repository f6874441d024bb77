"""A bounded set of recent ids: how every stage remembers what it has already done.

Rollout (tickets answered), reward (tickets applied to ERPO's table, groups scored) and learner
(tickets decided) each keep the most recent ids of their own work, oldest evicted first, so that
a re-delivered or re-issued record is recognised without the memory growing with the run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator


class BoundedSet:
    """Insertion-ordered set that keeps the newest ``capacity`` items."""

    def __init__(self, capacity: int, items: Iterable[Hashable] = ()) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Hashable, None] = OrderedDict()
        for item in items:
            self.add(item)

    def add(self, item: Hashable) -> bool:
        """Remember ``item``; True if it was not already there."""
        if item in self._items:
            return False
        self._items[item] = None
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return True

    def discard(self, item: Hashable) -> None:
        self._items.pop(item, None)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[Hashable]:
        """Oldest first."""
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
