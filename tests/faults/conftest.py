"""Prints the fault matrix's reconciliation table at the end of the session."""

from __future__ import annotations

COLUMNS = ["scenario", "killed", "restarted", "tickets", "fate_trained", "fate_dropped_stale", "fate_unused",
           "tickets_reissued_on_lease", "reissued_copies", "generated_more_than_once", "duplicates_ignored",
           "trained_twice", "several_fates", "no_fate", "unresolved", "wall_s"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from test_kill_matrix import RESULTS

    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("fault matrix: kill -9 (and failpoints), supervisor restarts, reconcile (lake + learner ledger)")
    widths = [max(len(c), *(len(str(r.get(c, 0))) for r in RESULTS)) for c in COLUMNS]
    tr.write_line("  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths)))
    for r in RESULTS:
        tr.write_line("  ".join(str(r.get(c, 0)).rjust(w) for c, w in zip(COLUMNS, widths)))
