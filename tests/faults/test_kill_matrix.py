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

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from infra.broker import Broker
from infra.objectstore import ObjectStore
from pipeline.config import KafkaConfig, RunConfig
from pipeline.erpo.partitions import load_tables, rebuild_from_scored
from pipeline.failpoints import DIR_ENV, ENV
from pipeline.flow.ledger import VIOLATIONS, ledger_path, read_ledger, reconcile
from pipeline.lake.store import read_topic
from pipeline.transport.kafka import ensure_topics
from services.common import erpo_rule
from services.supervisor import Supervisor

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
STEPS, GROUPS_PER_STEP, G = 30, 4, 4
RESULTS: list[dict] = []
BROKER_RUNS = int(os.environ.get("RLSTREAM_BROKER_RUNS", "3"))


def _sets(run: str, workdir: Path, cache: Path, bootstrap: str, extra: dict[str, str] | None = None) -> list[str]:
    sets = {
        "name": f'"{run}"', "workdir": f'"{workdir}"', "cache_dir": f'"{cache}"',
        "kafka.bootstrap_servers": f'"{bootstrap}"', "kafka.session_timeout_ms": "2000",
        # A client wedged in poll after the broker restart (seen once with kafka-python 3.0.12)
        # exits for the supervisor to restart it, instead of hanging the run.
        "kafka.poll_stall_timeout_s": "60",
        "task.train_pool": "64",
        # head size 32: vLLM's CPU attention needs at least that
        "model.warmstart.steps": "20", "model.warmstart.hidden_size": "64", "model.warmstart.layers": "2",
        "model.warmstart.heads": "2", "model.warmstart.kv_heads": "1", "model.warmstart.intermediate_size": "128",
        "rollout.engine": '"torch"', "rollout.group_size": str(G), "rollout.max_prompts_per_batch": "4",
        "learner.groups_per_step": str(GROUPS_PER_STEP), "learner.total_steps": str(STEPS),
        "learner.staleness.max_versions": "2", "learner.backend": '"torch"', "learner.checkpoint.every": "4",
        "learner.tickets.drain_timeout_s": "90", "learner.tickets.lease_floor_s": "10", "erpo.snapshot_every": "3",
        "recorder.flush_every_s": "2", "metrics.enabled": "false", **(extra or {}),
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The tiny warm-started model, built once for every scenario."""
    path = tmp_path_factory.mktemp("cache")
    sets = _sets("warm", path / "unused", path, "127.0.0.1:9")
    subprocess.run([sys.executable, "-m", "services.cli", "warmstart"] + sets, check=True, cwd=REPO,
                   capture_output=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return path


class Run:
    """One run of the services under the supervisor, on its own broker."""

    def __init__(self, tmp: Path, run: str, cache: Path, durable: bool = False, extra: dict | None = None) -> None:
        self.tmp, self.workdir = tmp, tmp / "run"
        self.store = ObjectStore(tmp / "objectstore", log_path=tmp / "objectstore.log") if durable else None
        if self.store is not None:
            self.store.start()
        self.broker = Broker(log_path=tmp / "broker.log", storage=self.store.storage_url if durable else "memory://tansu/",
                             env=self.store.client_env() if durable else None)
        self.broker.start()
        self.sets = _sets(run, self.workdir, cache, self.broker.bootstrap, extra)
        ensure_topics(KafkaConfig(bootstrap_servers=self.broker.bootstrap), run)
        self.sup = Supervisor(tmp / "logs", cwd=REPO, backoff_s=(1, 2, 4), max_restarts=8)
        self.t0 = time.monotonic()

    def start(self, name: str, worker_index: int | None = None, env: dict | None = None,
              extra: list[str] | None = None) -> None:
        service = name.split("-")[0]
        argv = [sys.executable, "-m", "services.cli", service] + self.sets + (extra or [])
        if worker_index is not None:
            argv += ["--worker-index", str(worker_index)]
        self.sup.start(name, argv, env=env)

    def step(self) -> int:
        try:
            return json.loads((self.workdir / "progress" / "learner.jsonl").read_text().splitlines()[-1])["step"]
        except (FileNotFoundError, IndexError, json.JSONDecodeError):
            return 0

    def until_done(self, on_step=lambda step: None, timeout_s: float = 600) -> None:
        """Tend the services until the learner has finished (exit 0); ``on_step`` is called with
        the learner's step every half second (to kill things)."""
        deadline = time.monotonic() + timeout_s
        while not self.sup.finished("learner"):
            assert time.monotonic() < deadline, f"run did not finish; learner log:\n{self.log('learner')}"
            on_step(self.step())
            self.sup.tend()
            time.sleep(0.5)
        self.sup.stop([n for n in self.sup.children if n.startswith(("rollout", "reward"))], timeout_s=60)
        assert self.sup.stop(["recorder"], timeout_s=120)["recorder"] == 0, self.log("recorder")

    def log(self, name: str) -> str:
        return (self.tmp / "logs" / f"{name}.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        self.sup.stop(timeout_s=10)
        self.broker.stop()
        if self.store is not None:
            self.store.stop()

    def reconcile(self, scenario: str, **row) -> dict:
        lake = self.workdir / "lake"
        ledger = read_ledger(ledger_path(self.workdir))
        table, totals = reconcile(read_topic(lake, "prompts"), read_topic(lake, "trajectories"),
                                  read_topic(lake, "scored"), ledger, read_topic(lake, "deadletter"))
        row = {"scenario": scenario, **row,
               "restarted": ",".join(f"{k}x{v}" for k, v in sorted(self.sup.restarts.items())) or "-",
               "wall_s": round(time.monotonic() - self.t0), **totals}
        RESULTS.append(row)
        print(json.dumps(row))
        bad = {k: totals[k] for k in VIOLATIONS if totals[k]}
        assert not bad, f"{scenario}: accounting violations {bad}\n{table.filter(table['fates'] != 1)}"
        assert totals.get("fate_trained", 0) == STEPS * GROUPS_PER_STEP, totals
        # Only the final fates of a finished run: nothing left undecided.
        assert set(ledger["fate"].unique()) <= {"trained", "dropped_stale", "dropped_all_wrong", "abandoned",
                                                "duplicate", "unused"}
        return totals


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
    run = Run(tmp_path, run_name, cache)
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

    # ERPO: the partitions' snapshots (each flushed when its last owner stopped) hold exactly the
    # table one worker builds from the scored topic, each prompt in one partition only.
    snapshots = load_tables(run.workdir / "erpo")
    assert snapshots["prompt_id"].is_unique().all(), "a prompt's history is split between partitions"
    rule = erpo_rule(RunConfig())
    rebuilt = rebuild_from_scored(read_topic(run.workdir / "lake", "scored"), rule)
    cols = ["prompt_id", "times_seen", "pass_rates", "temperature", "all_correct_streak", "times_residual"]
    got = snapshots.select(cols).sort("prompt_id")
    want = rebuilt.select(cols).sort("prompt_id")
    assert got.height == want.height > 0
    assert got.equals(want), (got.join(want, on="prompt_id", suffix="_rebuilt")
                              .filter(pl.col("times_seen") != pl.col("times_seen_rebuilt")))
    print(f"ERPO state: {got.height} prompts over {snapshots['partition'].n_unique()} partitions equal the rebuild "
          f"({int(got['times_seen'].sum())} groups counted)")


@pytest.mark.parametrize("attempt", range(BROKER_RUNS))
def test_broker_killed_and_restarted_on_durable_storage(cache, tmp_path, run_name, attempt):
    outage_s = 45 if attempt == 0 else 2
    run = Run(tmp_path, run_name, cache, durable=True)
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
