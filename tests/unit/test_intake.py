"""The learner's intake rule (`pipeline.flow.intake.triage`): one valid group's fate, in the order the
checks run; the ticket book and the clock are plain objects."""

from __future__ import annotations

from pipeline.data.tasks import Problem
from pipeline.erpo.history import ErpoRule
from pipeline.flow.intake import triage
from pipeline.flow.tickets import TicketBook, TicketSource


def _book() -> TicketBook:
    problems = [Problem(f"p{i}", f"{i}+0=", str(i)) for i in range(5)]
    return TicketBook(TicketSource(problems, seed=0), lease_floor_s=10, lease_p99_factor=3, adopt_window=4)


def _group(ticket, version: int = 3, pass_rate: float = 0.5, attempt: int = 0) -> dict:
    return {"ticket_id": [ticket.ticket_id], "prompt_id": [ticket.problem.prompt_id], "policy_version": [version],
            "attempt": [attempt], "group_pass_rate": [pass_rate] * 4}


def _triage(book, group, **kw):
    args = dict(book=book, learner_version=5, now=1.0, draining=False, offline=False, max_staleness=2,
                rule=ErpoRule())
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
                              "attempt": [0], "group_pass_rate": [0.5]})
    assert (stranger.fate, stranger.code) == ("deadletter", "unknown_ticket")
    stale = _triage(book, _group(b, version=2))
    assert (stale.fate, stale.lag, stale.reason, stale.received) == ("dropped_stale", 3, "lag 3 > max_staleness 2",
                                                                      True)
    assert _triage(book, _group(c, version=3)).fate == "queued"  # lag 2 is within the bound
    # All-wrong groups are kept unless ERPO's drop_all_wrong says otherwise.
    assert _triage(book, _group(d, pass_rate=0.0), rule=ErpoRule(drop_all_wrong=True)).fate == "dropped_all_wrong"
    assert _triage(book, _group(e, pass_rate=0.0), draining=True).fate == "unused"  # after the final step
    assert book.queued == {a.ticket_id, c.ticket_id}
