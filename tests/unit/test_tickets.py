"""Tickets: ids as positions, leases that re-issue a ticket whose group never came, arrivals,
restore after a restart; the clock is injected (plain numbers)."""

from __future__ import annotations

import re

import pytest

from pipeline.data.tasks import Problem
from pipeline.flow.tickets import GenerationSpeed, IssueLog, TicketBook, TicketSource, lease_seconds


def _problems(n: int = 5) -> list[Problem]:
    return [Problem(f"p{i}", f"{i}+0=", str(i)) for i in range(n)]


def test_ticket_ids_are_positions_and_reissue_the_same_prompts():
    a, b = TicketSource(_problems(), seed=3), TicketSource(_problems(), seed=3)
    first = [a.next() for _ in range(12)]
    assert all(re.fullmatch(r"e\d+-\d{6}", t.ticket_id) for t in first)
    assert len({t.ticket_id for t in first}) == 12 and [t.position for t in first] == list(range(12))
    assert sorted(t.problem.prompt_id for t in first[:5]) == [f"p{i}" for i in range(5)]  # a permutation
    assert [t.epoch for t in first] == [0] * 5 + [1] * 5 + [2] * 2
    b.position = 7  # a resumed learner picks up at its position: same ids, same prompts
    assert [b.next() for _ in range(5)] == first[7:12]
    for t in first:
        assert a.position_of(t.ticket_id, t.problem.prompt_id) == t.position
    assert a.position_of(first[0].ticket_id, "p-other") is None  # the id does not carry that prompt
    assert a.position_of("e0-999999", "p0") is None and a.position_of("garbage", "p0") is None
    # Unicode digits pass str.isdigit and int(); they are not ticket ids.
    assert a.position_of("e0-00000\u0663", "p0") is None and a.position_of("e\u00b2-000001", "p0") is None


def test_lease_is_the_floor_until_latencies_are_known_then_a_multiple_of_p99():
    assert lease_seconds(60, 3, [1.0] * 19) == 60
    assert lease_seconds(60, 3, [1.0] * 100) == 60  # 3 x 1 s is below the floor
    # p99 of 1..100 is 99.01 (linear interpolation); three times that is above the floor.
    assert lease_seconds(60, 3, [float(x) for x in range(1, 101)]) == pytest.approx(3 * 99.01)


def test_a_ticket_without_its_group_is_issued_again_under_the_same_id():
    book = TicketBook(TicketSource(_problems(), seed=0), lease_floor_s=10, lease_p99_factor=3)
    issued = book.issue(limit=3, now=0.0)
    assert [t.attempt for t in issued] == [0, 0, 0] and len(book.outstanding) == 3
    assert book.expired(9.9) == ([], [])
    a, b, c = issued
    assert book.arrival(a.ticket_id, a.problem.prompt_id, 0, now=5.0) == "new"
    book.queue(a.ticket_id)  # waiting in the batch: no lease any more
    again, abandoned = book.expired(10.0)  # b and c had no group within 10 s
    assert abandoned == []
    assert [(t.ticket_id, t.attempt, t.problem) for t in again] == [(b.ticket_id, 1, b.problem),
                                                                    (c.ticket_id, 1, c.problem)]
    assert book.reissued == 2 and book.attempts()[b.ticket_id] == 1
    assert book.expired(19.9) == ([], []) and [t.attempt for t in book.expired(20.0)[0]] == [2, 2]
    # The first attempt's group turns up late: it is the ticket's first group, so it counts; the
    # later attempt's group is then a duplicate, as is a's second group.
    assert book.arrival(b.ticket_id, b.problem.prompt_id, 0, now=21.0) == "new"
    book.decide(b.ticket_id)
    assert book.arrival(b.ticket_id, b.problem.prompt_id, 2, now=22.0) == "duplicate"
    assert book.arrival(a.ticket_id, a.problem.prompt_id, 0, now=22.0) == "duplicate"
    assert book.arrival("e0-000001", "not-its-prompt", 0, now=22.0) == "unknown"
    # Only arrivals of the current attempt measure the ticket-to-group latency.
    assert list(book.latencies) == [5.0]


def test_issue_fills_to_the_limit_and_skips_tickets_decided_or_adopted():
    source = TicketSource(_problems(), seed=0)
    book = TicketBook(source, lease_floor_s=10, lease_p99_factor=3, adopt_window=4)
    far = source.at(4)  # a real id with its real prompt, but beyond anything a learner issued
    assert book.arrival(far.ticket_id, far.problem.prompt_id, 0, now=0.0) == "unknown"
    ahead = source.at(2)  # issued by a previous life beyond the position it logged
    assert book.arrival(ahead.ticket_id, ahead.problem.prompt_id, 0, now=0.0) == "new"
    book.queue(ahead.ticket_id)
    got = book.issue(limit=4, now=1.0)  # a queued adopted ticket is not issued again
    assert [t.position for t in got] == [0, 1, 3]
    book.decide(ahead.ticket_id)
    assert book.arrival(source.at(1).ticket_id, source.at(1).problem.prompt_id, 0, 2.0) == "new"
    assert len(book.outstanding) == 3


def test_restore_continues_a_previous_life(tmp_path):
    source = TicketSource(_problems(), seed=0)
    book = TicketBook(source, lease_floor_s=10, lease_p99_factor=3)
    log = IssueLog(tmp_path / "issued.json")
    assert log.read() == (0, {})
    # Checkpoint at position 4 with e0 tickets 2 and 3 outstanding (3 at its second attempt); the
    # issue log says tickets up to 6 went out since, and ticket 3 reached attempt 2.
    t2, t3, t4, t5 = (source.at(k).ticket_id for k in (2, 3, 4, 5))
    log.write(6, {t3: 2, t4: 0})
    position, attempts = log.read()
    assert (position, attempts) == (6, {t3: 2})
    after = book.restore(4, {t2: 0, t3: 1}, decided=[source.at(0).ticket_id], logged_position=position,
                         logged_attempts=attempts, now=100.0)
    assert after == 2 and source.position == 6
    assert book.attempts() == {t2: 0, t3: 2, t4: 0, t5: 0}
    assert all(lease.deadline == 110.0 for lease in book.outstanding.values())  # every lease restarts
    assert book.arrival(source.at(0).ticket_id, source.at(0).problem.prompt_id, 0, 101.0) == "duplicate"
    assert book.arrival(source.at(1).ticket_id, source.at(1).problem.prompt_id, 0, 101.0) == "duplicate"
    assert [t.position for t in book.issue(limit=5, now=101.0)] == [6]


def test_a_ticket_is_given_up_after_max_attempts():
    book = TicketBook(TicketSource(_problems(), seed=0), lease_floor_s=1, lease_p99_factor=3, max_attempts=3)
    [t] = book.issue(limit=1, now=0.0)
    assert [x.attempt for x in book.expired(1.0)[0]] == [1]
    assert [x.attempt for x in book.expired(2.0)[0]] == [2]
    again, abandoned = book.expired(3.0)  # attempts 0, 1 and 2 all expired
    assert again == [] and [(x.ticket_id, x.attempt) for x in abandoned] == [(t.ticket_id, 2)]


def test_generation_speed_counts_tokens_over_the_time_tickets_were_awaited():
    speed = GenerationSpeed()
    assert speed.tokens_per_s() is None and not speed.measured()
    speed.tick(0.0, busy=True)
    speed.tick(10.0, busy=False)  # 10 s awaited, then 30 s with nothing awaited (not counted)
    speed.tick(40.0, busy=True)
    speed.tick(50.0, busy=True)  # 10 s more: 20 s awaited in all
    speed.arrived(400)
    assert speed.busy_s == 20.0 and speed.tokens_per_s() == 20.0  # 400 tokens / 20 s
    speed.tick(60.0, busy=True)
    speed.arrived(600)
    assert speed.tokens_per_s() == pytest.approx(1000 / 30)  # (400 + 600) / (20 + 10)


def test_leases_follow_the_queue_and_the_measured_speed():
    # Tickets of 8 x 100 = 800 tokens, factor 3, floor 10 s. Until a group came back every lease is
    # first_group_s (100 s). The first group (800 tokens after 40 s awaited: 20 tokens/s) sets the
    # speed; a ticket issued then with 3 awaited (itself included) gets 3 x 3 x 800 / 20 = 360 s.
    book = TicketBook(TicketSource(_problems(), seed=0), lease_floor_s=10, lease_p99_factor=3,
                      ticket_tokens=800, first_group_s=100.0)
    issued = book.issue(limit=3, now=0.0)
    assert [book.outstanding[t.ticket_id].deadline for t in issued] == [100.0, 100.0, 100.0]
    assert book.arrival(issued[0].ticket_id, issued[0].problem.prompt_id, 0, now=40.0, tokens=800) == "new"
    book.queue(issued[0].ticket_id)
    book.decide(issued[0].ticket_id)
    assert book.speed.tokens_per_s() == 20.0
    [t] = book.issue(limit=3, now=40.0)
    assert book.outstanding[t.ticket_id].ahead == 3 and book.outstanding[t.ticket_id].deadline == 40.0 + 360.0
    # The two tickets issued at 0 read the speed known now: 3 x k x 800 / 20 = 120 k seconds after
    # their issue (k = 2, 3: the tickets awaited when they were issued).
    assert book.expired(239.0) == ([], [])
    assert [x.ticket_id for x in book.expired(240.0)[0]] == [issued[1].ticket_id]


def test_generation_slower_than_the_floor_reissues_nothing():
    # A rollout that takes 90 s per group (8 x 128 tokens, ~11 tokens/s) against a 60 s floor, 4
    # tickets in flight: the first group comes back after 90 s, well within first_group_s, and
    # measures the speed; every later ticket's lease then covers the queue ahead of it. Groups come
    # back in order; nothing is issued twice.
    book = TicketBook(TicketSource(_problems(20), seed=0), lease_floor_s=60, lease_p99_factor=3,
                      ticket_tokens=8 * 128, first_group_s=600.0)
    per_group = 90.0
    now, done = 0.0, 0
    queue = list(book.issue(limit=4, now=now))
    while done < 12:
        now += per_group
        assert book.expired(now - 1e-6) == ([], [])
        t = queue.pop(0)
        assert book.arrival(t.ticket_id, t.problem.prompt_id, t.attempt, now, tokens=8 * 128) == "new"
        book.queue(t.ticket_id)
        book.decide(t.ticket_id)
        done += 1
        queue += book.issue(limit=4, now=now)
        assert book.expired(now) == ([], [])
    assert book.reissued == 0
    # At the measured 1024 / 90 tokens/s, a ticket lost now is issued again after 3 x 4 x 90 s
    # (the 4 awaited tickets' work, itself included), not before.
    lease = book.outstanding[queue[-1].ticket_id]
    assert lease.ahead == 4 and lease.deadline - lease.issued_at == pytest.approx(3 * 4 * 90.0)
