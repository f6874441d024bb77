"""Valid wire rows for tests: a trajectory group and its scored form, built to pass every check of
`pipeline.flow.validate`, so a test can break exactly one thing."""

from __future__ import annotations

import uuid

import numpy as np

from schemas import Columns, Ragged


def _s(values) -> np.ndarray:
    return np.array(list(values), dtype=object)


def trajectory_group(ticket_id: str = "e0-000000", prompt_id: str = "p0", size: int = 4, version: int = 0,
                     completions: list[list[int]] | None = None, answer: str = "3",
                     texts: list[str] | None = None, temperature: float = 1.0, attempt: int = 0) -> Columns:
    """One group of `size` samples of a valid Trajectory message."""
    completions = completions if completions is not None else [[7, 2]] * size
    texts = texts if texts is not None else ["3"] * size
    gid = uuid.uuid4().hex
    return {
        "traj_id": _s(uuid.uuid4().hex for _ in range(size)),
        "group_id": _s([gid] * size),
        "ticket_id": _s([ticket_id] * size),
        "attempt": np.full(size, attempt, dtype=np.int32),
        "prompt_id": _s([prompt_id] * size),
        "sample_idx": np.arange(size, dtype=np.int32),
        "group_size": np.full(size, size, dtype=np.int32),
        "policy_version": np.full(size, version, dtype=np.int64),
        "temperature": np.full(size, temperature, dtype=np.float32),
        "prompt_text": _s(["1+2="] * size),
        "prompt_token_ids": Ragged.from_list([[1, 5, 14, 6]] * size, np.int32),
        "completion_token_ids": Ragged.from_list(completions, np.int32),
        "behavior_logprobs": Ragged.from_list([[-0.5] * len(c) for c in completions], np.float32),
        "completion_text": _s(texts),
        "finish_reason": _s(["stop"] * size),
        "answer": _s([answer] * size),
        "created_at": np.full(size, 1.7e9, dtype=np.float64),
    }


def scored_group(rewards: list[float], **kwargs) -> Columns:
    """A valid ScoredTrajectory group with these rewards (one per sample)."""
    cols = trajectory_group(size=len(rewards), **kwargs)
    r = np.asarray(rewards, dtype=np.float32)
    n = len(r)
    cols.update(reward=r, verify_status=_s("correct" if x else "wrong" for x in r),
                group_pass_rate=np.full(n, r.mean(), dtype=np.float32), scored_at=np.full(n, 1.7e9, dtype=np.float64))
    return cols


def ticket(ticket_id: str = "e0-000000", prompt_id: str = "p0", text: str = "1+2=", answer: str = "3",
           attempt: int = 0, epoch: int = 0, version: int = 0) -> Columns:
    """One valid PromptTicket message."""
    return {"ticket_id": _s([ticket_id]), "attempt": np.array([attempt], dtype=np.int32),
            "prompt_id": _s([prompt_id]), "text": _s([text]), "answer": _s([answer]),
            "epoch": np.array([epoch], dtype=np.int32), "issued_version": np.array([version], dtype=np.int64),
            "issued_at": np.array([1.7e9])}


def temperature_update(prompt_id: str = "p0", temperature: float = 1.1, reason: str = "all_correct_raise") -> Columns:
    """One valid TemperatureUpdate message."""
    return {"prompt_id": _s([prompt_id]), "temperature": np.array([temperature], dtype=np.float32),
            "reason": _s([reason]), "times_seen": np.array([1], dtype=np.int32),
            "mean_pass_rate": np.array([1.0], dtype=np.float32), "all_correct_streak": np.array([1], dtype=np.int32),
            "decided_at_version": np.array([0], dtype=np.int64), "decided_at": np.array([1.7e9])}


def policy_update(version: int = 1, uri: str = "/run/policies/v000001", sha256: str = "0" * 64) -> Columns:
    """One valid-looking PolicyUpdate message (its folder is checked when it is loaded)."""
    return {"version": np.array([version], dtype=np.int64), "step": np.array([version], dtype=np.int64),
            "uri": _s([uri]), "sha256": _s([sha256]), "dtype": _s(["float32"]),
            "created_at": np.array([1.7e9])}
