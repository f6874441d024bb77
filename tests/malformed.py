"""Malformed Trajectory messages for the fuzz tests: each mutation breaks one thing on purpose.

`malformed(rng)` returns (name, payload, headers): the bytes and Kafka headers of one message
that a consumer of the `trajectories` topic must reject, either at decoding (`DecodeError`) or at
the semantic checks of `pipeline.flow.validate` (every group of it rejected).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from factories import trajectory_group
from schemas import POLICY_UPDATE, TRAJECTORY, Ragged, encode, headers_for
from schemas.codec import to_record_batch

HEADERS = headers_for(TRAJECTORY)


def _valid(rng: np.random.Generator) -> dict:
    size = int(rng.integers(2, 6))
    comps = [list(rng.integers(0, 30, int(rng.integers(0, 6)))) for _ in range(size)]
    return trajectory_group(f"e0-{int(rng.integers(0, 999)):06d}", f"p{int(rng.integers(0, 50))}", size=size,
                            completions=comps, texts=[str(int(rng.integers(0, 20))) for _ in range(size)])


def _ragged_like(r: Ragged, rows: list) -> Ragged:
    return Ragged.from_list(rows, r.values.dtype)


def _semantic(rng: np.random.Generator) -> tuple[str, dict]:
    """A decodable group with one field broken."""
    g = _valid(rng)
    n = len(g["traj_id"])
    i = int(rng.integers(0, n))
    lp = [list(g["behavior_logprobs"][k]) for k in range(n)]
    comp = [list(g["completion_token_ids"][k]) for k in range(n)]
    kind = ["nan_logprob", "inf_logprob", "positive_logprob", "logprob_count", "negative_token", "empty_prompt",
            "empty_id", "bad_temperature", "bad_finish", "negative_version", "duplicate_sample", "short_group",
            "mixed_prompts"][int(rng.integers(0, 13))]
    if kind in ("nan_logprob", "inf_logprob", "positive_logprob"):
        comp[i] = comp[i] or [1]
        lp[i] = [-0.5] * len(comp[i])
        lp[i][int(rng.integers(0, len(lp[i])))] = {"nan_logprob": np.nan, "inf_logprob": -np.inf,
                                                   "positive_logprob": float(rng.uniform(0.01, 50))}[kind]
        g["completion_token_ids"] = _ragged_like(g["completion_token_ids"], comp)
        g["behavior_logprobs"] = _ragged_like(g["behavior_logprobs"], lp)
    elif kind == "logprob_count":
        lp[i] = lp[i] + [-0.1]
        g["behavior_logprobs"] = _ragged_like(g["behavior_logprobs"], lp)
    elif kind == "negative_token":
        comp[i] = comp[i] + [-int(rng.integers(1, 2**31 - 1))]
        lp[i] = lp[i] + [-0.1]
        g["completion_token_ids"] = _ragged_like(g["completion_token_ids"], comp)
        g["behavior_logprobs"] = _ragged_like(g["behavior_logprobs"], lp)
    elif kind == "empty_prompt":
        rows = [list(g["prompt_token_ids"][k]) for k in range(n)]
        rows[i] = []
        g["prompt_token_ids"] = _ragged_like(g["prompt_token_ids"], rows)
    elif kind == "empty_id":
        name = ["traj_id", "group_id", "ticket_id", "prompt_id"][int(rng.integers(0, 4))]
        g[name] = np.full(n, "", dtype=object) if name != "traj_id" else g[name]
        if name == "traj_id":
            g[name] = g[name].copy()
            g[name][i] = ""
    elif kind == "bad_temperature":
        g["temperature"] = np.full(n, [np.nan, np.inf, -1.0, 7.5][int(rng.integers(0, 4))], dtype=np.float32)
    elif kind == "bad_finish":
        g["finish_reason"] = g["finish_reason"].copy()
        g["finish_reason"][i] = ["", "eos", "STOP", "\x00"][int(rng.integers(0, 4))]
    elif kind == "negative_version":
        g["policy_version"] = np.full(n, -int(rng.integers(1, 10**9)), dtype=np.int64)
    elif kind == "duplicate_sample":
        g["sample_idx"] = g["sample_idx"].copy()
        g["sample_idx"][i] = g["sample_idx"][(i + 1) % n]
    elif kind == "short_group":
        g["group_size"] = np.full(n, n + int(rng.integers(1, 100)), dtype=np.int32)
    elif kind == "mixed_prompts":
        g["prompt_id"] = g["prompt_id"].copy()
        g["prompt_id"][i] = g["prompt_id"][i] + "x"
    return kind, g


def _null_field(rng: np.random.Generator) -> bytes:
    """A Trajectory record batch with a null in a non-nullable field (built past `encode`)."""
    g = _valid(rng)
    batch = to_record_batch(TRAJECTORY, g)
    j = int(rng.integers(0, batch.num_columns))
    col = batch.column(j)
    nulled = pa.array([None] + col.to_pylist()[1:], type=col.type)
    arrays = [nulled if k == j else batch.column(k) for k in range(batch.num_columns)]
    schema = pa.schema([f.with_nullable(True) if k == j else f for k, f in enumerate(TRAJECTORY.schema)])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return sink.getvalue().to_pybytes()


def malformed(rng: np.random.Generator) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """One malformed message: (mutation name, payload, headers)."""
    choice = int(rng.integers(0, 10))
    if choice == 0:
        return "garbage", rng.bytes(int(rng.integers(0, 300))), HEADERS
    if choice == 1:
        payload = encode(TRAJECTORY, _valid(rng))
        return "truncated", payload[: int(rng.integers(0, len(payload) - 9))], HEADERS
    if choice == 2:
        payload = encode(TRAJECTORY, _valid(rng))
        headers = [[], [("schema", b"Trajectory")], [("schema_version", b"1")],
                   [("schema", b"Trajectory"), ("schema_version", b"99")],
                   [("schema", b"Trajectory"), ("schema_version", b"\xff\xfe")],
                   [("schema", b"NoSuchKind"), ("schema_version", b"1")],
                   [("schema", b"\x00\xff"), ("schema_version", b"1")],
                   headers_for(POLICY_UPDATE)][int(rng.integers(0, 8))]
        return "bad_headers", payload, headers
    if choice == 3:
        cols = {"version": np.array([1], dtype=np.int64), "step": np.array([1], dtype=np.int64),
                "uri": np.array(["/x"], dtype=object), "sha256": np.array(["0" * 64], dtype=object),
                "dtype": np.array(["float32"], dtype=object), "created_at": np.array([0.0])}
        return "schema_mismatch", encode(POLICY_UPDATE, cols), HEADERS
    if choice == 4:
        return "null_field", _null_field(rng), HEADERS
    if choice == 5:
        return "two_batches", _two_batches(rng), HEADERS
    kind, g = _semantic(rng)
    return kind, encode(TRAJECTORY, g), HEADERS


def _two_batches(rng: np.random.Generator) -> bytes:
    batch = to_record_batch(TRAJECTORY, _valid(rng))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, TRAJECTORY.schema) as w:
        w.write_batch(batch)
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()
