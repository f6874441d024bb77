"""Turn verified trajectories into scored ones: rewards and group pass rates.

Pure and vectorised over the rows of a batch (numpy, no per-row Python on the arithmetic). Which
groups are residual follows from the pass rate (`pipeline.verify.residual`).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from pipeline.verify.verifier import Verdict
from schemas import Columns, TRAJECTORY

TRUNCATED = "truncated"
"""Status of a completion cut at the length limit under ``rollout.overlong = "zero_reward"``."""


def group_pass_rates(group_ids: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """Per row: the mean reward of the row's group (rows of a group need not be adjacent)."""
    _, inverse = np.unique(group_ids, return_inverse=True)
    sums = np.bincount(inverse, weights=rewards)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def score(trajectories: Columns, verdicts: Sequence[Verdict], now: float | None = None,
          overlong: str = "keep") -> Columns:
    """ScoredTrajectory columns: the trajectory columns plus the verdicts and group pass rates.

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
    out["scored_at"] = np.full(n, time.time() if now is None else now, dtype=np.float64)
    return out
