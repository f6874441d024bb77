"""The learner's ledger and the run reconciliation, on hand-made cases; ticket ids and positions."""

from __future__ import annotations

import json
import re

import polars as pl

from pipeline.ledger import LEDGER_SCHEMA, Ledger, read_ledger, reconcile
from pipeline.tasks import Problem
from services.learner import IssueLog, TicketSource


def _rows(pairs):
    return pl.DataFrame({"ticket_id": [t for t, _ in pairs], "group_id": [g for _, g in pairs]})


def _ledger(rows):
    return pl.DataFrame([dict(step=s, ticket_id=t, group_id="g", prompt_id="p", fate=f, reason="", lag=0)
                         for s, t, f in rows], schema=LEDGER_SCHEMA)


def test_reconcile_counts_and_violations():
    tickets = _rows([("a", None), ("b", None), ("b", None), ("c", None), ("d", None)])
    traj = _rows([("a", "ga"), ("b", "gb1"), ("b", "gb2"), ("c", "gc"), ("c", "gc")])
    scored = _rows([("a", "ga"), ("b", "gb1"), ("c", "gc"), ("c", "gc")])
    ledger = _ledger([(1, "a", "trained"), (2, "b", "trained"), (2, "b", "duplicate"), (3, "c", "dropped_stale")])
    table, totals = reconcile(tickets, traj, scored, ledger)
    assert totals["tickets"] == 4 and totals["reissued_copies"] == 1
    assert totals["generated_more_than_once"] == 1  # b: two rollouts answered it
    assert totals["scored_more_than_once"] == 0  # c's group re-sent with the same id is one group
    assert totals["duplicates_ignored"] == 1
    assert totals["fate_trained"] == 2 and totals["fate_dropped_stale"] == 1
    assert totals["no_fate"] == 1 and totals["fate_(none)"] == 1  # d: silently lost
    assert totals["trained_twice"] == totals["several_fates"] == totals["ledger_without_ticket"] == 0
    assert table.filter(pl.col("ticket_id") == "d")["fate"].to_list() == ["(none)"]

    twice = _ledger([(1, "a", "trained"), (2, "a", "trained"), (3, "z", "trained")])
    _, totals = reconcile(tickets, traj, scored, twice)
    assert totals["trained_twice"] == 1 and totals["several_fates"] == 1 and totals["ledger_without_ticket"] == 1


def test_ledger_truncate_keeps_the_surviving_history(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(path)
    for s in (1, 2, 3, 4):
        led.add({"step": s, "ticket_id": f"t{s}", "group_id": "g", "prompt_id": "p", "fate": "trained",
                 "reason": "", "lag": 0})
    led.close()
    with open(path, "a") as f:
        f.write('{"step": 5, "ticket_id": "t5", "gro')  # torn by a crash mid-write
    assert Ledger.truncate(path, 2) == 3
    assert read_ledger(path)["ticket_id"].to_list() == ["t1", "t2"]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_ticket_ids_are_positions_and_reissue_the_same_prompts(tmp_path):
    problems = [Problem(f"p{i}", f"{i}+0=", str(i)) for i in range(5)]
    a, b = TicketSource(problems, seed=3), TicketSource(problems, seed=3)
    first = [a.next() for _ in range(12)]
    assert all(re.fullmatch(r"e\d+-\d{6}", t) for _, _, t in first)
    assert len({t for _, _, t in first}) == 12
    assert sorted(p.prompt_id for p, _, _ in first[:5]) == [f"p{i}" for i in range(5)]  # a permutation
    assert [e for _, e, _ in first] == [0] * 5 + [1] * 5 + [2] * 2
    b.position = 7  # a resumed learner picks up at its position: same ids, same prompts
    assert [b.next() for _ in range(5)] == first[7:12]
    for k, (p, _, tid) in enumerate(first):
        assert a.position_of(tid, p.prompt_id) == k
    assert a.position_of(first[0][2], "p-other") is None  # the id does not carry that prompt
    assert a.position_of("e0-999999", "p0") is None and a.position_of("garbage", "p0") is None
    log = IssueLog(tmp_path / "issued.json")
    assert log.read() == 0
    log.write(12)
    assert IssueLog(tmp_path / "issued.json").read() == 12
