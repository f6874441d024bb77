"""A run of the real services as subprocesses under the demo's supervisor, for the fault tests
(tests/faults/): its own broker (durable on SeaweedFS if asked), optionally every process on its
own host (`infra.hosts.Hosts`), and the checks every fault scenario ends with: the lake reconciled
with the learner's ledger, and ERPO's partition snapshots against a rebuild from the scored topic.

`RESULTS` collects one row per scenario; tests/conftest.py prints them as one table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from infra.broker import Broker
from infra.hosts import Hosts
from infra.objectstore import ObjectStore
from pipeline.config import KafkaConfig, RunConfig
from pipeline.erpo.partitions import load_tables, rebuild_from_scored
from pipeline.flow.ledger import VIOLATIONS, ledger_path, read_ledger, reconcile
from pipeline.lake.store import read_topic
from pipeline.transport.topics import ensure_topics
from services.common import erpo_rule
from services.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[1]
GROUPS_PER_STEP, G = 4, 4
RESULTS: list[dict] = []


def tiny_sets(run: str, workdir: Path, cache: Path, bootstrap: str, steps: int,
              extra: dict[str, str] | None = None) -> list[str]:
    """`--set` arguments of a small fast run: the tiny warm-started model, torch engines."""
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
        "learner.groups_per_step": str(GROUPS_PER_STEP), "learner.total_steps": str(steps),
        "learner.staleness.max_versions": "2", "learner.backend": '"torch"', "learner.checkpoint.every": "4",
        "learner.tickets.drain_timeout_s": "90", "learner.tickets.lease_floor_s": "10", "erpo.snapshot_every": "3",
        "recorder.flush_every_s": "2", "metrics.enabled": "false", **(extra or {}),
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def warm_cache(path: Path) -> Path:
    """Build the tiny warm-started model into `path` (the scenarios share it)."""
    sets = tiny_sets("warm", path / "unused", path, "127.0.0.1:9", 1)
    subprocess.run([sys.executable, "-m", "services.cli", "warmstart"] + sets, check=True, cwd=REPO,
                   capture_output=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return path


class Run:
    """One run of the services under the supervisor, on its own broker. With `hosts`, the broker,
    the object store and every service run on the host of their name ("broker", "store",
    "learner", "rollout-0", ...; the topics are created from "admin")."""

    def __init__(self, tmp: Path, run: str, cache: Path, steps: int = 30, durable: bool = False,
                 extra: dict | None = None, hosts: Hosts | None = None, weights_store: bool = False) -> None:
        self.tmp, self.workdir, self.steps, self.hosts = tmp, tmp / "run", steps, hosts
        where = {} if hosts is None else {"host": hosts.address("store"), "prefix": hosts.prefix("store")}
        self.store = (ObjectStore(tmp / "objectstore", log_path=tmp / "objectstore.log", **where)
                      if durable or weights_store else None)
        if self.store is not None:
            self.store.start()
        where = {} if hosts is None else {"host": hosts.address("broker"), "prefix": hosts.prefix("broker")}
        self.broker = Broker(log_path=tmp / "broker.log", storage=self.store.storage_url if durable else "memory://tansu/",
                             env=self.store.client_env() if durable else None, **where)
        self.broker.start()
        extra = dict(extra or {})
        if weights_store:  # policies go through the object store, as between machines
            extra.update({"weights.store": '"s3"', "weights.bucket": f'"{self.store.bucket}"',
                          "weights.endpoint_url": f'"{self.store.endpoint}"'})
        self.sets = tiny_sets(run, self.workdir, cache, self.broker.bootstrap, steps, extra)
        self.env = self.store.client_env() if weights_store else {}
        self.sup = Supervisor(tmp / "logs", cwd=REPO, backoff_s=(1, 2, 4), max_restarts=8)
        if hosts is None:
            ensure_topics(KafkaConfig(bootstrap_servers=self.broker.bootstrap), run)
        else:  # from a host of its own: the admin's
            subprocess.run(self.prefix("admin") + [sys.executable, "-m", "services.cli", "topics"] + self.sets,
                           check=True, cwd=REPO, capture_output=True, timeout=120)
        self.t0 = time.monotonic()

    def prefix(self, host: str) -> list[str]:
        """The command prefix that runs a process on ``host`` (a service runs on the host of its
        own name: "learner", "rollout-1", ...); none without hosts."""
        return [] if self.hosts is None else self.hosts.prefix(host)

    def start(self, name: str, worker_index: int | None = None, env: dict | None = None,
              extra: list[str] | None = None) -> None:
        service = name.split("-")[0]
        argv = self.prefix(name) + [sys.executable, "-m", "services.cli", service] + self.sets + (extra or [])
        if worker_index is not None:
            argv += ["--worker-index", str(worker_index)]
        self.sup.start(name, argv, env={**self.env, **(env or {})})

    def progress(self) -> list[dict]:
        try:
            lines = (self.workdir / "progress" / "learner.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
        return out

    def step(self) -> int:
        rows = self.progress()
        return rows[-1]["step"] if rows else 0

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
        assert totals.get("fate_trained", 0) == self.steps * GROUPS_PER_STEP, totals
        # Only the final fates of a finished run: nothing left undecided.
        assert set(ledger["fate"].unique()) <= {"trained", "dropped_stale", "dropped_all_wrong", "abandoned",
                                                "duplicate", "unused"}
        return totals

    def check_erpo_state(self) -> None:
        """ERPO: the partitions' snapshots (each flushed when its last owner stopped) hold exactly
        the table one worker builds from the scored topic, each prompt in one partition only."""
        snapshots = load_tables(self.workdir / "erpo")
        assert snapshots["prompt_id"].is_unique().all(), "a prompt's history is split between partitions"
        rule = erpo_rule(RunConfig())
        rebuilt = rebuild_from_scored(read_topic(self.workdir / "lake", "scored"), rule)
        cols = ["prompt_id", "times_seen", "pass_rates", "temperature", "all_correct_streak", "times_residual"]
        got = snapshots.select(cols).sort("prompt_id")
        want = rebuilt.select(cols).sort("prompt_id")
        assert got.height == want.height > 0
        assert got.equals(want), (got.join(want, on="prompt_id", suffix="_rebuilt")
                                  .filter(pl.col("times_seen") != pl.col("times_seen_rebuilt")))
        print(f"ERPO state: {got.height} prompts over {snapshots['partition'].n_unique()} partitions equal the "
              f"rebuild ({int(got['times_seen'].sum())} groups counted)")
