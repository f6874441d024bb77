"""Weights across nodes: the learner's publisher uploads each policy version to an S3-compatible
store (a real local SeaweedFS, `weed mini`) and a rollout worker that cannot see the learner's
folder fetches it by URI, checks every hash and loads it. Tampered objects and forged URIs are
dead-lettered; the store keeps the newest `learner.keep_policies` versions.

The services' loops run in-process on the in-memory broker (the transport is not what is tested
here); the object store is real.
"""

from __future__ import annotations

import shutil
import uuid

import pytest
import torch

from infra.objectstore import ObjectStore
from pipeline.config import load_config
from pipeline.model.weight_store import S3Policies, policy_source
from pipeline.transport.consumer import Consumer
from pipeline.transport.memory import MemoryBroker
from pipeline.transport.producer import Producer
from pipeline.transport.topics import ensure_topics, topic_name
from schemas import POLICY_UPDATE
from services.cli import shipped_config
from services.learner_publish import Publisher
from services.rollout import Rollout
from factories import policy_update

pytestmark = pytest.mark.integration
BUCKET = "rlweights"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with ObjectStore(tmp_path_factory.mktemp("weed"), bucket=BUCKET) as s:
        yield s


@pytest.fixture()
def cfg(tmp_path, store, monkeypatch):
    for k, v in store.client_env().items():
        monkeypatch.setenv(k, v)
    sets = {
        "name": f'"w{uuid.uuid4().hex[:6]}"', "workdir": f'"{tmp_path / "run"}"', "cache_dir": f'"{tmp_path / "cache"}"',
        "kafka.bootstrap_servers": f'"memory://{uuid.uuid4().hex[:8]}"', "kafka.poll_stall_timeout_s": "0",
        "metrics.enabled": "false", "model.warmstart.steps": "5", "model.warmstart.hidden_size": "32",
        "model.warmstart.layers": "1", "model.warmstart.heads": "2", "model.warmstart.kv_heads": "1",
        "model.warmstart.intermediate_size": "64", "rollout.engine": '"torch"', "rollout.group_size": "4",
        "learner.keep_policies": "2",
        "weights.store": '"s3"', "weights.bucket": f'"{BUCKET}"', "weights.endpoint_url": f'"{store.endpoint}"',
        "weights.cache_dir": f'"{tmp_path / "node-b-cache"}"',
    }
    cfg = load_config(shipped_config(), [f"{k}={v}" for k, v in sets.items()])
    ensure_topics(cfg.kafka, cfg.name)
    yield cfg
    MemoryBroker.reset()


def _shifted(rollout: Rollout, by: float) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() + by for k, v in rollout.engine.model.state_dict().items()}


def _dead(cfg) -> list[str]:
    c = Consumer(cfg.kafka, cfg.name, ["deadletter"], group_id=None, client_id="read-dead", deadletter=None)
    return [str(r) for _ in range(3) for d in c.poll(timeout_ms=5) for r in d.columns["reason"]]


def test_a_rollout_loads_weights_published_to_the_object_store(cfg, tmp_path):
    rollout = Rollout(cfg, 0)
    publisher = Publisher(cfg, Producer(cfg.kafka, "learner"))
    want = _shifted(rollout, 0.01)
    publisher.announce(want, version=1, step=1)
    # The worker is on another node: the learner's own folder is not there.
    shutil.rmtree(cfg.workdir / "policies")
    rollout.follower.refresh(rollout.engine, timeout_ms=50)
    assert rollout.engine.version == 1
    got = rollout.engine.model.state_dict()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    assert (tmp_path / "node-b-cache" / cfg.name / "rollout-0" / "v000001" / "model.safetensors").is_file()
    assert S3Policies(cfg.weights, cfg.name).versions() == [1]
    assert _dead(cfg) == []


def test_tampered_objects_and_forged_uris_are_dead_lettered_and_old_versions_pruned(cfg):
    rollout = Rollout(cfg, 0)
    publisher = Publisher(cfg, Producer(cfg.kafka, "learner"))
    store = S3Policies(cfg.weights, cfg.name)
    publisher.announce(_shifted(rollout, 0.01), version=1, step=1)
    rollout.follower.refresh(rollout.engine, timeout_ms=50)
    assert rollout.engine.version == 1

    # Version 2 is changed in the store after it was announced: same size, other bytes.
    publisher.announce(_shifted(rollout, 0.02), version=2, step=2)
    key = f"{store.key(2)}/model.safetensors"
    body = bytearray(store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    store.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    # An announcement pointing at another run's keys, with a hash that would match them.
    other = S3Policies(cfg.weights, "another-run")
    producer = Producer(cfg.kafka, "forger")
    producer.send(topic_name(cfg.name, "policy"), POLICY_UPDATE,
                  policy_update(3, other.uri(3), "a" * 64), key=b"policy")
    producer.flush()
    rollout.follower.refresh(rollout.engine, timeout_ms=50)
    assert rollout.engine.version == 1
    reasons = _dead(cfg)
    assert any("bad_weights" in r and "sha256 mismatch" in r and "v000002" in r for r in reasons), reasons
    assert any("bad_weights" in r and "not this run's version 3" in r for r in reasons), reasons
    cache = cfg.weights.cache_dir / cfg.name / "rollout-0"
    assert not (cache / "v000002").exists()  # a bad download is not kept

    # Newer versions load again, and the store keeps only the newest keep_policies (2).
    publisher.announce(_shifted(rollout, 0.03), version=4, step=4)
    rollout.follower.refresh(rollout.engine, timeout_ms=50)
    assert rollout.engine.version == 4
    assert store.versions() == [2, 4]
    assert sorted(p.name for p in cache.iterdir()) == ["v000001", "v000004"]


def test_policy_source_follows_the_config(cfg, tmp_path):
    assert type(policy_source(cfg, "rollout-0")).__name__ == "S3Source"
    local = load_config(shipped_config(), [f'workdir="{tmp_path}"'])
    assert type(policy_source(local, "rollout-0")).__name__ == "LocalSource"


def test_a_store_that_does_not_answer_is_retried_then_given_up(cfg, tmp_path):
    """Nothing listens at the endpoint: each refresh fails for want of an answer (not for bad
    weights), the announcement is kept for the next refresh, and after STORE_ATTEMPTS it is
    dead-lettered so a version the store never serves cannot hold the rollout."""
    from services.rollout import STORE_ATTEMPTS

    dead_store = cfg.model_copy(update={"weights": cfg.weights.model_copy(update={"endpoint_url": "http://127.0.0.1:9"})})
    rollout = Rollout(dead_store, 0)
    producer = Producer(cfg.kafka, "learner")
    producer.send(topic_name(cfg.name, "policy"), POLICY_UPDATE,
                  policy_update(1, S3Policies(dead_store.weights, cfg.name).uri(1), "b" * 64), key=b"policy")
    producer.flush()
    for _ in range(STORE_ATTEMPTS - 1):
        rollout.follower.refresh(rollout.engine, timeout_ms=20)
    assert rollout.engine.version == 0 and _dead(cfg) == []
    rollout.follower.refresh(rollout.engine, timeout_ms=20)
    reasons = _dead(cfg)
    assert len(reasons) == 1 and reasons[0].startswith("weights_unavailable: policy v1"), reasons


def test_a_version_published_again_replaces_the_cached_copy(cfg):
    """The cache is trusted only when its manifest has the announced sha256: a learner that
    publishes a version number again (a fresh run folder) is followed, not refused."""
    rollout = Rollout(cfg, 0)
    publisher = Publisher(cfg, Producer(cfg.kafka, "learner"))
    source = policy_source(cfg, "rollout-0")
    store = S3Policies(cfg.weights, cfg.name)
    first = _shifted(rollout, 0.01)
    publisher.announce(first, version=1, step=1)
    sha1 = (cfg.workdir / "final_policy.txt").read_text().split()[1]
    source.files(store.uri(1), sha1, 1)
    second = _shifted(rollout, 0.05)
    publisher.announce(second, version=1, step=1)
    sha2 = (cfg.workdir / "final_policy.txt").read_text().split()[1]
    assert sha2 != sha1
    from pipeline.model.weights import load_files

    got = load_files(source.files(store.uri(1), sha2, 1))
    name = next(iter(second))
    torch.testing.assert_close(got[name], second[name], rtol=0, atol=0)
