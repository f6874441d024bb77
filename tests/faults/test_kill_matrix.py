"""Fault matrix: kill -9 one component mid-run, restart it, then reconcile the run.

For each of rollout, reward, learner, recorder, and the broker (durable storage: Tansu on a
local SeaweedFS S3 store), a small run of the real services is started, the component is killed
with SIGKILL once the learner has done a third of its steps, and restarted (the learner with
`learner.resume=true`). A supervisor restarts any service that exits with an error meanwhile,
as a process manager would (shown in the table as `also_crashed`). When the learner has finished and drained,
the recorder drains every topic into the lake, and `pipeline.ledger.reconcile` joins the lake
with the learner's ledger: every issued ticket must have exactly one fate, none trained twice,
and the learner must have trained exactly `total_steps x groups_per_step` groups.

The table is printed at the end of the session (tests/faults/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.broker import Broker
from infra.objectstore import ObjectStore
from pipeline.config import KafkaConfig
from pipeline.lake import read_topic
from pipeline.ledger import VIOLATIONS, ledger_path, read_ledger, reconcile
from pipeline.transport import ensure_topics

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
STEPS, GROUPS_PER_STEP, G = 30, 4, 4
KILL_AT_STEP = 10
SERVICES = ("learner", "reward", "rollout", "recorder")
RESULTS: list[dict] = []


# The reward scenario snapshots rarely, so the restarted worker (no snapshot yet) re-scores every
# group from the start of the topic: the learner must ignore each of them as a duplicate.
# The rollout scenario kills the default engine, vLLM (in process); the others use the torch engine,
# which starts in a second.
EXTRA = {"reward": {"erpo.snapshot_every": "1000"}, "rollout": {"rollout.engine": '"vllm"'}}


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
        "learner.max_staleness": "2", "learner.backend": '"torch"', "learner.checkpoint_every": "4",
        "learner.drain_timeout_s": "90", "erpo.snapshot_every": "3",
        "recorder.flush_every_s": "2", "metrics.enabled": "false", **(extra or {}),
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


class Supervisor:
    """The services of one run as subprocesses; restarts any that exits with an error."""

    def __init__(self, tmp: Path, sets: list[str]) -> None:
        self.tmp, self.sets = tmp, sets
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.procs: dict[str, subprocess.Popen] = {}
        self.crashed: dict[str, int] = {}
        """Services restarted by `tend` after exiting with an error (not the deliberate kill)."""

    def start(self, name: str, resume: bool = False) -> None:
        extra = ["--set", "learner.resume=true"] if resume else []
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "services.cli", name] + self.sets + extra,
                                            cwd=REPO, env=dict(self.env, RLSTREAM_WORKER=name), stdout=log,
                                            stderr=subprocess.STDOUT)

    def kill9(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def restart(self, name: str) -> None:
        self.start(name, resume=name == "learner" and bool(list((self.tmp / "run" / "checkpoints").glob("step-*"))))

    def tend(self) -> None:
        """Restart services that died with an error (not a learner that finished)."""
        for name, p in list(self.procs.items()):
            if p.poll() not in (None, 0):
                self.crashed[name] = self.crashed.get(name, 0) + 1
                self.restart(name)

    def stop(self, name: str, timeout_s: float = 120) -> int:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def log_tail(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]


def _learner_step(workdir: Path) -> int:
    try:
        return json.loads((workdir / "progress" / "learner.jsonl").read_text().splitlines()[-1])["step"]
    except (FileNotFoundError, IndexError, json.JSONDecodeError):
        return 0


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The tiny warm-started model, built once for every scenario."""
    path = tmp_path_factory.mktemp("cache")
    sets = _sets("warm", path / "unused", path, "127.0.0.1:9")
    subprocess.run([sys.executable, "-m", "services.cli", "warmstart"] + sets, check=True, cwd=REPO,
                   capture_output=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return path


@pytest.mark.parametrize("component", ["rollout", "reward", "learner", "recorder", "broker"])
def test_kill9_restart_reconciles(component, cache, tmp_path, run_name):
    store = ObjectStore(tmp_path / "objectstore", log_path=tmp_path / "objectstore.log") \
        if component == "broker" else None
    if store is not None:
        store.start()
    broker = Broker(log_path=tmp_path / "broker.log",
                    storage=store.storage_url if store else "memory://tansu/", env=store.client_env() if store else None)
    broker.start()
    workdir = tmp_path / "run"
    sup = Supervisor(tmp_path, _sets(run_name, workdir, cache, broker.bootstrap, EXTRA.get(component)))
    t0 = time.monotonic()
    try:
        ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap), run_name)
        for name in SERVICES:
            sup.start(name)
        killed_at = None
        learner = sup.procs["learner"]
        deadline = time.monotonic() + 600
        while True:
            learner = sup.procs["learner"]
            if learner.poll() == 0:
                break
            assert time.monotonic() < deadline, f"run did not finish; learner log:\n{sup.log_tail('learner')}"
            if killed_at is None and _learner_step(workdir) >= KILL_AT_STEP:
                killed_at = _learner_step(workdir)
                if component == "broker":
                    broker.kill()
                    time.sleep(2)
                    broker.start()
                else:
                    sup.kill9(component)
                    time.sleep(1)
                    sup.restart(component)
            sup.tend()
            time.sleep(0.5)
        assert killed_at is not None, "the learner finished before the kill"
        for name in ("rollout", "reward"):
            sup.stop(name)
        assert sup.stop("recorder") == 0, sup.log_tail("recorder")
    finally:
        for name in sup.procs:
            sup.stop(name, timeout_s=10)
        broker.stop()
        if store is not None:
            store.stop()

    lake = workdir / "lake"
    ledger = read_ledger(ledger_path(workdir))
    table, totals = reconcile(read_topic(lake, "prompts"), read_topic(lake, "trajectories"),
                              read_topic(lake, "scored"), ledger)
    row = {"killed": component, "at_step": killed_at,
           "also_crashed": ",".join(f"{k}x{v}" for k, v in sup.crashed.items()) or "-",
           "wall_s": round(time.monotonic() - t0), **totals}
    RESULTS.append(row)
    print(json.dumps(row))
    bad = {k: totals[k] for k in VIOLATIONS if totals[k]}
    assert not bad, f"{component}: accounting violations {bad}\n{table.filter(table['fates'] != 1)}"
    assert totals.get("fate_trained", 0) == STEPS * GROUPS_PER_STEP, totals
    if component == "reward":
        assert totals["duplicates_ignored"] > 0, "the replayed groups never reached the learner"
    # Only the final fates of a finished run: nothing left undecided.
    assert set(ledger["fate"].unique()) <= {"trained", "dropped_stale", "dropped_all_wrong", "invalid",
                                            "duplicate", "unused"}
