"""`rlstream reconcile RUN_DIR`: account for every ticket of a finished run.

Joins the recorded lake (`<run>/lake`: tickets issued, groups generated, groups scored; records
dead-lettered whole left out, counting only this run's signed dead letters) with the learner's ledger (`<run>/ledger/learner.jsonl`) through `pipeline.flow.ledger.reconcile`, prints the
totals (fates, re-issues, duplicates caught) and the violations, which must all be zero: a ticket
trained twice, with several fates, with none, a fate for a ticket the lake never saw, or a record
the recorder could not write as rows (the lake's `unrecorded-<topic>` tables: the accounts would
be incomplete). Writes the
per-ticket table to `<run>/reconcile.csv`. Exit status 1 if any violation.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from pipeline.flow.ledger import VIOLATIONS, ledger_path, read_ledger, reconcile
from pipeline.lake.store import read_topic, unrecorded_table
from pipeline.transport import signature
from pipeline.transport.topics import TOPICS


def reconcile_run(run_dir: Path) -> tuple[pl.DataFrame, dict[str, int]]:
    lake = run_dir / "lake"
    if not (lake / "topic=prompts").exists():
        raise FileNotFoundError(f"{lake} holds no recorded tickets (was the recorder running?)")
    ledger = ledger_path(run_dir)
    if not ledger.exists():
        raise FileNotFoundError(f"{ledger} does not exist (is {run_dir} a learner's workdir?)")
    unrecorded = sum(read_topic(lake, unrecorded_table(t)).height for t in TOPICS)
    name, key = run_identity(run_dir)
    return reconcile(read_topic(lake, "prompts"), read_topic(lake, "trajectories"), read_topic(lake, "scored"),
                     read_ledger(ledger), read_topic(lake, "deadletter"), name, unrecorded, key)


def run_identity(run_dir: Path) -> tuple[str | None, bytes | None]:
    """The run's name and dead-letter key (`kafka.dead_letter_key_file`) from the config its
    launcher wrote (`<run>/config.json`); (None, None) without one, a None key when the run had
    none. A key file the config names but that cannot be read is an error, not a reason to trust
    unsigned dead letters."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        name = str(cfg["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    key_file = (cfg.get("kafka") or {}).get("dead_letter_key_file")
    return name, (signature.read_key(Path(key_file)) if key_file else None)


def summary_line(totals: dict[str, int]) -> str:
    fates = ", ".join(f"{k[5:]} {v}" for k, v in sorted(totals.items()) if k.startswith("fate_"))
    violations = sum(totals[k] for k in VIOLATIONS)
    return (f"reconcile: {totals['tickets']} tickets: {fates}; re-issued copies {totals['reissued_copies']} "
            f"({totals['tickets_reissued_on_lease']} tickets issued again when their lease ran out), "
            f"duplicate groups ignored {totals['duplicates_ignored']}; "
            + (f"dead letters refused (unsigned or of another run) {totals['dead_letters_refused']}; "
               if totals.get("dead_letters_refused") else "")
            + ("no violations" if violations == 0 else
               "VIOLATIONS " + ", ".join(f"{k} {totals[k]}" for k in VIOLATIONS if totals[k])))


def write_reconciliation(run_dir: Path) -> dict[str, int]:
    """Reconcile the run, write the per-ticket table to `<run>/reconcile.csv`, return the totals."""
    table, totals = reconcile_run(run_dir)
    table.write_csv(run_dir / "reconcile.csv")
    return totals


def main(run_dir: Path) -> int:
    totals = write_reconciliation(run_dir)
    print(summary_line(totals))
    print(f"per-ticket table: {run_dir / 'reconcile.csv'}")
    return 1 if any(totals[k] for k in VIOLATIONS) else 0
