"""The real services as subprocesses over the real broker: rollout -> reward -> learner.

Checks that groups flow end to end, that every consumer group's committed offsets account exactly
for what it processed, that policy versions reach the rollout, and that a corrupt message put in
the middle of the stream is dead-lettered while the services keep going.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from kafka import KafkaConsumer, TopicPartition

from pipeline.flow.ledger import ledger_path, read_ledger
from pipeline.model.policy import load_policy
from pipeline.transport.consumer import Consumer
from pipeline.transport.producer import Producer
from pipeline.transport.topics import ensure_topics, topic_name
from schemas import TRAJECTORY, headers_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS, GROUPS_PER_STEP, G = 3, 4, 4


def _overrides(run: str, workdir: Path, cache: Path, bootstrap: str) -> list[str]:
    sets = {
        "name": f'"{run}"',
        "workdir": f'"{workdir}"',
        "cache_dir": f'"{cache}"',
        "kafka.bootstrap_servers": f'"{bootstrap}"',
        "kafka.session_timeout_ms": "2000",
        "task.train_pool": "32",
        "model.warmstart.steps": "20",
        "model.warmstart.hidden_size": "32",
        "model.warmstart.layers": "2",
        "model.warmstart.heads": "2",
        "model.warmstart.kv_heads": "1",
        "model.warmstart.intermediate_size": "64",
        # The light engine: these tests are about the services' dataflow, and a head size of 16 is
        # below vLLM's CPU minimum. vLLM runs in test_vllm_engine, test_erpo_loop, the fault
        # matrix's rollout kill and the e2e demo (its default).
        "rollout.engine": '"torch"',
        "rollout.group_size": str(G),
        "rollout.max_prompts_per_batch": "4",
        "learner.groups_per_step": str(GROUPS_PER_STEP),
        "learner.total_steps": str(STEPS),
        "learner.staleness.max_versions": "1",
        "erpo.snapshot_every": "1",  # the reward commits at snapshots; the test checks its commits
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _committed(bootstrap: str, group: str, topic: str) -> int:
    """Sum over the topic's partitions of the group's committed offsets."""
    probe = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = probe.partitions_for_topic(topic) or set()
        return sum(probe.committed(TopicPartition(topic, p)) or 0 for p in parts)
    finally:
        probe.close()


def _count(kafka_cfg, run: str, topic: str) -> int:
    """Messages in a topic, counted by reading it (Tansu's "latest" offset is not reliable)."""
    c = Consumer(kafka_cfg, run, [topic], group_id=None, client_id="counter", deadletter=None)
    n, idle = 0, 0
    while idle < 3:
        got = c.poll(timeout_ms=300)
        n += len(got)
        idle = 0 if got else idle + 1
    dropped = c.stats["dropped"]
    c.close()
    return n + dropped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.parametrize("ranks", [2], ids=["learner-2-ranks-zero3"])
def test_groups_flow_through_the_services_with_offsets_committed(broker, kafka_cfg, run_name, tmp_path, ranks):
    """The learner as two ranks under DeepSpeed ZeRO-3 started by torchrun (rank 0 consumes and
    broadcasts, both train, published weights are gathered). (One rank: every ZeRO stage against
    plain torch in test_trainer, the whole loop in-process in tests/unit/test_loop_in_process.py,
    and the e2e demo's DeepSpeed learner; `ranks = 1` still runs here if added back.)"""
    cache = tmp_path / "cache"
    sets = _overrides(run_name, tmp_path / "run", cache, broker.bootstrap)
    sets += ["--set", f'learner.deepspeed_config="infra/deepspeed/zero{2 if ranks == 1 else 3}.json"',
             "--set", "learner.checkpoint.every=2"]
    cli = [sys.executable, "-m", "services.cli"]
    launch = {"learner": cli if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 str(ranks), "--master_port", str(_free_port()), "-m", "services.cli"]}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Build the (tiny) warm-start once, before the services race for it.
    subprocess.run(cli + ["warmstart"] + sets, check=True, cwd=REPO, env=env, capture_output=True)
    ensure_topics(kafka_cfg, run_name)

    # A corrupt message in the middle of the trajectory stream: garbage bytes with valid headers.
    p = Producer(kafka_cfg, "test")
    p.send_raw(topic_name(run_name, "trajectories"), b"\x00not arrow", headers_for(TRAJECTORY), key=b"x")
    p.flush()
    p.close()

    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("learner", "reward", "rollout")}
    procs = {name: subprocess.Popen(launch.get(name, cli) + [name] + sets, cwd=REPO, env=env, stdout=logs[name],
                                    stderr=subprocess.STDOUT) for name in logs}
    try:
        try:
            procs["learner"].wait(timeout=240)
        except subprocess.TimeoutExpired:
            pass
        for name, proc in procs.items():
            code = proc.poll()
            assert code in (None, 0), f"{name} exited {code}:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
        assert procs["learner"].returncode == 0, "learner did not finish:\n" + (tmp_path / "learner.log").read_text()[-3000:]

        # Rollout and reward drain what the learner issued, then their commits cover everything.
        n_tickets = _count(kafka_cfg, run_name, "prompts")
        _wait(lambda: _committed(broker.bootstrap, f"{run_name}.rollout", topic_name(run_name, "prompts")) == n_tickets,
              60, "rollout to commit every ticket")
        n_traj = _count(kafka_cfg, run_name, "trajectories")
        assert n_traj == n_tickets + 1  # one group per ticket, plus the corrupt message
        _wait(lambda: _committed(broker.bootstrap, f"{run_name}.reward", topic_name(run_name, "trajectories")) == n_traj,
              60, "reward to commit every trajectory message")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)

    progress = [json.loads(line) for line in (tmp_path / "run" / "progress" / "learner.jsonl").read_text().splitlines()]
    last = progress[-1]
    assert last["step"] == STEPS and last["version"] == STEPS
    # The learner committed exactly the groups it trained on or dropped (one group per message).
    trained_or_dropped = STEPS * GROUPS_PER_STEP + last["dropped"]
    assert _committed(broker.bootstrap, f"{run_name}.learner", topic_name(run_name, "scored")) == trained_or_dropped
    assert _count(kafka_cfg, run_name, "scored") == n_tickets
    assert _count(kafka_cfg, run_name, "policy") == STEPS

    # Rollout stamped later groups with newer policy versions it loaded from the policy topic.
    c = Consumer(kafka_cfg, run_name, ["scored"], group_id=None, client_id="check", deadletter=None)
    versions, statuses, sizes = [], [], []
    for _ in range(10):
        for d in c.poll(timeout_ms=300):
            versions += list(d.columns["policy_version"])
            statuses += list(d.columns["verify_status"])
            sizes.append(len(d.columns["traj_id"]))
    c.close()
    assert set(sizes) == {G}
    assert max(versions) >= 1, "rollout never loaded a published policy"
    assert set(statuses) <= {"correct", "wrong", "no_answer", "error", "timeout"}

    # The corrupt message is in the dead-letter topic, with its reason and raw bytes.
    c = Consumer(kafka_cfg, run_name, ["deadletter"], group_id=None, client_id="dlq", deadletter=None)
    dead = [d for _ in range(5) for d in c.poll(timeout_ms=300)]
    c.close()
    assert len(dead) == 1
    row = dead[0].columns
    assert row["source_topic"][0] == topic_name(run_name, "trajectories")
    assert row["reason"][0].startswith("undecodable")
    assert row["payload"][0] == b"\x00not arrow"
    # Checkpoints at steps 2 and 3 (the end); the last holds exactly the committed offsets.
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002", "step-00000003"]
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "learner.json").read_text())
    assert saved["step"] == STEPS and saved["version"] == STEPS and saved["trained"] == STEPS * GROUPS_PER_STEP
    assert sum(o for _, _, o in saved["offsets"]) == trained_or_dropped
    if ranks == 2:
        assert "2 ranks" in (tmp_path / "learner.log").read_text()
    published = sorted((tmp_path / "run" / "policies").glob("v*"))
    assert [p.name for p in published] == [f"v{v:06d}" for v in range(STEPS - 2, STEPS + 1)]  # keep_policies = 3
    # The final weights also went out as a complete Hugging Face folder, loadable as it is.
    exported, _ = load_policy(tmp_path / "run" / "export" / "final")
    newest = load_file(str(published[-1] / "model.safetensors"))
    assert all(torch.equal(exported.state_dict()[k], t) for k, t in newest.items())
    assert np.isfinite(last["loss"])


def test_learner_resumes_from_its_checkpoint(broker, kafka_cfg, run_name, tmp_path):
    """A learner that ran 2 steps (checkpoint at 2) is started again on the same run folder: it
    resumes by default (nothing to ask for), continues at step 3 from the saved offsets,
    announces its restored weights under a new version, and the policy versions on the topic keep
    rising."""
    sets = _overrides(run_name, tmp_path / "run", tmp_path / "cache", broker.bootstrap)
    sets += ["--set", 'learner.backend="torch"', "--set", "learner.checkpoint.every=2"]
    cli = [sys.executable, "-m", "services.cli"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(cli + ["warmstart"] + sets, check=True, cwd=REPO, env=env, capture_output=True)
    ensure_topics(kafka_cfg, run_name)
    logs = {name: open(tmp_path / f"{name}.log", "ab") for name in ("learner", "reward", "rollout")}
    workers = {name: subprocess.Popen(cli + [name] + sets, cwd=REPO, env=env, stdout=logs[name],
                                      stderr=subprocess.STDOUT) for name in ("reward", "rollout")}
    try:
        for extra in (["--set", "learner.total_steps=2"], ["--set", "learner.total_steps=4"]):
            learner = subprocess.run(cli + ["learner"] + sets + extra, cwd=REPO, env=env, stdout=logs["learner"],
                                     stderr=subprocess.STDOUT, timeout=240)
            assert learner.returncode == 0, (tmp_path / "learner.log").read_text()[-3000:]
    finally:
        for proc in workers.values():
            proc.terminate()
        for proc in workers.values():
            proc.wait(timeout=30)
    progress = [json.loads(line) for line in (tmp_path / "run" / "progress" / "learner.jsonl").read_text().splitlines()]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert [p["version"] for p in progress] == [1, 2, 4, 5]  # v3 = the restored weights, announced on resume
    c = Consumer(kafka_cfg, run_name, ["policy"], group_id=None, client_id="check", deadletter=None)
    versions = [int(d.columns["version"][0]) for _ in range(6) for d in c.poll(timeout_ms=300)]
    c.close()
    assert versions == [1, 2, 3, 4, 5]
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000004"]
    saved = json.loads((root / "step-00000004" / "learner.json").read_text())
    assert saved["trained"] == 4 * GROUPS_PER_STEP and saved["step"] == 4
    # The ledger holds both lives: the restart did not truncate it to step 0.
    ledger = read_ledger(ledger_path(tmp_path / "run"))
    assert ledger.filter(ledger["fate"] == "trained").height == 4 * GROUPS_PER_STEP
    committed = _committed(broker.bootstrap, f"{run_name}.learner", topic_name(run_name, "scored"))
    assert committed == sum(o for _, _, o in saved["offsets"])
