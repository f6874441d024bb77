"""Fuzzing the consumers: malformed messages are rejected with a reason, valid ones are not lost.

1. Hypothesis drives 10,000 generated malformed Trajectory messages (`malformed.py`: garbage,
   truncated streams, bad headers, foreign schemas, nulls, two batches, and one semantic break per
   group: NaN/inf/positive log-probs, miscounted log-probs, negative token ids, empty ids and
   prompts, bad temperatures, incomplete groups, ...) and 2,000 arbitrary byte strings under
   arbitrary headers through `decode` + `pipeline.flow.validate.check_groups`: each is a `DecodeError`
   with a known reason or has every group rejected; nothing else is raised.
2. The real reward service, as a subprocess on the real broker, gets 2,000 malformed messages
   interleaved with 50 valid groups (some with a 1 MB completion or an adversarial LaTeX answer):
   it must not crash, must dead-letter exactly the malformed ones (each with its reason, source
   offset and original bytes) and score every valid group exactly once. (The end-to-end test writes
   10,000 hostile records into every topic of a running demo.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factories import trajectory_group
from malformed import HEADERS, malformed
from pipeline.flow.validate import Limits, check_groups
from pipeline.transport.consumer import Consumer
from pipeline.transport.producer import Producer
from pipeline.transport.topics import ensure_topics, topic_name
from schemas import TRAJECTORY, DecodeError, decode, encode

REPO = Path(__file__).resolve().parents[2]
DECODE_REASONS = {"missing_header", "unknown_schema", "wrong_schema", "unknown_version", "undecodable",
                  "schema_mismatch", "unexpected_null"}


def _rejection(payload: bytes, headers) -> str:
    """Why a consumer rejects this message; AssertionError if it would accept any of it."""
    try:
        _, cols = decode(TRAJECTORY, payload, headers)
    except DecodeError as e:
        assert e.reason in DECODE_REASONS, e.reason
        return e.reason
    good, rejected = check_groups(cols, Limits())
    assert not good and rejected, "a malformed message passed every check"
    assert all(r.reason.startswith("invalid_group: ") for r in rejected)
    return rejected[0].code


@settings(max_examples=10_000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_generated_malformed_messages_are_rejected_with_a_reason(seed):
    _, payload, headers = malformed(np.random.default_rng(seed))
    _rejection(payload, headers)


def test_every_mutation_kind_comes_up():
    seen: dict[str, int] = {}
    for seed in range(3000):
        name = malformed(np.random.default_rng(seed))[0]
        seen[name] = seen.get(name, 0) + 1
    assert len(seen) >= 18 and min(seen.values()) >= 15, seen


header_values = st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"Trajectory", b"1", b"2"]))


@settings(max_examples=2_000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(max_size=600), schema=header_values, version=header_values)
def test_arbitrary_bytes_never_decode(payload, schema, version):
    headers = [(k, v) for k, v in (("schema", schema), ("schema_version", version)) if v is not None]
    with pytest.raises(DecodeError) as e:
        decode(TRAJECTORY, payload, headers)
    assert e.value.reason in DECODE_REASONS


@pytest.mark.integration
def test_reward_service_dead_letters_malformed_messages_and_scores_the_rest(broker, kafka_cfg, run_name,
                                                                              tmp_path):
    rng = np.random.default_rng(7)
    ensure_topics(kafka_cfg, run_name)
    topic = topic_name(run_name, "trajectories")
    producer = Producer(kafka_cfg, "fuzz")
    n_bad, valid = 2_000, []
    for i in range(n_bad):
        name, payload, headers = malformed(rng)
        producer.send_raw(topic, payload, headers, key=f"k{i % 7}".encode())
        if i % 40 == 0:  # valid groups between the bad ones, some of them hard for the verifier
            texts = [["3", "4", "3"], ["x" * 1_000_000, "3", "\\boxed{3}"],
                     ["\\boxed{9^{9^{9^{9^{9^{9}}}}}}", "3", "3"]][len(valid) % 3]
            answer = "\\frac{" * 300 + "1" + "}" * 300 if len(valid) % 5 == 4 else "3"
            g = trajectory_group(f"e1-{i:06d}", f"p{i}", size=3, texts=texts, answer=answer)
            producer.send_raw(topic, encode(TRAJECTORY, g), HEADERS, key=f"p{i}".encode())
            valid.append(f"e1-{i:06d}")
    producer.flush()
    producer.close()

    sets = {"name": f'"{run_name}"', "workdir": f'"{tmp_path / "run"}"',
            "kafka.bootstrap_servers": f'"{broker.bootstrap}"', "kafka.session_timeout_ms": "2000",
            "reward.verify_timeout_s": "2.0", "metrics.enabled": "false"}
    cmd = [sys.executable, "-m", "services.cli", "reward"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    log = open(tmp_path / "reward.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=log,
                            stderr=subprocess.STDOUT)
    dead = Consumer(kafka_cfg, run_name, ["deadletter"], group_id=None, client_id="dlq", deadletter=None)
    scored = Consumer(kafka_cfg, run_name, ["scored"], group_id=None, client_id="scored", deadletter=None)
    reasons, sources, tickets = {}, set(), []
    deadline = time.monotonic() + 600
    try:
        while len(sources) < n_bad or len(tickets) < len(valid):
            assert proc.poll() is None, f"reward service exited {proc.returncode}:\n" \
                                        f"{(tmp_path / 'reward.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{len(sources)} dead letters, {len(tickets)} scored groups"
            for d in dead.poll(timeout_ms=500):
                for part, off, reason, payload in zip(d.columns["source_partition"], d.columns["source_offset"],
                                                      d.columns["reason"], d.columns["payload"]):
                    assert reason and ": " in reason and isinstance(payload, bytes)
                    sources.add((int(part), int(off)))
                    code = reason.split(": ")[1] if reason.startswith("invalid_group") else reason.split(":")[0]
                    reasons[code] = reasons.get(code, 0) + 1
            for d in scored.poll(timeout_ms=100):
                tickets += sorted(set(d.columns["ticket_id"]))
    finally:
        proc.terminate()
        proc.wait(60)
        dead.close()
        scored.close()
    print("dead letters by reason:", dict(sorted(reasons.items())))
    assert len(sources) == n_bad  # one dead letter per malformed message (none twice, none missed)
    assert sorted(tickets) == sorted(valid)  # every valid group scored exactly once
    assert len(reasons) >= 15
