"""The learner's intake rule (`pipeline.flow.intake.triage`): one valid group's fate, in the order the
checks run; the ticket book and the clock are plain objects."""

from __future__ import annotations

import numpy as np

from pipeline.data.tasks import Problem
from pipeline.flow.intake import no_signal, triage
from pipeline.flow.staleness import StalenessBudget
from pipeline.flow.tickets import TicketBook, TicketSource


def _book() -> TicketBook:
    problems = [Problem(f"p{i}", f"{i}+0=", str(i)) for i in range(5)]
    return TicketBook(TicketSource(problems, seed=0), lease_floor_s=10, lease_p99_factor=3, adopt_window=4)


def _group(ticket, version: int = 3, rewards=(1.0, 0.0, 0.0, 1.0), attempt: int = 0) -> dict:
    return {"ticket_id": [ticket.ticket_id], "prompt_id": [ticket.problem.prompt_id], "policy_version": [version],
            "attempt": [attempt], "reward": list(rewards), "group_pass_rate": [sum(rewards) / len(rewards)] * 4}


def _triage(book, group, **kw):
    args = dict(book=book, learner_version=5, now=1.0, draining=False, offline=False,
                staleness=StalenessBudget(max_versions=2, groups_per_step=4))
    return triage(group, **(args | kw))


def test_each_fate_in_the_order_the_checks_run():
    book = _book()
    a, b, c, d, e = book.issue(limit=5, now=0.0)
    future = _triage(book, _group(a, version=6))
    assert (future.fate, future.code, future.received) == ("deadletter", "future_version", False)
    assert "policy_version 6 is ahead of the learner's v5" in future.reason
    assert a.ticket_id in book.outstanding and not book.queued  # a forged group decides nothing
    # Offline (a replayed recording), versions belong to the recorded run: neither future nor stale.
    assert _triage(book, _group(a, version=9), offline=True).fate == "queued"
    assert _triage(book, _group(a)).fate == "duplicate"  # queued already
    stranger = _triage(book, {"ticket_id": ["e0-000001"], "prompt_id": ["not-its-prompt"], "policy_version": [1],
                              "attempt": [0], "reward": [1.0, 0.0], "group_pass_rate": [0.5, 0.5]})
    assert (stranger.fate, stranger.code) == ("deadletter", "unknown_ticket")
    stale = _triage(book, _group(b, version=2))
    assert (stale.fate, stale.lag, stale.reason, stale.received) == ("dropped_stale", 3, "lag 3 > learner.staleness.max_versions 2",
                                                                      True)
    assert _triage(book, _group(c, version=3)).fate == "queued"  # lag 2 is within the bound
    # Groups without signal are kept unless learner.dynamic_sampling leaves them out.
    assert _triage(book, _group(d, rewards=[0.0] * 4), dynamic_sampling="all_wrong").fate == "dropped_all_wrong"
    assert _triage(book, _group(e, rewards=[0.0] * 4), draining=True).fate == "unused"  # after the final step
    assert book.queued == {a.ticket_id, c.ticket_id}


def test_dynamic_sampling_leaves_out_the_groups_without_signal():
    right, wrong, mixed = [1.0] * 4, [0.0] * 4, [1.0, 0.0, 0.0, 0.0]

    def group(rewards):
        return {"reward": rewards, "group_pass_rate": [sum(rewards) / len(rewards)] * len(rewards)}

    assert [no_signal(group(r), "off") for r in (right, wrong, mixed)] == [None, None, None]
    assert [no_signal(group(r), "all_wrong") for r in (right, wrong, mixed)] == [None, "all_wrong", None]
    assert [no_signal(group(r), "zero_variance") for r in (right, wrong, mixed)] == ["all_correct", "all_wrong", None]
    # The pass rate alone decides (pipeline.verify.residual), as it does for ERPO and RA.
    assert no_signal({"group_pass_rate": np.float32([1.0] * 4)}, "zero_variance") == "all_correct"
    book = _book()
    (t,) = book.issue(limit=1, now=0.0)
    out = _triage(book, _group(t, rewards=right), dynamic_sampling="zero_variance")
    assert (out.fate, out.received) == ("dropped_all_correct", True) and "learner.dynamic_sampling" in out.reason
    assert t.ticket_id not in book.queued
