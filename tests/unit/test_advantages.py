"""Group-relative advantage estimators: hand-computed values, the registry, and a loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.erpo.rule import ErpoRule
from pipeline.rl.advantages import (
    ADVANTAGES,
    dr_grpo_advantages,
    get_advantage,
    grpo_advantages,
    ra_advantages,
    register_advantage,
    rloo_advantages,
)


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def _g(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def test_grpo_one_group_hand_computed():
    # mean = 3/4 = .75; unbiased var = (3 * .25^2 + .75^2) / 3 = (.1875 + .5625) / 3 = .25 -> std .5
    # A = (r - .75) / (.5 + eps): [.25, -.75, .25, .25] / .5 = [.5, -1.5, .5, .5]
    eps = 1e-6
    a = grpo_advantages(_t(1, 0, 1, 1), _g(0, 0, 0, 0), eps=eps)
    expected = _t(0.25, -0.75, 0.25, 0.25) / (0.5 + eps)
    torch.testing.assert_close(a, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(a, _t(0.5, -1.5, 0.5, 0.5), atol=1e-5, rtol=0)


def test_grpo_interleaved_groups():
    # group 0 = rows 0, 2, 4 with rewards [1, 0, 0]: mean 1/3, var = (4/9 + 1/9 + 1/9) / 2 = 1/3
    # group 1 = rows 1, 3 with rewards [2, 4]: mean 3, var = (1 + 1) / 1 = 2
    # A0 = [2/3, -1/3, -1/3] / sqrt(1/3);  A1 = [-1, 1] / sqrt(2)
    a = grpo_advantages(_t(1, 2, 0, 4, 0), _g(0, 1, 0, 1, 0), eps=0.0)
    s0, s1 = math.sqrt(1 / 3), math.sqrt(2)
    expected = _t(2 / 3 / s0, -1 / s1, -1 / 3 / s0, 1 / s1, -1 / 3 / s0)
    torch.testing.assert_close(a, expected, atol=1e-12, rtol=0)


def test_grpo_all_equal_group_is_zero():
    a = grpo_advantages(_t(1, 1, 1, 0, 1), _g(0, 0, 0, 1, 1))
    assert torch.equal(a[:3], torch.zeros(3, dtype=torch.float64))
    assert a[3] < 0 < a[4]


def test_grpo_singleton_group_is_zero():
    # a singleton has r = mean and std defined as 0, so A = 0 / eps = 0 (not NaN)
    a = grpo_advantages(_t(1.0, 0.0, 1.0), _g(0, 1, 1))
    assert a[0].item() == 0.0
    assert not torch.isnan(a).any()


def test_grpo_keeps_dtype_float32():
    a = grpo_advantages(torch.tensor([1.0, 0.0]), _g(0, 0))
    assert a.dtype == torch.float32
    # mean .5, std sqrt(.5) -> A = +-.5 / sqrt(.5) = +-sqrt(.5)
    torch.testing.assert_close(a, torch.tensor([0.5**0.5, -(0.5**0.5)]), atol=1e-5, rtol=0)


def test_dr_grpo_is_centred_not_scaled():
    # group 0 = rows 0, 2 -> [3, 1], mean 2 -> [1, -1]; group 1 = rows 1, 3 -> [0, 1], mean .5
    a = dr_grpo_advantages(_t(3, 0, 1, 1), _g(0, 1, 0, 1))
    torch.testing.assert_close(a, _t(1.0, -0.5, -1.0, 0.5), atol=1e-12, rtol=0)


def test_rloo_hand_computed():
    # one group [1, 0, 1, 1], n = 4, mean .75: n/(n-1) (r - mean) = 4/3 * [.25, -.75, .25, .25]
    # = [1/3, -1, 1/3, 1/3]; check against the definition: r_0 - mean(0, 1, 1) = 1 - 2/3 = 1/3
    a = rloo_advantages(_t(1, 0, 1, 1), _g(0, 0, 0, 0))
    torch.testing.assert_close(a, _t(1 / 3, -1.0, 1 / 3, 1 / 3), atol=1e-12, rtol=0)


def test_rloo_singleton_and_interleaved():
    # row 1 is alone in group 1 -> 0; group 0 = rows 0, 2 -> [2, 5]: 2 - 5 = -3, 5 - 2 = 3
    a = rloo_advantages(_t(2, 7, 5), _g(0, 1, 0))
    torch.testing.assert_close(a, _t(-3.0, 0.0, 3.0), atol=1e-12, rtol=0)


def test_registry_has_the_three_estimators():
    assert get_advantage("grpo") is grpo_advantages
    assert get_advantage("dr_grpo") is dr_grpo_advantages
    assert get_advantage("rloo") is rloo_advantages


def test_get_advantage_unknown_lists_known():
    with pytest.raises(KeyError) as exc:
        get_advantage("gae")
    msg = str(exc.value)
    assert "'gae'" in msg
    for name in ("dr_grpo", "grpo", "rloo"):
        assert repr(name) in msg


def test_double_registration_raises():
    with pytest.raises(ValueError, match="registered twice"):
        register_advantage("grpo")(lambda rewards, group: rewards)
    assert ADVANTAGES["grpo"] is grpo_advantages


def _grpo_loop(rewards: list[float], group: list[int], eps: float) -> list[float]:
    out = []
    for r, g in zip(rewards, group):
        members = [x for x, h in zip(rewards, group) if h == g]
        n = len(members)
        mean = sum(members) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1)) if n > 1 else 0.0
        out.append((r - mean) / (std + eps))
    return out


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(-10, 10, allow_nan=False, width=32), st.integers(0, 4)),
        min_size=1,
        max_size=24,
    )
)
def test_grpo_vectorised_equals_loop(data):
    rewards = [r for r, _ in data]
    group = [g for _, g in data]  # ids need not be dense: some of 0..4 may be unused
    a = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(group), eps=1e-6)
    torch.testing.assert_close(a, _t(*_grpo_loop(rewards, group, 1e-6)), atol=1e-6, rtol=0)


def test_ra_advantages_exactly_minus_delta_for_all_correct():
    p = np.array([1.0, 1.0, 0.5, 0.5, 0.0], dtype=np.float32)
    adv = np.array([0.0, 0.0, 0.7071, -0.7071, 0.0], dtype=np.float32)
    out = ra_advantages(p, adv, ErpoRule(ra_delta=0.25))
    # all-correct samples: -0.25; the rest untouched (bitwise), input not modified
    np.testing.assert_array_equal(out, np.array([-0.25, -0.25, 0.7071, -0.7071, 0.0], dtype=np.float32))
    assert out.dtype == np.float32 and adv[0] == 0.0
    np.testing.assert_array_equal(ra_advantages(p, adv, ErpoRule(enabled=False)), adv)
    with pytest.raises(ValueError, match="shape"):
        ra_advantages(p[:2], adv, ErpoRule())
