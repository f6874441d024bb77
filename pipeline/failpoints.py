"""Failpoints: named places in the services where a fault test can make the process die.

A crash is most damaging inside a window: between writing a checkpoint and renaming it, between
producing results and committing the offsets they cover, in the middle of a rebalance. Killing a
process from outside at a random moment rarely hits those windows, so the services mark them with
``failpoint("learner.checkpoint")`` and the fault matrix arms one:

    RLSTREAM_FAILPOINTS="learner.checkpoint@3"  RLSTREAM_FAILPOINT_DIR=/tmp/run/failpoints

kills the process with SIGKILL the 3rd time it reaches that point, once: a marker file in the
folder keeps the restarted process from dying there again. Unarmed (the variable unset, always
outside tests) a failpoint is one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

ENV, DIR_ENV = "RLSTREAM_FAILPOINTS", "RLSTREAM_FAILPOINT_DIR"
POINTS = (
    "learner.checkpoint",  # model and optimiser written, learner state and rename not yet
    "learner.publish",  # weights published, not yet announced
    "rollout.produced",  # groups flushed, tickets not yet committed
    "reward.produced",  # scored groups and temperatures flushed, snapshot and commit not yet
    "reward.revoke",  # partitions revoked: state snapshotted, offsets not yet committed
)


def parse(spec: str) -> dict[str, int]:
    """``"name@n,other@m"`` -> {name: n}; ValueError for an unknown point or a bad count."""
    armed = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, n = item.partition("@")
        if name not in POINTS or not n.isascii() or not n.isdigit() or int(n) < 1:
            raise ValueError(f"bad failpoint {item!r}: use <point>@<n>, points {POINTS}")
        armed[name] = int(n)
    return armed


_ARMED = parse(os.environ.get(ENV, ""))
_HITS: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Die here (SIGKILL) if this point is armed and reached for the armed time, once per run."""
    if name not in _ARMED:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] != _ARMED[name]:
        return
    marker = Path(os.environ.get(DIR_ENV, ".")) / f"{name}.fired"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    log.critical("failpoint %s reached (hit %d): killing this process", name, _HITS[name])
    for h in logging.getLogger().handlers:
        h.flush()
    os.kill(os.getpid(), signal.SIGKILL)
