"""The learner's ledger and the run reconciliation, on hand-made cases; ticket ids and positions."""

from __future__ import annotations

import polars as pl

from pipeline.flow.ledger import LEDGER_SCHEMA, Ledger, read_ledger, reconcile


def _rows(pairs):
    return pl.DataFrame({"ticket_id": [t for t, _ in pairs], "group_id": [g for _, g in pairs],
                         "attempt": [0] * len(pairs)}, schema_overrides={"ticket_id": pl.String, "group_id": pl.String,
                                                                         "attempt": pl.Int32})


def _ledger(rows):
    return pl.DataFrame([dict(step=s, ticket_id=t, attempt=0, group_id="g", prompt_id="p", fate=f, reason="", lag=0)
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


def test_a_resumed_ledger_reads_as_the_surviving_run_and_keeps_every_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(path)
    for s in (1, 2, 3, 4):
        led.add({"step": s, "ticket_id": f"t{s}", "attempt": 0, "group_id": "g", "prompt_id": "p",
                 "fate": "trained", "reason": "", "lag": 0})
    led.close()
    with open(path, "a") as f:
        f.write('{"step": 5, "ticket_id": "t5", "gro')  # torn by a crash mid-write
    # The learner restarts from the checkpoint of step 2 and redoes steps 3 and 4.
    led = Ledger(path)
    led.resume(2, "restart")
    led.add({"step": 3, "ticket_id": "t3b", "attempt": 0, "group_id": "g", "prompt_id": "p", "fate": "trained",
             "reason": "", "lag": 0})
    led.close()
    assert read_ledger(path)["ticket_id"].to_list() == ["t1", "t2", "t3b"]
    lines = path.read_text().splitlines()
    assert len(lines) == 7 and lines[4].startswith('{"step": 5')  # nothing rewritten or removed
    # A second restart from step 1 undoes everything after it, the earlier marker included.
    led = Ledger(path)
    led.resume(1, "restart")
    led.close()
    assert read_ledger(path)["ticket_id"].to_list() == ["t1"]


def test_reconcile_shows_attempts():
    tickets = pl.DataFrame({"ticket_id": ["a", "b", "b", "b"], "attempt": [0, 0, 1, 2], "group_id": [None] * 4})
    traj = _rows([("a", "ga"), ("b", "gb2")])
    ledger = _ledger([(1, "a", "trained"), (1, "b", "trained")])
    table, totals = reconcile(tickets, traj, traj, ledger)
    assert table.filter(pl.col("ticket_id") == "b")["attempts"].to_list() == [3]
    assert totals["tickets_reissued_on_lease"] == 1 and totals["lease_attempts"] == 2
    assert totals["reissued_copies"] == 2


def test_only_this_runs_dead_letters_of_records_that_never_were_messages_leave_the_accounts():
    tickets = pl.DataFrame({"ticket_id": ["a", "b", "c", "d"], "group_id": [None] * 4, "attempt": [0] * 4,
                            "_partition": [0, 0, 0, 0], "_offset": [0, 1, 2, 3]}, schema_overrides={
                                "_partition": pl.Int32, "_offset": pl.Int64, "attempt": pl.Int32})
    empty = _rows([])
    ledger = _ledger([(1, t, "trained") for t in "abcd"])
    dead = pl.DataFrame({"source_topic": ["run.prompts", "other.prompts", "run.prompts", "evilrun.prompts"],
                         "source_partition": [0, 0, 0, 0], "source_offset": [0, 1, 2, 3],
                         "reason": ["invalid_message: bad_id: ...", "undecodable: forged, another run's topic",
                                    "prompt_too_long: a verdict on a real ticket", "undecodable: x"]})
    _, totals = reconcile(tickets, empty, empty, ledger, dead, run="run")
    # a is no ticket of the run; b, c and d stay: b's and d's letters name other runs' topics, c's is a
    # consumer's verdict on a valid ticket (before: all four left out, and the ledger read as lying).
    assert totals["tickets"] == 3 and totals["ledger_without_ticket"] == 1


def test_records_the_recorder_kept_only_as_bytes_are_a_violation():
    from pipeline.flow.ledger import VIOLATIONS

    tickets = _rows([("a", None)])
    _, totals = reconcile(tickets, _rows([]), _rows([]), _ledger([(1, "a", "trained")]), unrecorded=2)
    assert "unrecorded" in VIOLATIONS and totals["unrecorded"] == 2


def test_with_the_runs_key_only_signed_dead_letters_leave_the_accounts():
    """A dead letter anyone could write (unsigned, signed with another key, a real signature moved
    to another record or to another reason code) hides nothing; one the run's consumers signed does."""
    from pipeline.transport.signature import sign

    key, other = b"k" * 32, b"o" * 32
    tickets = pl.DataFrame({"ticket_id": list("abcde"), "group_id": [None] * 5, "attempt": [0] * 5,
                            "_partition": [0] * 5, "_offset": [0, 1, 2, 3, 4]}, schema_overrides={
                                "_partition": pl.Int32, "_offset": pl.Int64, "attempt": pl.Int32})
    ledger = _ledger([(1, t, "trained") for t in "bcde"])
    reason, digest = "undecodable: not Arrow", "ab" * 32
    good = sign(key, "run.prompts", 0, 0, reason, digest)
    verdict = sign(key, "run.prompts", 0, 4, "prompt_too_long: 900 tokens", digest)
    dead = pl.DataFrame({
        "source_topic": ["run.prompts"] * 5, "source_partition": [0] * 5, "source_offset": [0, 1, 2, 3, 4],
        "reason": [reason, reason, reason, reason, "undecodable: relabelled verdict"],
        "payload_sha256": [digest] * 5,
        "signature": [good, "", sign(other, "run.prompts", 0, 2, reason, digest), good, verdict]})
    _, totals = reconcile(tickets, _rows([]), _rows([]), ledger, dead, run="run", key=key)
    # only a's dead letter is the run's: b, c, d and e stay tickets, and their trained fates match
    assert totals["tickets"] == 4 and totals["ledger_without_ticket"] == 0
    assert totals["dead_letters_refused"] == 4
    # without the key (a run from before signatures) the same letters would have hidden every ticket
    _, unsigned = reconcile(tickets, _rows([]), _rows([]), ledger, dead, run="run")
    assert unsigned["tickets"] == 0
