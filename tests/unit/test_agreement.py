"""The behaviour/learner log-prob agreement measures against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.rollout.agreement import logprob_agreement


def test_logprob_agreement_by_hand():
    # mu = [-1, -2, -0.5], pi = [-1.1, -2, -0.3]: differences mu - pi = [0.1, 0, -0.2].
    got = logprob_agreement(np.array([-1.0, -2.0, -0.5]), np.array([-1.1, -2.0, -0.3]))
    assert got["tokens"] == 3
    assert got["mean_abs"] == pytest.approx(0.1, abs=1e-12)  # (0.1 + 0 + 0.2) / 3
    assert got["max_abs"] == pytest.approx(0.2, abs=1e-12)
    assert got["kl_k1"] == pytest.approx(-0.1 / 3, abs=1e-12)  # (0.1 + 0 - 0.2) / 3
    # log r = pi - mu = [-0.1, 0, 0.2]: r - 1 - log r = [e^-0.1 - 0.9, 0, e^0.2 - 1.2]
    assert got["kl_k3"] == pytest.approx((np.exp(-0.1) - 0.9 + np.exp(0.2) - 1.2) / 3, abs=1e-12)
    assert logprob_agreement(np.zeros(4), np.zeros(4))["kl_k3"] == 0.0
    with pytest.raises(ValueError, match="no tokens"):
        logprob_agreement(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="non-finite"):
        logprob_agreement(np.array([-np.inf]), np.array([0.0]))
