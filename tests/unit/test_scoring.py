"""Scoring: group pass rates and the ScoredTrajectory columns built by score()."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.verify.scoring import group_pass_rates, score
from pipeline.verify.verifier import Verdict, VerifyStatus
from schemas import SCORED_TRAJECTORY, TRAJECTORY, Columns, Ragged, decode, encode, headers_for


def _s(*values: str) -> np.ndarray:
    return np.array(values, dtype=object)


def _trajectories() -> Columns:
    """Five rows, groups interleaved: g0 = rows 0, 2, 4; g1 = rows 1, 3."""
    n = 5
    return {
        "traj_id": _s(*(f"t{i}" for i in range(n))),
        "group_id": _s("g0", "g1", "g0", "g1", "g0"),
        "ticket_id": _s("k0", "k1", "k0", "k1", "k0"),
        "attempt": np.zeros(n, dtype=np.int32),
        "prompt_id": _s("p0", "p1", "p0", "p1", "p0"),
        "sample_idx": np.array([0, 0, 1, 1, 2], dtype=np.int32),
        "group_size": np.array([3, 2, 3, 2, 3], dtype=np.int32),
        "policy_version": np.array([4, 4, 4, 4, 4], dtype=np.int64),
        "temperature": np.array([1.0, 0.7, 1.0, 0.7, 1.0], dtype=np.float32),
        "prompt_text": _s("1+2=", "3-1=", "1+2=", "3-1=", "1+2="),
        "prompt_token_ids": Ragged.from_list([[1, 5, 14, 6, 17]] * 5, np.int32),
        "completion_token_ids": Ragged.from_list([[7, 2], [6, 2], [8, 2], [], [7, 8, 9]], np.int32),
        "behavior_logprobs": Ragged.from_list(
            [[-0.5, -0.1], [-0.2, -0.3], [-1.5, -0.1], [], [-0.5, -2.0, -3.0]], np.float32
        ),
        "completion_text": _s("3", "2", "4", "", "345"),
        "finish_reason": _s("stop", "stop", "stop", "length", "length"),
        "answer": _s("3", "2", "3", "2", "3"),
        "created_at": np.full(n, 1.7e9, dtype=np.float64),
    }


def _verdicts() -> list[Verdict]:
    # g0 (rows 0, 2, 4): correct, wrong, error -> pass rate 1/3;  g1 (rows 1, 3): correct, correct
    return [
        Verdict(VerifyStatus.CORRECT, 1.0, "ok"),
        Verdict(VerifyStatus.CORRECT, 1.0, "ok"),
        Verdict(VerifyStatus.WRONG, 0.0, "gold=3 pred=4"),
        Verdict(VerifyStatus.CORRECT, 1.0, "ok"),
        Verdict(VerifyStatus.ERROR, 0.0, "compare: RecursionError"),
    ]


def test_group_pass_rates_interleaved():
    # g0 = rows 0, 2, 4 -> (1 + 0 + 0) / 3; g1 = rows 1, 3 -> (.5 + 1) / 2 = .75; g2 = row 5 alone
    ids = _s("g0", "g1", "g0", "g1", "g0", "g2")
    rates = group_pass_rates(ids, np.array([1.0, 0.5, 0.0, 1.0, 0.0, 0.0]))
    np.testing.assert_allclose(rates, [1 / 3, 0.75, 1 / 3, 0.75, 1 / 3, 0.0], atol=1e-12, rtol=0)


def test_score_values():
    out = score(_trajectories(), _verdicts(), now=123.5)
    np.testing.assert_array_equal(out["reward"], np.array([1, 1, 0, 1, 0], dtype=np.float32))
    np.testing.assert_allclose(out["group_pass_rate"], [1 / 3, 1, 1 / 3, 1, 1 / 3], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(out["scored_at"], np.full(5, 123.5))
    assert out["verify_status"].tolist() == ["correct", "correct", "wrong", "correct", "error"]


def test_score_error_status_is_zero_reward_not_wrong():
    out = score(_trajectories(), _verdicts(), now=0.0)
    assert out["reward"][4] == 0.0
    assert out["verify_status"][4] == "error"


def test_score_columns_match_schema_and_encode():
    traj = _trajectories()
    out = score(traj, _verdicts(), now=1.0)
    assert list(out) == SCORED_TRAJECTORY.schema.names
    payload = encode(SCORED_TRAJECTORY, out)
    _, back = decode(SCORED_TRAJECTORY, payload, headers_for(SCORED_TRAJECTORY))
    assert back["verify_status"].tolist() == ["correct", "correct", "wrong", "correct", "error"]
    assert back["behavior_logprobs"].equals(traj["behavior_logprobs"])
    for name in TRAJECTORY.schema.names:  # trajectory columns pass through unchanged
        if not isinstance(traj[name], Ragged):
            np.testing.assert_array_equal(back[name], traj[name])


def test_score_all_wrong_group():
    verdicts = [Verdict(VerifyStatus.NO_ANSWER, 0.0, "")] * 2 + [Verdict(VerifyStatus.TIMEOUT, 0.0, "")] * 3
    out = score(_trajectories(), verdicts, now=0.0)
    np.testing.assert_array_equal(out["group_pass_rate"], np.zeros(5, dtype=np.float32))


def test_score_verdict_count_mismatch_raises():
    with pytest.raises(ValueError, match="4 verdicts for 5 trajectories"):
        score(_trajectories(), _verdicts()[:4])


def test_overlong_zero_reward_zeroes_cut_completions_and_their_group_statistics():
    # rows 3 (g1, correct) and 4 (g0, error) end with finish_reason "length"
    out = score(_trajectories(), _verdicts(), now=0.0, overlong="zero_reward")
    np.testing.assert_array_equal(out["reward"], np.array([1, 1, 0, 0, 0], dtype=np.float32))
    assert out["verify_status"].tolist() == ["correct", "correct", "wrong", "truncated", "truncated"]
    # g1 was all-correct (1, 1); with row 3 zeroed it is (1, 0): pass rate 0.5, informative
    np.testing.assert_allclose(out["group_pass_rate"], [1 / 3, 0.5, 1 / 3, 0.5, 1 / 3], atol=1e-6, rtol=0)
    for treatment in ("keep", "mask"):  # the learner masks; scoring leaves both as they are
        assert score(_trajectories(), _verdicts(), now=0.0, overlong=treatment)["reward"].tolist() == [1, 1, 0, 1, 0]
