"""Prompt tickets: the learner's seeded ticket order, its leases, and its log of what it issued.

The learner paces the run by issuing tickets (one prompt to roll out, key of everything that
follows from it). This module holds what it knows about them, as plain objects with the clock
injected (`now` arguments), so the rules are unit-tested without a broker:

- `TicketSource`: endless tickets over the prompt pool, reshuffled each epoch (seeded). The id of
  position k is a function of k, so a resumed learner re-issues the same ids and any consumer can
  check which prompt an id must carry.
- `TicketBook`: the tickets issued and not yet decided, each under a **lease**: a ticket whose
  group has not come back by its deadline is issued again, same id, ``attempt + 1``. A broker can
  acknowledge a message and lose it (Tansu on SeaweedFS, killed), a rollout can die holding a
  batch: without leases the learner would wait forever for that group. The lease is the larger of
  a floor, a multiple of the observed p99 ticket-to-group latency, and the same multiple of the
  time the rollouts need for the work queued ahead of the ticket and the ticket itself (its token
  budget, group size x longest completion, over the generation speed `GenerationSpeed` measures
  from the groups that come back), so a slow but healthy pipeline is not flooded with re-issues.
  Until the first group of a run has come back the speed is unknown, and a lease lasts
  ``first_group_s`` (a model that generates slowly is not re-issued from its first ticket on).
  Stages de-duplicate their own output by (ticket, attempt)
  and effects by ticket: the learner trains the first complete group of a ticket and records any
  later one as a duplicate.
- `IssueLog`: the position reached and the attempts of outstanding tickets, rewritten after every
  flush that issued some, so a learner resumed from an older checkpoint knows which tickets are
  already on the broker.
"""

from __future__ import annotations

import functools
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import write_atomic
from pipeline.data.tasks import Problem
from pipeline.dedupe import BoundedSet
from pipeline.flow.validate import parse_ticket_id
from schemas import Columns


@dataclass(frozen=True)
class Ticket:
    """One issue of a prompt."""

    position: int
    """Place in the run's ticket order."""
    problem: Problem
    epoch: int
    ticket_id: str
    attempt: int = 0


class TicketSource:
    """Endless tickets over the prompt pool, reshuffled each epoch (seeded).

    Position k is the k-th ticket of the run: place ``k % n`` of epoch ``k // n``'s permutation.
    Its id is ``e<epoch>-<place, 6+ digits>``."""

    def __init__(self, problems: list[Problem], seed: int) -> None:
        if not problems:
            raise ValueError("the training prompt pool is empty")
        self.problems = problems
        self._seed = seed
        self.position = 0
        """Tickets issued so far (the next ticket's position)."""
        # Arrivals straddle an epoch boundary while issuing moves on: keep a few epochs' orders.
        self._order = functools.lru_cache(maxsize=4)(
            lambda epoch: np.random.default_rng(self._seed + epoch).permutation(len(self.problems)))

    def at(self, k: int, attempt: int = 0) -> Ticket:
        """The ticket of position ``k``."""
        epoch, place = divmod(k, len(self.problems))
        return Ticket(k, self.problems[int(self._order(epoch)[place])], epoch, f"e{epoch}-{place:06d}", attempt)

    def position_of(self, ticket_id: str, prompt_id: str, below: int | None = None) -> int | None:
        """The position of ``ticket_id`` if it is one of this source's tickets (before position
        ``below``, if given) and carries ``prompt_id``; None otherwise (a forged, foreign or
        corrupted id). The bound is checked first, so a flood of far-off ids costs no shuffles."""
        parsed = parse_ticket_id(ticket_id)
        if parsed is None or parsed[1] >= len(self.problems):
            return None
        k = parsed[0] * len(self.problems) + parsed[1]
        if below is not None and k >= below:
            return None
        return k if self.at(k).problem.prompt_id == prompt_id else None

    def next(self) -> Ticket:
        ticket = self.at(self.position)
        self.position += 1
        return ticket


@dataclass
class Lease:
    """An outstanding ticket: its current attempt and when that attempt expires."""

    position: int
    attempt: int
    issued_at: float
    deadline: float
    ahead: int = 1
    """Tickets awaiting their group when this attempt was issued, itself included: the queue a
    rollout works through before this one's group can come back."""


def lease_seconds(floor_s: float, p99_factor: float, latencies: list[float] | np.ndarray,
                  min_samples: int = 20) -> float:
    """How long an issued ticket may go without its group: ``max(floor_s, p99_factor x p99)`` of
    the observed ticket-to-group latencies (just the floor until ``min_samples`` are known)."""
    if len(latencies) < min_samples:
        return floor_s
    return max(floor_s, p99_factor * float(np.percentile(np.asarray(latencies, dtype=np.float64), 99)))


class GenerationSpeed:
    """Completion tokens per second the rollouts deliver, measured at the learner: tokens of the
    groups that came back over the time tickets were awaited (time with nothing outstanding does
    not count, so a learner that paces the run slowly does not read as a slow rollout), over the
    last ``window`` groups; None until a group has come back."""

    def __init__(self, window: int = 256) -> None:
        self.busy_s = 0.0
        """Seconds so far during which at least one ticket was awaited."""
        self._last: float | None = None
        self._busy = False
        self._marks: deque[tuple[float, int]] = deque([(0.0, 0)], maxlen=window + 1)
        """(busy seconds, cumulative tokens) at each arrival, after an origin."""

    def tick(self, now: float, busy: bool) -> None:
        """Account the time since the last tick (as busy if tickets were awaited then); ``busy``:
        whether tickets are awaited from now on."""
        if self._last is not None and self._busy:
            self.busy_s += max(0.0, now - self._last)
        self._last, self._busy = now, busy

    def arrived(self, tokens: int) -> None:
        """A group of ``tokens`` completion tokens came back (after a `tick` at its arrival)."""
        self._marks.append((self.busy_s, self._marks[-1][1] + max(0, int(tokens))))

    def measured(self) -> bool:
        return len(self._marks) > 1 and self._marks[-1][0] > self._marks[0][0]

    def tokens_per_s(self) -> float | None:
        if not self.measured():
            return None
        (s0, n0), (s1, n1) = self._marks[0], self._marks[-1]
        return max((n1 - n0) / (s1 - s0), 1e-9)


class TicketBook:
    """The learner's tickets: issued, outstanding under leases, queued for training, decided.

    Arrival verdicts (`arrival`): ``unknown`` (not a ticket of this run for that prompt, or one
    further ahead of the issue position than any life of the learner can have issued),
    ``duplicate`` (decided already, queued already, or behind the issue position and not
    outstanding), ``new`` (the first group of an outstanding ticket, or of one a previous life of
    the learner issued beyond the position it logged, within `adopt_window`: adopted, and skipped
    when issuing gets there).
    """

    def __init__(self, source: TicketSource, lease_floor_s: float, lease_p99_factor: float,
                 max_attempts: int = 10, adopt_window: int = 1024, decided_window: int = 20_000,
                 latency_window: int = 1000, ticket_tokens: int = 0, first_group_s: float = 600.0) -> None:
        self.source = source
        self.ticket_tokens = ticket_tokens
        """A ticket's token budget (group size x longest completion): the rollout work it stands
        for. 0: leases ignore generation speed (floor and p99 only)."""
        self.first_group_s = first_group_s
        """With ``ticket_tokens``: the lease while no group has come back yet (speed unknown)."""
        self.speed = GenerationSpeed()
        self.adopt_window = adopt_window
        """How far beyond the issue position a previous life of the learner can have issued
        tickets (it logs its position after every flush, which issues at most the capacity): a
        group for a ticket further ahead was never issued by this run."""
        self.lease_floor_s = lease_floor_s
        self.lease_p99_factor = lease_p99_factor
        self.max_attempts = max_attempts
        self.outstanding: OrderedDict[str, Lease] = OrderedDict()
        """Issued, not yet decided (queued groups included), oldest first."""
        self.queued: set[str] = set()
        """Tickets whose group waits in the training batch (their leases no longer run)."""
        self.decided = BoundedSet(decided_window)
        """Recently decided tickets (trained, dropped, invalid). A ticket behind the issue position
        that is not outstanding is decided whether remembered or not; the window covers tickets
        adopted ahead of the position, and logs and checkpoints."""
        self.latencies: deque[float] = deque(maxlen=latency_window)
        self.reissued = 0
        """Re-issues so far (leases that expired)."""

    def lease_s(self, ahead: int = 1) -> float:
        """The lease of a ticket issued now with ``ahead`` tickets awaited (itself included):
        ``max(floor, f x p99 latency, f x ahead x ticket_tokens / tokens_per_s)``, f the p99 factor;
        ``max(floor, first_group_s)`` while the speed is unknown."""
        lease = lease_seconds(self.lease_floor_s, self.lease_p99_factor, list(self.latencies))
        if not self.ticket_tokens:
            return lease
        speed = self.speed.tokens_per_s()
        if speed is None:
            return max(lease, self.first_group_s)
        return max(lease, self.lease_p99_factor * ahead * self.ticket_tokens / speed)

    def awaited(self) -> int:
        """Tickets issued whose group has not come back (queued groups have)."""
        return len(self.outstanding) - len(self.queued)

    def _tick(self, now: float) -> None:
        self.speed.tick(now, self.awaited() > 0)

    def _lease(self, position: int, attempt: int, now: float) -> Lease:
        ahead = self.awaited() + 1
        return Lease(position, attempt, now, now + self.lease_s(ahead), ahead)

    def issue(self, limit: int, now: float) -> list[Ticket]:
        """New tickets while fewer than ``limit`` are outstanding."""
        out = []
        self._tick(now)
        while len(self.outstanding) < limit:
            t = self.source.next()
            if t.ticket_id in self.decided or t.ticket_id in self.outstanding:
                continue  # adopted from a previous life of the learner: decided or awaited already
            self.outstanding[t.ticket_id] = self._lease(t.position, 0, now)
            out.append(t)
        self._tick(now)
        return out

    def expired(self, now: float) -> tuple[list[Ticket], list[Ticket]]:
        """Outstanding tickets whose lease has run out: (their next attempts, leases renewed; those
        that had `max_attempts` already, to be given up: a ticket whose groups never come or
        never pass the checks must not hold the run forever)."""
        again, abandoned = [], []
        self._tick(now)
        for tid, l in self.outstanding.items():
            # A deadline follows the generation speed measured since the lease began: the same
            # queue ahead at the speed known now.
            if tid in self.queued or l.issued_at + self.lease_s(l.ahead) > now:
                continue
            if l.attempt + 1 >= self.max_attempts:
                abandoned.append(self.source.at(l.position, l.attempt))
                continue
            renewed = self._lease(l.position, l.attempt + 1, now)
            l.attempt, l.issued_at, l.deadline, l.ahead = renewed.attempt, now, renewed.deadline, renewed.ahead
            again.append(self.source.at(l.position, l.attempt))
        self.reissued += len(again)
        return again, abandoned

    def arrival(self, ticket_id: str, prompt_id: str, attempt: int, now: float, tokens: int = 0) -> str:
        """``unknown``, ``duplicate`` or ``new`` for a group of ``ticket_id`` (see the class doc).
        A new group of the current attempt records its ticket-to-group latency; every group of a
        ticket of this run counts its ``tokens`` (completion tokens) in the generation speed."""
        k = self.source.position_of(ticket_id, prompt_id, below=self.source.position + self.adopt_window)
        if k is not None:
            self._tick(now)
            self.speed.arrived(tokens)
        if k is None:
            return "unknown"
        lease = self.outstanding.get(ticket_id)
        if ticket_id in self.decided or ticket_id in self.queued or (lease is None and k < self.source.position):
            return "duplicate"
        if lease is None:  # adopted: issued by a previous life beyond its logged position
            self.outstanding[ticket_id] = Lease(k, attempt, now, float("inf"))
        elif attempt == lease.attempt:
            self.latencies.append(now - lease.issued_at)
        return "new"

    def queue(self, ticket_id: str) -> None:
        self.queued.add(ticket_id)

    def decide(self, ticket_id: str) -> None:
        self.decided.add(ticket_id)
        self.outstanding.pop(ticket_id, None)
        self.queued.discard(ticket_id)

    def attempts(self) -> dict[str, int]:
        """Outstanding tickets with their current attempt."""
        return {tid: l.attempt for tid, l in self.outstanding.items()}

    def restore(self, position: int, outstanding: dict[str, int], decided: list[str], logged_position: int,
                logged_attempts: dict[str, int], now: float) -> int:
        """Continue a previous life: its position, outstanding tickets (with attempts) and decided
        ids, plus the tickets it logged as issued after the checkpoint (outstanding too). Every
        lease restarts now. Returns how many tickets were issued after the checkpoint."""
        for tid in decided:
            self.decided.add(tid)
        outstanding = dict(outstanding)
        ahead = len(outstanding) + max(0, logged_position - position)
        lease = self.lease_s(ahead)
        positions = {self.source.at(k).ticket_id: k for k in range(position, max(position, logged_position))}
        for tid, k in positions.items():
            outstanding.setdefault(tid, 0)
        for tid, attempt in outstanding.items():
            k = positions.get(tid)
            if k is None:
                parsed = parse_ticket_id(tid)
                if parsed is None:
                    continue
                k = parsed[0] * len(self.source.problems) + parsed[1]
            a = max(attempt, logged_attempts.get(tid, 0))
            self.outstanding[tid] = Lease(k, a, now, now + lease, ahead)
        self.source.position = max(position, logged_position)
        return self.source.position - position


class IssueLog:
    """The position up to which tickets are known to be on the broker and the attempts of the
    outstanding ones, rewritten (atomically) after every flush that issued tickets. A crash
    between a flush and this write only means those tickets are issued again under the same ids."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[int, dict[str, int]]:
        """(position, {ticket id: attempt} of re-issued outstanding tickets); (0, {}) if absent."""
        try:
            d = json.loads(self.path.read_text())
            return int(d["position"]), {str(k): int(v) for k, v in d.get("attempts", {}).items()}
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return 0, {}

    def write(self, position: int, attempts: dict[str, int]) -> None:
        write_atomic(self.path, json.dumps({"position": position,
                                            "attempts": {t: a for t, a in attempts.items() if a}}))


def ticket_columns(ticket: Ticket, version: int) -> Columns:
    """The PromptTicket message of an issued ticket."""
    problem = ticket.problem
    return {
        "ticket_id": np.array([ticket.ticket_id], dtype=object),
        "attempt": np.array([ticket.attempt], dtype=np.int32),
        "prompt_id": np.array([problem.prompt_id], dtype=object),
        "text": np.array([problem.text], dtype=object),
        "answer": np.array([problem.answer], dtype=object),
        "epoch": np.array([ticket.epoch], dtype=np.int32),
        "issued_version": np.array([version], dtype=np.int64),
        "issued_at": np.array([time.time()], dtype=np.float64),
    }
