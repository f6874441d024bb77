"""ERPO across processes over the real broker.

- The reward service, fed all-correct groups of one prompt, emits rising temperatures for it.
- Killed with SIGKILL mid-stream and restarted, it resumes from its partitions' Parquet snapshots and
  ends with the same table as the rule applied once to every group (nothing applied twice, nothing
  skipped).
- A rollout process on vLLM samples each prompt at the temperature last announced for it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from needs import require_vllm

import torch

from erpo_oracle import reference_update, to_dict_table
from factories import ticket
from pipeline.config import RunConfig
from pipeline.erpo.partitions import load_tables
from pipeline.erpo.rule import REASONS
from pipeline.model.policy import load_policy
from pipeline.model.batch import pack, token_logprobs
from pipeline.transport.consumer import Consumer
from pipeline.transport.producer import Producer
from pipeline.transport.topics import ensure_topics, topic_name
from schemas import PROMPT_TICKET, TEMPERATURE_UPDATE, TRAJECTORY, Ragged
from services.common import erpo_rule

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
G = 4


def _sets(run: str, workdir: Path, bootstrap: str, extra: dict[str, str] | None = None) -> list[str]:
    sets = {"name": f'"{run}"', "workdir": f'"{workdir}"', "kafka.bootstrap_servers": f'"{bootstrap}"',
            "kafka.session_timeout_ms": "2000", "reward.verifier_workers": "0",
            "erpo.snapshot_every": "1", "rollout.engine": '"torch"', **(extra or {})}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


_TICKETS = itertools.count()


def _group(prompt_id: str, answer: str, completions: list[str], version: int = 0) -> dict:
    n = len(completions)
    obj = lambda v: np.array([v] * n, dtype=object)  # noqa: E731
    return {
        "traj_id": np.array([uuid.uuid4().hex for _ in range(n)], dtype=object),
        "group_id": obj(uuid.uuid4().hex), "ticket_id": obj(f"e0-{next(_TICKETS):06d}"),
        "attempt": np.zeros(n, dtype=np.int32), "prompt_id": obj(prompt_id),
        "sample_idx": np.arange(n, dtype=np.int32), "group_size": np.full(n, n, dtype=np.int32),
        "policy_version": np.full(n, version, dtype=np.int64), "temperature": np.ones(n, dtype=np.float32),
        "prompt_text": obj("1+1="), "prompt_token_ids": Ragged.from_list([[1, 5, 6]] * n, np.int32),
        "completion_token_ids": Ragged.from_list([[5, 2]] * n, np.int32),
        "behavior_logprobs": Ragged.from_list([[-0.1, -0.2]] * n, np.float32),
        "completion_text": np.array(completions, dtype=object), "finish_reason": obj("stop"),
        "answer": obj(answer), "created_at": np.zeros(n, dtype=np.float64),
    }


def _read_all(kafka_cfg, run: str, topic: str, idle_polls: int = 4) -> list:
    c = Consumer(kafka_cfg, run, [topic], group_id=None, client_id=f"read-{topic}", deadletter=None)
    out, idle = [], 0
    while idle < idle_polls:
        got = c.poll(timeout_ms=300)
        out += got
        idle = 0 if got else idle + 1
    c.close()
    return out


def _wait_for(kafka_cfg, run: str, topic: str, n: int, timeout_s: float = 60) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        got = _read_all(kafka_cfg, run, topic, idle_polls=2)
        if len(got) >= n:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{topic}: {len(got)} messages, expected {n}")


def scrape(workdir: Path, name: str) -> dict[str, float]:
    """Samples of the process whose Prometheus target file is ``<name>.json``, by series."""
    target = json.loads((workdir / "metrics" / "targets" / f"{name}.json").read_text())
    text = urllib.request.urlopen(f"http://{target[0]['targets'][0]}/metrics", timeout=10).read().decode()
    return {series: float(value) for series, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def _start(service: str, sets: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.cli", service] + sets, cwd=REPO,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_reward_raises_temperatures_and_resumes_from_its_snapshot(kafka_cfg, run_name, tmp_path):
    ensure_topics(kafka_cfg, run_name)
    sets = _sets(run_name, tmp_path, kafka_cfg.bootstrap_servers)
    producer = Producer(kafka_cfg, "test")
    traj_topic = topic_name(run_name, "trajectories")
    # Prompt "easy" is all correct every time; "mixed" is informative (2 of 4 correct).
    stream = [("easy", 1.0), ("mixed", 0.5), ("easy", 1.0), ("easy", 1.0), ("mixed", 0.5), ("easy", 1.0)]

    def send(items):
        for pid, rate in items:
            k = int(rate * G)
            producer.send(traj_topic, TRAJECTORY, _group(pid, "2", ["2"] * k + ["3"] * (G - k)), key=pid.encode())
            producer.flush()

    log = tmp_path / "reward.log"
    reward = _start("reward", sets, log)
    try:
        send(stream[:3])
        _wait_for(kafka_cfg, run_name, "scored", 3)
        time.sleep(1.0)  # let the snapshot of the last batch land
        reward.send_signal(signal.SIGKILL)  # no clean shutdown: only the snapshot survives
        reward.wait(30)
        send(stream[3:])
        reward = _start("reward", sets, log)
        _wait_for(kafka_cfg, run_name, "scored", len(stream))
        time.sleep(1.0)
        exported = scrape(tmp_path, "reward-0")
    finally:
        reward.send_signal(signal.SIGTERM)
        reward.wait(30)
        producer.close()

    rule = erpo_rule(RunConfig())
    expected, _ = reference_update({}, [(p, r, 0) for p, r in stream], rule, now=0.0)
    table = load_tables(tmp_path / "erpo")  # one snapshot per partition the prompts fell in
    got = to_dict_table(table.drop("partition"))
    assert sorted(got) == ["easy", "mixed"]
    for pid in got:
        for col in ("times_seen", "pass_rates", "all_correct_streak", "times_residual", "times_reactivated"):
            assert got[pid][col] == pytest.approx(expected[pid][col]), (pid, col, log.read_text()[-2000:])
        assert got[pid]["temperature"] == pytest.approx(expected[pid]["temperature"], abs=1e-6)
    assert got["easy"]["temperature"] == pytest.approx(1.4, abs=1e-6)  # 1.0 + 4 x 0.1

    updates = _read_all(kafka_cfg, run_name, "temperature")
    easy = [float(d.columns["temperature"][0]) for d in updates if d.columns["prompt_id"][0] == "easy"]
    # Rising; one update per prompt and batch (a batch holding two of its groups announces the
    # final value only); a restart may repeat a decision, never skip one.
    assert easy == sorted(easy) and easy[-1] == pytest.approx(1.4, abs=1e-6)
    assert {round(t, 4) for t in easy} <= {1.1, 1.2, 1.3, 1.4}
    reasons = {d.columns["reason"][0] for d in updates}
    assert reasons <= set(REASONS)

    # The restarted process's metrics: the resumed table and the groups it saw itself.
    assert exported["rlstream_erpo_table_prompts"] == 2
    assert exported['rlstream_erpo_prompt_temperature_bucket{le="+Inf"}'] == 2
    assert exported['rlstream_erpo_prompt_temperature_bucket{le="1.0"}'] == 1  # "mixed" stays at 1.0
    assert exported['rlstream_erpo_residual_prompts{kind="all_correct"}'] == 1
    assert exported['rlstream_erpo_groups_total{kind="all_correct"}'] >= 1
    assert exported['rlstream_process_info{run="%s",service="reward",worker="0"}' % run_name] == 1
    assert exported["rlstream_erpo_update_seconds_count"] >= 1


@pytest.mark.parametrize("engine", ["vllm"])
def test_rollout_samples_each_prompt_at_its_announced_temperature(kafka_cfg, run_name, tmp_path, engine):
    """A rollout process on vLLM (the torch engine's loop is tests/unit/test_rollout_loop.py)."""
    if engine == "vllm":
        require_vllm()
    ensure_topics(kafka_cfg, run_name)
    cache = tmp_path / "cache"
    # vLLM's CPU attention needs head_dim >= 32
    hidden = "64" if engine == "vllm" else "32"
    tiny = {"cache_dir": f'"{cache}"', "model.warmstart.steps": "5", "model.warmstart.hidden_size": hidden,
            "model.warmstart.layers": "1", "model.warmstart.heads": "2", "model.warmstart.kv_heads": "1",
            "model.warmstart.intermediate_size": "64", "rollout.group_size": str(G),
            "rollout.engine": f'"{engine}"'}
    sets = _sets(run_name, tmp_path, kafka_cfg.bootstrap_servers, tiny)
    subprocess.run([sys.executable, "-m", "services.cli", "warmstart"] + sets, cwd=REPO, check=True,
                   capture_output=True)
    producer = Producer(kafka_cfg, "test")
    announced = {"hot": 1.3, "cold": 0.5}
    for pid, t in announced.items():
        producer.send(topic_name(run_name, "temperature"), TEMPERATURE_UPDATE, {
            "prompt_id": np.array([pid], dtype=object), "temperature": np.array([t], dtype=np.float32),
            "reason": np.array(["all_correct_raise"], dtype=object), "times_seen": np.array([3], dtype=np.int32),
            "mean_pass_rate": np.array([1.0], dtype=np.float32), "all_correct_streak": np.array([3], dtype=np.int32),
            "decided_at_version": np.array([0], dtype=np.int64), "decided_at": np.array([0.0]),
        }, key=pid.encode())
    producer.flush()
    rollout = _start("rollout", sets, tmp_path / "rollout.log")
    try:
        time.sleep(1.0)
        for i, pid in enumerate(("hot", "cold", "new")):
            producer.send(topic_name(run_name, "prompts"), PROMPT_TICKET,
                          ticket(f"e0-{i:06d}", pid, text="3+4=", answer="7"), key=pid.encode())
        producer.flush()
        groups = _wait_for(kafka_cfg, run_name, "trajectories", 3, timeout_s=180)
    finally:
        rollout.send_signal(signal.SIGTERM)
        rollout.wait(30)
        producer.close()
    temps = {d.columns["prompt_id"][0]: d.columns["temperature"] for d in groups}
    np.testing.assert_array_equal(temps["hot"], np.float32(1.3))  # every sample of the group
    np.testing.assert_array_equal(temps["cold"], np.float32(0.5))
    np.testing.assert_array_equal(temps["new"], np.float32(1.0))  # never announced: tau0
    # The behaviour log-probs are those of the distribution at the announced temperature.
    (model_dir,) = cache.glob("warmstart-*")
    model, tok = load_policy(model_dir)
    for d in groups:
        c = d.columns
        batch = pack([c["prompt_token_ids"][i] for i in range(G)],
                     [c["completion_token_ids"][i] for i in range(G)], c["temperature"], tok.pad_token_id)
        with torch.no_grad():
            lp, _ = token_logprobs(model, batch)
        recomputed = lp[batch.completion_mask.bool()].numpy()
        np.testing.assert_allclose(recomputed, c["behavior_logprobs"].values, atol=1e-4 if engine == "vllm" else 1e-5,
                                   rtol=0)
