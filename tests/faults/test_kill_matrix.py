"""Fault matrix: processes killed mid-run, in the windows that matter; the supervisor restarts them;
the run must account for every ticket.

Each scenario runs the real services as subprocesses under `services.supervisor.Supervisor` (the
demo's supervisor: a crashed service is restarted with backoff), lets the learner finish its steps
and drain, stops the workers, lets the recorder drain every topic into the lake, and reconciles
the lake with the learner's ledger (`pipeline.flow.ledger.reconcile`): every issued ticket has exactly
one fate, none is trained twice, and exactly ``STEPS x GROUPS_PER_STEP`` groups were trained. Every
process killed must have been restarted by the supervisor.

- crash windows: two rollout (one on vLLM) and two reward workers; failpoints
  (`pipeline.failpoints`) kill every service inside the windows that matter, and kill -9 from
  outside adds a rollout, the recorder and a reward worker (see the test's docstring). ERPO's state
  must then equal what one worker rebuilds by replaying the run's scored topic, with no prompt's
  history split between partitions.
- ``broker``: Tansu on durable SeaweedFS storage killed -9 and restarted, once after a 45-second
  outage and then after 2 s (``RLSTREAM_BROKER_RUNS`` runs, 3 by default; 20 for the closing
  figure). Tansu can acknowledge a produce and lose it when killed; ticket leases re-issue what
  never came back.

The table is printed at the end of the session (tests/conftest.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipeline.failpoints import DIR_ENV, ENV
from service_runs import Run, warm_cache

pytestmark = pytest.mark.faults

STEPS = 30
BROKER_RUNS = int(os.environ.get("RLSTREAM_BROKER_RUNS", "3"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The tiny warm-started model, built once for every scenario."""
    return warm_cache(tmp_path_factory.mktemp("cache"))


def test_every_service_killed_in_its_crash_windows_with_two_workers_per_stage(cache, tmp_path, run_name):
    """Two rollout workers (one on vLLM) and two reward workers. Failpoints kill the learner while
    it writes a checkpoint and between publishing weights and announcing them, rollout-0 between
    producing its groups and committing its tickets, reward-0 between producing scored groups and
    snapshotting, reward-1 in the middle of a rebalance (state snapshotted, offsets not committed);
    kill -9 from outside takes rollout-1 (vLLM) at step 6, the recorder at step 12 and reward-1
    again at step 20. The supervisor restarts each; the run must account for every ticket, and
    ERPO's partition snapshots must equal the table one worker rebuilds from the scored topic."""
    marks = tmp_path / "failpoints"
    armed = {"learner": "learner.checkpoint@3,learner.publish@10", "rollout-0": "rollout.produced@8",
             "reward-0": "reward.produced@10", "reward-1": "reward.revoke@1"}
    kills = {6: "rollout-1", 12: "recorder", 20: "reward-1"}
    run = Run(tmp_path, run_name, cache, STEPS)
    killed: dict[str, int] = {}
    try:
        for name in ("learner", "reward-0", "reward-1", "rollout-0", "rollout-1", "recorder"):
            env = {ENV: armed[name], DIR_ENV: str(marks)} if name in armed else {}
            run.start(name, int(name[-1]) if name[-1].isdigit() else None, env,
                      ["--set", 'rollout.engine="vllm"'] if name == "rollout-1" else [])

        def on_step(step: int) -> None:
            for at, name in kills.items():
                if step >= at and name not in killed:
                    run.sup.kill(name)  # SIGKILL; the supervisor restarts it
                    killed[name] = step

        run.until_done(on_step)
    finally:
        run.close()
    fired = sorted(p.stem for p in marks.glob("*.fired"))
    assert fired == sorted(p.split("@")[0] for spec in armed.values() for p in spec.split(",")), fired
    assert killed.keys() == set(kills.values()), killed
    for name in set(armed) | set(kills.values()):
        assert run.sup.restarts.get(name, 0) >= 1, (name, run.sup.restarts)
    assert run.sup.restarts["learner"] >= 2 and run.sup.restarts["reward-1"] >= 2, run.sup.restarts
    totals = run.reconcile("crash windows, 2+2 workers",
                           killed=f"failpoints {','.join(fired)}; " + ",".join(f"{n}@{s}" for n, s in killed.items()))
    assert totals["duplicates_ignored"] > 0, "the groups re-scored after reward-0's crash never reached the learner"
    run.check_erpo_state()


@pytest.mark.parametrize("attempt", range(BROKER_RUNS))
def test_broker_killed_and_restarted_on_durable_storage(cache, tmp_path, run_name, attempt):
    outage_s = 45 if attempt == 0 else 2
    run = Run(tmp_path, run_name, cache, STEPS, durable=True)
    killed_at = None
    try:
        for name in ("learner", "reward-0", "rollout-0", "recorder"):
            run.start(name, 0 if name[-1].isdigit() else None)

        def on_step(step: int) -> None:
            nonlocal killed_at
            if step >= 10 and killed_at is None:
                killed_at = step
                run.broker.kill()
                time.sleep(outage_s)
                run.broker.start()

        run.until_done(on_step, timeout_s=900)
    finally:
        run.close()
    run.reconcile("broker", killed=f"broker@{killed_at} down {outage_s}s")
