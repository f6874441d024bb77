"""Faults across hosts, on one machine: every process on a host of its own (a network namespace
joined to the others by a veth pair and a bridge, `infra.hosts.Hosts`), policies through an object
store on yet another host, only the hosts' own addresses used.

Mid-run, one after another, with the learner stepping in between:
1. rollout-1's link goes down for 30 s (as a pulled cable: its connections hang, its group
   membership lapses, the tickets it held come back after their lease);
2. the broker's link is shaped to 1 Mbit/s in both directions for 30 s (`tc tbf`; no netem here);
3. the learner's host loses its processes (SIGKILL) and the supervisor starts them again, from the
   newest checkpoint.

The run must finish; the lake reconciled with the learner's ledger must show no violation (no
ticket trained twice, none without a fate) and exactly the steps' groups trained; ERPO's partition
snapshots must equal the table rebuilt from the scored topic. The figures of each fault (the
longest time the learner completed no step, against the median step time before the faults, and
the tickets issued again while it lasted) are printed and go to docs/reliability.md.

Every wait is bounded (the run by `until_done`'s timeout, each fault by its own clock) and the
namespaces are deleted whatever happens (`Hosts` is a context manager; it also clears ones a
killed earlier run of the same tag left).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import polars as pl
import pytest

from infra.hosts import Hosts, available
from needs import skip_or_fail
from pipeline.lake.store import read_topic
from service_runs import RESULTS, Run, warm_cache

pytestmark = pytest.mark.faults

STEPS = 300
"""Enough for the faults to happen mid-run: the tiny model steps about twice a second here, and the
faults take at least 70 s."""
FAULT_S = 30.0
STEPS_BETWEEN = 10
"""Learner steps completed between one fault's end and the next fault."""
HOSTS = ["broker", "store", "admin", "learner", "rollout-0", "rollout-1", "reward-0", "reward-1", "recorder"]
SERVICES = ["learner", "reward-0", "reward-1", "rollout-0", "rollout-1", "recorder"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return warm_cache(tmp_path_factory.mktemp("cache"))


class Faults:
    """The three faults in order, driven from `Run.until_done`'s callback; each bounded by its own
    clock. `done` lists (name, wall start, wall end) as they happen."""

    def __init__(self, run: Run, hosts: Hosts) -> None:
        self.run, self.hosts = run, hosts
        self.phase, self.since_step, self.started, self.rows_at_kill = 0, 0, 0.0, 0
        self.done: list[tuple[str, float, float]] = []

    def __call__(self, step: int) -> None:
        now = time.time()
        if self.phase in (0, 2, 4) and step < self.since_step + STEPS_BETWEEN:
            return  # the learner has not stepped enough since the last fault
        if self.phase in (1, 3) and now - self.started < FAULT_S:
            return  # the fault lasts
        if self.phase == 5 and len(self.run.progress()) <= self.rows_at_kill:
            return  # the restarted learner has not completed a step yet
        if self.phase == 0:
            self.hosts.link("rollout-1", up=False)
        elif self.phase == 1:
            self.hosts.link("rollout-1", up=True)
            self.done.append(("rollout-1 link down 30 s", self.started, now))
        elif self.phase == 2:
            self.hosts.throttle("broker", "1mbit")
        elif self.phase == 3:
            self.hosts.throttle("broker", None)
            self.done.append(("broker link at 1 Mbit/s for 30 s", self.started, now))
        elif self.phase == 4:
            self.rows_at_kill = len(self.run.progress())
            self.run.sup.kill("learner")  # the learner's host's only process; `tend` starts it again
        elif self.phase == 5:
            self.done.append(("learner host's processes killed, restarted", self.started, now))
        else:
            return
        if self.phase % 2 == 0:
            self.started = now
        else:
            self.since_step = step
        self.phase += 1

    def restore(self) -> None:
        """Links up, shaping off (after a failure mid-fault, before the services are stopped)."""
        self.hosts.link("rollout-1", up=True)
        self.hosts.throttle("broker", None)


def stall(step_times: list[float], start: float, end: float) -> float:
    """The longest time within [start, first step after end] in which the learner completed no step."""
    after = [t for t in step_times if t > end]
    stop = after[0] if after else end
    marks = [start] + [t for t in step_times if start < t <= stop] + [stop]
    return max(b - a for a, b in zip(marks, marks[1:]))


def test_link_down_broker_throttled_and_learner_host_killed_across_hosts(cache, tmp_path, run_name):
    why = available()
    if why is not None:
        skip_or_fail(f"cannot make hosts here: {why}", "RLSTREAM_REQUIRE_NETNS")
    with Hosts(HOSTS) as hosts:
        run = Run(tmp_path, run_name, cache, STEPS, hosts=hosts, weights_store=True)
        faults = Faults(run, hosts)
        try:
            for name in SERVICES:
                run.start(name, int(name[-1]) if name[-1].isdigit() else None)
            run.until_done(faults, timeout_s=1500)
        finally:
            faults.restore()
            run.close()
    assert [name for name, _, _ in faults.done] == ["rollout-1 link down 30 s", "broker link at 1 Mbit/s for 30 s",
                                                    "learner host's processes killed, restarted"], faults.done
    assert run.sup.restarts.get("learner", 0) >= 1, run.sup.restarts

    # What each fault cost: the learner's longest pause, and the tickets issued again meanwhile.
    times = sorted(r["time"] for r in run.progress())
    first = faults.done[0][1]
    before = [b - a for a, b in zip(times, times[1:]) if b <= first]
    tickets = read_topic(run.workdir / "lake", "prompts")
    again = tickets.filter(pl.col("attempt") > 0)["_timestamp_ms"].to_numpy() / 1000
    bounds = [start for _, start, _ in faults.done] + [times[-1] + 1]
    figures = []
    for (name, start, end), until in zip(faults.done, bounds[1:]):
        figures.append({"fault": name, "stall_s": round(stall(times, start, end), 1),
                        "fault_s": round(end - start, 1), "steps_during": sum(start < t <= end for t in times),
                        "tickets_reissued": int(((again >= start) & (again < until)).sum())})
    totals = run.reconcile("hosts: link down, broker 1 Mbit/s, learner host killed",
                           killed="rollout-1 link 30 s; broker tbf 1mbit 30 s; learner host")
    run.check_erpo_state()
    summary = {"median_step_s_before": round(statistics.median(before), 2) if before else None,
               "faults": figures, "reissued_copies": totals["reissued_copies"],
               "tickets_reissued_on_lease": totals["tickets_reissued_on_lease"],
               "duplicates_ignored": totals["duplicates_ignored"]}
    print("cross-host faults: " + json.dumps(summary))
    RESULTS[-1]["killed"] += " | " + "; ".join(f"{f['fault']}: stall {f['stall_s']} s, re-issued "
                                               f"{f['tickets_reissued']}" for f in figures)
