"""The learner's intake: what becomes of one scored group that passed `pipeline.flow.validate`.

`triage` is the rule, with no I/O: the learner service dead-letters, writes the ledger and
counts according to the `Outcome`. The order of the checks is part of the rule:

1. A group claiming a policy version the learner has not published is forged or from another
   run (dead letter ``future_version``), unless the learner trains offline on a recording.
2. The ticket book (`pipeline.flow.tickets.TicketBook.arrival`) knows the ticket or not (dead letter
   ``unknown_ticket``), and whether it is already decided or queued (``duplicate``, ignored).
3. A new group is ``unused`` while draining, ``dropped_stale`` when the staleness budget
   (`pipeline.flow.staleness`) does not accept its version (live runs), ``dropped_all_wrong`` / ``dropped_all_correct`` when
   ``learner.dynamic_sampling`` leaves groups without signal out (`no_signal`), else ``queued``
   for training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.flow.staleness import StalenessBudget
from pipeline.flow.tickets import TicketBook
from pipeline.verify.residual import ALL_CORRECT, ALL_WRONG, residual
from schemas import Columns

DEAD_LETTER = "deadletter"
QUEUED = "queued"


@dataclass(frozen=True)
class Outcome:
    fate: str
    """``deadletter``, ``duplicate``, ``unused``, ``dropped_stale``, ``dropped_all_wrong``,
    ``dropped_all_correct`` or ``queued``."""
    reason: str = ""
    code: str = ""
    """The dead-letter code (``future_version``, ``unknown_ticket``); empty otherwise."""
    lag: int | None = None
    """Learner version - the group's behaviour version, for groups of a known ticket."""

    @property
    def received(self) -> bool:
        """A new group of a known ticket (what the learner counts as received)."""
        return self.fate not in (DEAD_LETTER, "duplicate")


def no_signal(group: Columns, dynamic_sampling: str) -> str | None:
    """``all_wrong`` or ``all_correct`` if ``dynamic_sampling`` leaves this group out, else None.
    ``zero_variance`` (DAPO) drops every residual group (all rewards equal: all correct or all
    wrong, `pipeline.verify.residual`); ``all_wrong`` drops only all-wrong groups; ``off`` none."""
    if dynamic_sampling == "off":
        return None
    all_correct, all_wrong = residual(np.asarray(group["group_pass_rate"])[:1])
    if all_wrong[0]:
        return ALL_WRONG
    if all_correct[0] and dynamic_sampling == "zero_variance":
        return ALL_CORRECT
    return None


def triage(group: Columns, *, book: TicketBook, learner_version: int, now: float, draining: bool,
           offline: bool, staleness: StalenessBudget, dynamic_sampling: str = "off") -> Outcome:
    """The fate of one valid group (see the module doc). Records its arrival in ``book`` and, for
    a ``queued`` group, queues its ticket."""
    tid, pid = str(group["ticket_id"][0]), str(group["prompt_id"][0])
    version = int(group["policy_version"][0])
    if version > learner_version and not offline:
        return Outcome(DEAD_LETTER, f"invalid_group: future_version: policy_version {version} is ahead of the "
                                    f"learner's v{learner_version}", code="future_version")
    tokens = int(group["completion_token_ids"].lengths().sum()) if "completion_token_ids" in group else 0
    verdict = book.arrival(tid, pid, int(group["attempt"][0]), now, tokens)
    if verdict == "unknown":
        return Outcome(DEAD_LETTER, f"invalid_group: unknown_ticket: {tid!r} is not a ticket of this run for "
                                    f"prompt {pid!r}", code="unknown_ticket")
    if verdict == "duplicate":
        return Outcome("duplicate", "ticket already decided or queued")
    lag = learner_version - version
    if draining:
        return Outcome("unused", "arrived after the final step", lag=lag)
    if not offline and not staleness.accepts(version, learner_version):
        return Outcome("dropped_stale", f"lag {lag} > learner.staleness.max_versions {staleness.max_versions}",
                       lag=lag)
    kind = no_signal(group, dynamic_sampling)
    if kind is not None:
        return Outcome(f"dropped_{kind}", f"{kind.replace('_', ' ')}: no signal (learner.dynamic_sampling = "
                                          f"{dynamic_sampling!r})", lag=lag)
    book.queue(tid)
    return Outcome(QUEUED, lag=lag)
