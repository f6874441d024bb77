"""Prints the fault matrix's reconciliation table at the end of the session.

Under pytest-xdist (`make test` runs two workers) the scenarios run in worker processes: each
worker hands its rows to the controller through xdist's `workeroutput`, and the controller prints
one table.
"""

from __future__ import annotations

import json

import pytest

COLUMNS = ["scenario", "killed", "restarted", "tickets", "fate_trained", "fate_dropped_stale", "fate_unused",
           "tickets_reissued_on_lease", "reissued_copies", "generated_more_than_once", "duplicates_ignored",
           "trained_twice", "several_fates", "no_fate", "unresolved", "wall_s"]
FROM_WORKERS: list[dict] = []


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand this worker's rows to the controller
        from test_kill_matrix import RESULTS

        workeroutput["fault_matrix"] = json.dumps(RESULTS, default=str)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    rows = getattr(node, "workeroutput", {}).get("fault_matrix")
    if rows:
        FROM_WORKERS.extend(json.loads(rows))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from test_kill_matrix import RESULTS

    rows = [*RESULTS, *FROM_WORKERS]
    if not rows:
        return
    tr = terminalreporter
    tr.section("fault matrix: kill -9 (and failpoints), supervisor restarts, reconcile (lake + learner ledger)")
    widths = [max(len(c), *(len(str(r.get(c, 0))) for r in rows)) for c in COLUMNS]
    tr.write_line("  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths)))
    for r in rows:
        tr.write_line("  ".join(str(r.get(c, 0)).rjust(w) for c, w in zip(COLUMNS, widths)))
