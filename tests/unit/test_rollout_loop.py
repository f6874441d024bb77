"""The rollout service's loop in-process on the in-memory broker (torch engine): each prompt is
sampled at the temperature last announced for it on the `temperature` topic, never-announced ones
at tau0, and the behaviour log-probs are those of the distribution at that temperature; in lockstep
a ticket is generated with the weights it was issued at, waiting for them within a bound. (vLLM's
variant runs as a process over the real broker: tests/integration/test_erpo_loop.py.)"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
import torch

from factories import temperature_update, ticket
from pipeline.config import StalenessConfig, load_config
from pipeline.model.policy import load_policy
from pipeline.model.batch import pack, token_logprobs
from pipeline.transport.consumer import Consumer
from pipeline.transport.memory import MemoryBroker
from pipeline.transport.producer import Producer
from pipeline.transport.topics import ensure_topics, topic_name
from schemas import PROMPT_TICKET, TEMPERATURE_UPDATE
from services.cli import shipped_config
from services.common import initial_policy_path
from services.learner_publish import Publisher
from services.rollout import Rollout

G = 4


@pytest.fixture()
def cfg(tmp_path):
    sets = {
        "name": '"roll"', "workdir": f'"{tmp_path / "run"}"', "cache_dir": f'"{tmp_path / "cache"}"',
        "kafka.bootstrap_servers": f'"memory://{uuid.uuid4().hex[:8]}"', "kafka.poll_stall_timeout_s": "0",
        "metrics.enabled": "false", "model.warmstart.steps": "5", "model.warmstart.hidden_size": "32",
        "model.warmstart.layers": "1", "model.warmstart.heads": "2", "model.warmstart.kv_heads": "1",
        "model.warmstart.intermediate_size": "64", "rollout.engine": '"torch"', "rollout.group_size": str(G),
        "rollout.poll_timeout_ms": "20",
    }
    cfg = load_config(shipped_config(), [f"{k}={v}" for k, v in sets.items()])
    ensure_topics(cfg.kafka, cfg.name)
    yield cfg
    MemoryBroker.reset()


def test_each_prompt_is_sampled_at_its_announced_temperature(cfg):
    producer = Producer(cfg.kafka, "test")
    announced = {"hot": 1.3, "cold": 0.5}
    for pid, t in announced.items():
        producer.send(topic_name(cfg.name, "temperature"), TEMPERATURE_UPDATE, temperature_update(pid, t),
                      key=pid.encode())
    producer.flush()
    rollout = Rollout(cfg, 0)
    rollout.temperatures.catch_up()
    for i, pid in enumerate(("hot", "cold", "new")):
        producer.send(topic_name(cfg.name, "prompts"), PROMPT_TICKET,
                      ticket(f"e0-{i:06d}", pid, text="3+4=", answer="7"), key=pid.encode())
    producer.flush()
    deadline = time.monotonic() + 60
    while rollout.groups < 3 and time.monotonic() < deadline:
        rollout.step()
    assert rollout.groups == 3
    reader = Consumer(cfg.kafka, cfg.name, ["trajectories"], group_id=None, client_id="check", deadletter=None)
    groups = reader.poll(timeout_ms=100)
    reader.close()
    temps = {d.columns["prompt_id"][0]: d.columns["temperature"] for d in groups}
    np.testing.assert_array_equal(temps["hot"], np.float32(1.3))  # every sample of the group
    np.testing.assert_array_equal(temps["cold"], np.float32(0.5))
    np.testing.assert_array_equal(temps["new"], np.float32(cfg.erpo.tau0))  # never announced
    model, tok = load_policy(initial_policy_path(cfg))
    for d in groups:
        c = d.columns
        batch = pack([c["prompt_token_ids"][i] for i in range(G)], [c["completion_token_ids"][i] for i in range(G)],
                     c["temperature"], tok.pad_token_id)
        with torch.no_grad():
            lp, _ = token_logprobs(model, batch)
        np.testing.assert_allclose(lp[batch.completion_mask.bool()].numpy(), c["behavior_logprobs"].values,
                                   atol=1e-5, rtol=0)


def _lockstep(cfg, wait_s: float):
    return cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"staleness": StalenessConfig(
        max_versions=0, lockstep=True, lockstep_wait_s=wait_s)})})


def _behaviour_versions(cfg) -> dict[str, int]:
    reader = Consumer(cfg.kafka, cfg.name, ["trajectories"], group_id=None, client_id="check-v", deadletter=None)
    out = {d.columns["ticket_id"][0]: int(d.columns["policy_version"][0]) for _ in range(3)
           for d in reader.poll(timeout_ms=50)}
    reader.close()
    return out


def test_lockstep_waits_for_the_weights_its_ticket_was_issued_at(cfg):
    cfg = _lockstep(cfg, wait_s=60)
    rollout = Rollout(cfg, 0)
    producer = Producer(cfg.kafka, "learner")
    producer.send(topic_name(cfg.name, "prompts"), PROMPT_TICKET, ticket("e0-000000", "a", text="3+4=", version=1),
                  key=b"a")
    producer.flush()
    weights = {k: v.detach().clone() for k, v in rollout.engine.model.state_dict().items()}
    # The learner announces v1 while the worker already holds the ticket (after its step's refresh).
    announcer = threading.Timer(0.5, lambda: Publisher(cfg, Producer(cfg.kafka, "pub")).announce(weights, 1, 1))
    announcer.start()
    deadline = time.monotonic() + 60
    while rollout.groups < 1 and time.monotonic() < deadline:
        rollout.step()
    announcer.join()
    assert _behaviour_versions(cfg) == {"e0-000000": 1}


def test_lockstep_wait_is_bounded_for_a_version_that_never_comes(cfg):
    cfg = _lockstep(cfg, wait_s=0.3)
    rollout = Rollout(cfg, 0)
    producer = Producer(cfg.kafka, "forger")
    producer.send(topic_name(cfg.name, "prompts"), PROMPT_TICKET, ticket("e0-000000", "a", text="3+4=", version=10**9),
                  key=b"a")
    producer.flush()
    t0 = time.monotonic()
    deadline = t0 + 60
    while rollout.groups < 1 and time.monotonic() < deadline:
        rollout.step()
    assert _behaviour_versions(cfg) == {"e0-000000": 0}  # generated with what it had, after the bound
    assert time.monotonic() - t0 >= 0.3


def test_a_ticket_that_breaks_the_engine_is_dead_lettered_alone(cfg, monkeypatch):
    # One record of two tickets; the engine fails on one of them. The other is generated and
    # produced, so the dead letter must hold only the failing ticket (before: the whole record was
    # dead-lettered as apply_failed while half of it was used).
    from schemas import DEAD_LETTER, concat, decode, headers_for

    rollout = Rollout(cfg, 0)
    real = rollout.engine.generate

    def generate(texts, temps, n):
        if "boom" in texts:
            raise RuntimeError("engine broke on this prompt")
        return real(texts, temps, n)

    monkeypatch.setattr(rollout.engine, "generate", generate)
    producer = Producer(cfg.kafka, "test")
    both = concat([ticket("e0-000001", "p1", text="3+4=", answer="7"), ticket("e0-000002", "p1", text="boom")])
    producer.send(topic_name(cfg.name, "prompts"), PROMPT_TICKET, both, key=b"p1")
    producer.flush()
    deadline = time.monotonic() + 60
    while rollout.groups < 1 and time.monotonic() < deadline:
        rollout.step()
    rollout.step()
    reader = Consumer(cfg.kafka, cfg.name, ["trajectories", "deadletter"], group_id=None, client_id="check",
                      deadletter=None)
    got = reader.poll(timeout_ms=200)
    reader.close()
    assert [d.columns["ticket_id"][0] for d in got if d.topic == "trajectories"] == ["e0-000001"]
    (dead,) = [d for d in got if d.topic == "deadletter"]
    assert dead.kind is DEAD_LETTER and dead.columns["reason"][0].startswith("apply_failed: RuntimeError")
    _, part = decode(PROMPT_TICKET, dead.columns["payload"][0], headers_for(PROMPT_TICKET))
    assert list(part["ticket_id"]) == ["e0-000002"]
