"""Turn verified trajectories into scored ones: rewards, group pass rates, residual kinds.

Pure and vectorised over the rows of a batch (numpy, no per-row Python on the arithmetic). A group
is *residual* when every sample got the same reward, so its group-normalised advantages are all
zero: ``all_correct`` (pass rate 1) or ``all_wrong`` (pass rate 0).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from pipeline.verify.verifier import Verdict
from schemas import Columns, TRAJECTORY

RESIDUAL_NONE, RESIDUAL_ALL_CORRECT, RESIDUAL_ALL_WRONG = "none", "all_correct", "all_wrong"
TRUNCATED = "truncated"
"""Status of a completion cut at the length limit under ``rollout.overlong = "zero_reward"``."""


def group_pass_rates(group_ids: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """Per row: the mean reward of the row's group (rows of a group need not be adjacent)."""
    _, inverse = np.unique(group_ids, return_inverse=True)
    sums = np.bincount(inverse, weights=rewards)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def residual_kinds(pass_rates: np.ndarray) -> np.ndarray:
    """``all_correct`` where the pass rate is 1, ``all_wrong`` where 0, else ``none``."""
    return np.where(pass_rates >= 1.0, RESIDUAL_ALL_CORRECT,
                    np.where(pass_rates <= 0.0, RESIDUAL_ALL_WRONG, RESIDUAL_NONE)).astype(object)


def score(trajectories: Columns, verdicts: Sequence[Verdict], now: float | None = None,
          overlong: str = "keep") -> Columns:
    """ScoredTrajectory columns: the trajectory columns plus the verdicts and group statistics.

    ``shaped_reward`` equals ``reward`` here; reward shaping (ERPO's RA) is applied downstream.
    With ``overlong="zero_reward"`` a completion cut at the length limit (finish_reason
    ``length``) gets reward 0 and the status ``truncated``, whatever its verdict; the group
    statistics use that reward.
    """
    n = len(trajectories["traj_id"])
    if len(verdicts) != n:
        raise ValueError(f"{len(verdicts)} verdicts for {n} trajectories")
    rewards = np.fromiter((v.reward for v in verdicts), dtype=np.float32, count=n)
    statuses = np.array([v.status.value for v in verdicts], dtype=object)
    if overlong == "zero_reward":
        cut = np.asarray(trajectories["finish_reason"]).astype(str) == "length"
        rewards[cut] = 0.0
        statuses[cut] = TRUNCATED
    rates = group_pass_rates(trajectories["group_id"], rewards.astype(np.float64)).astype(np.float32)
    out: Columns = {name: trajectories[name] for name in TRAJECTORY.schema.names}
    out["reward"] = rewards
    out["verify_status"] = statuses
    out["group_pass_rate"] = rates
    out["residual"] = residual_kinds(rates)
    out["shaped_reward"] = rewards.copy()
    out["scored_at"] = np.full(n, time.time() if now is None else now, dtype=np.float64)
    return out
