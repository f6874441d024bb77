"""decoupled_ppo_loss against hand-computed losses, gradients and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import PolicyLossInputs, decoupled_ppo_loss

L2, L3, LH = math.log(2.0), math.log(3.0), math.log(0.5)


def _inputs(logprobs, proximal, behavior, advantages, mask) -> PolicyLossInputs:
    f = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return PolicyLossInputs(
        logprobs=f(logprobs).requires_grad_(True),
        proximal_logprobs=f(proximal),
        behavior_logprobs=f(behavior),
        advantages=f(advantages),
        mask=f(mask),
    )


def _grad(inp: PolicyLossInputs, loss: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, inp.logprobs)
    return g


def test_on_policy_loss_is_minus_mean_advantage_and_grad():
    lp = [[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]]
    inp = _inputs(lp, lp, lp, [2.0, -1.0], [[1, 1, 1], [1, 1, 0]])
    loss, _ = decoupled_ppo_loss(inp, aggregation="token_mean")
    # ratio = w = 1, per-token loss = -A: -(2 * 3 + (-1) * 2) / 5 tokens = -4 / 5
    torch.testing.assert_close(loss, torch.tensor(-0.8, dtype=torch.float64), atol=1e-6, rtol=0)
    # d(-rho A)/d logprob = -rho A = -A, over 5 tokens; the padded token gets nothing
    expected = torch.tensor([[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(_grad(inp, loss), expected, atol=1e-6, rtol=0)


def test_clipping_asymmetric_eps():
    # proximal = behavior = 0 (w = 1); ratios per row: [1.5, 0.5]; eps_low .1, eps_high .3
    r = [[math.log(1.5), math.log(0.5)], [math.log(1.5), math.log(0.5)]]
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    inp = _inputs(r, zeros, zeros, [1.0, -1.0], [[1, 1], [1, 1]])
    loss, m = decoupled_ppo_loss(inp, eps_low=0.1, eps_high=0.3)
    # A=+1, rho 1.5: min(1.5, 1.3) = 1.3 -> -1.3 (clipped at 1 + eps_high, no grad)
    # A=+1, rho 0.5: min(0.5, 0.9) = 0.5 -> -0.5 (unclipped, grad -rho A = -0.5)
    # A=-1, rho 1.5: min(-1.5, -1.3) = -1.5 -> 1.5 (unclipped, grad -rho A = 1.5)
    # A=-1, rho 0.5: min(-0.5, -0.9) = -0.9 -> 0.9 (clipped at 1 - eps_low, no grad)
    # token mean = (-1.3 - 0.5 + 1.5 + 0.9) / 4 = 0.6 / 4 = 0.15
    torch.testing.assert_close(loss, torch.tensor(0.15, dtype=torch.float64), atol=1e-6, rtol=0)
    expected = torch.tensor([[0.0, -0.5 / 4], [1.5 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(_grad(inp, loss), expected, atol=1e-6, rtol=0)
    # the two clipped tokens of four; ratio mean = (1.5 + .5 + 1.5 + .5) / 4 = 1
    assert m["clip_frac"] == pytest.approx(0.5, abs=1e-6)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_default_clip_is_symmetric_point_two():
    # rho = 1.5, A = 2: min(3.0, 1.2 * 2) = 2.4 -> loss -2.4
    inp = _inputs([[math.log(1.5)]], [[0.0]], [[0.0]], [2.0], [[1]])
    loss, _ = decoupled_ppo_loss(inp)
    torch.testing.assert_close(loss, torch.tensor(-2.4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_truncated_importance_weight():
    # behaviour logprobs lag the proximal ones: log w = [log 3, log .5], cap 2 -> w = [2, .5]
    # logprobs = proximal (rho = 1), A = 1: per-token = [-2, -.5], token mean = -1.25
    prox = [[-1.0, -2.0]]
    inp = _inputs(prox, prox, [[-1.0 - L3, -2.0 - LH]], [1.0], [[1, 1]])
    loss, m = decoupled_ppo_loss(inp, tis_cap=2.0)
    torch.testing.assert_close(loss, torch.tensor(-1.25, dtype=torch.float64), atol=1e-6, rtol=0)
    # grad = -w A / 2 tokens = [-1, -.25]
    expected = torch.tensor([[-1.0, -0.25]], dtype=torch.float64)
    torch.testing.assert_close(_grad(inp, loss), expected, atol=1e-6, rtol=0)
    assert m["is_truncated_frac"] == pytest.approx(0.5, abs=1e-6)  # 1 of 2 tokens over the cap
    assert m["is_weight_mean"] == pytest.approx(1.25, abs=1e-6)  # (2 + .5) / 2, after truncation
    assert m["is_weight_max"] == pytest.approx(3.0, abs=1e-6)  # before truncation


def test_no_gradient_to_proximal_or_behavior():
    inp = _inputs([[-1.0]], [[-1.2]], [[-1.5]], [1.0], [[1]])
    inp.proximal_logprobs.requires_grad_(True)
    inp.behavior_logprobs.requires_grad_(True)
    loss, _ = decoupled_ppo_loss(inp)
    g_prox, g_beh = torch.autograd.grad(
        loss, [inp.proximal_logprobs, inp.behavior_logprobs], allow_unused=True
    )
    assert g_prox is None and g_beh is None


def test_masked_tokens_do_not_count():
    # Row 0 has 2 real tokens; the padded third one holds garbage that would dominate if counted.
    padded = _inputs(
        [[math.log(1.1), -1.0, 3.0]], [[0.0, -1.0, -4.0]], [[0.0, -1.0 - L2, -9.0]], [1.0], [[1, 1, 0]]
    )
    short = _inputs([[math.log(1.1), -1.0]], [[0.0, -1.0]], [[0.0, -1.0 - L2]], [1.0], [[1, 1]])
    loss_p, m_p = decoupled_ppo_loss(padded)
    loss_s, m_s = decoupled_ppo_loss(short)
    # real tokens: rho 1.1 w 1 -> -1.1; rho 1 w 2 -> -2; mean = -1.55
    torch.testing.assert_close(loss_p, torch.tensor(-1.55, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_p, loss_s, atol=1e-12, rtol=0)
    assert _grad(padded, loss_p)[0, 2].item() == 0.0
    assert m_p == pytest.approx(m_s, abs=1e-12)


def test_token_mean_vs_seq_mean():
    # row 0: 3 tokens, A = 1, w = [1, 2, .5] -> per-token [-1, -2, -.5]
    # row 1: 1 token, A = 4, w = 1 -> [-4];  row 2: no completion tokens at all
    lp = [[-1.0, -1.0, -1.0], [-0.5, 0.0, 0.0], [-0.1, -0.1, -0.1]]
    beh = [[-1.0, -1.0 - L2, -1.0 - LH], [-0.5, 0.0, 0.0], [-0.1, -0.1, -0.1]]
    mask = [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    inp = _inputs(lp, lp, beh, [1.0, 4.0, 7.0], mask)
    token, _ = decoupled_ppo_loss(inp, aggregation="token_mean")
    seq, _ = decoupled_ppo_loss(inp, aggregation="seq_mean")
    # token mean: (-1 - 2 - .5 - 4) / 4 = -7.5 / 4 = -1.875
    torch.testing.assert_close(token, torch.tensor(-1.875, dtype=torch.float64), atol=1e-6, rtol=0)
    # seq mean over the 2 non-empty rows: (-3.5 / 3 + -4 / 1) / 2 = -31 / 12
    torch.testing.assert_close(seq, torch.tensor(-31 / 12, dtype=torch.float64), atol=1e-6, rtol=0)
    # seq-mean grad: -w A / (len * n_rows): row 0 -> [-1, -2, -.5] / 6, row 1 -> -4 / 2
    expected = torch.tensor(
        [[-1 / 6, -2 / 6, -0.5 / 6], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(_grad(inp, seq), expected, atol=1e-6, rtol=0)


def test_unknown_aggregation_raises():
    inp = _inputs([[0.0]], [[0.0]], [[0.0]], [1.0], [[1]])
    with pytest.raises(ValueError, match="seq_sum"):
        decoupled_ppo_loss(inp, aggregation="seq_sum")  # type: ignore[arg-type]


def test_metrics_keys_and_values():
    # two tokens, A = 1, eps .2, cap 2:
    #   t0: prox - beh = log 3 -> w_raw 3, w 2; lp - prox = log 1.5 -> rho 1.5, clipped to 1.2
    #   t1: prox - beh = 0 -> w 1; rho 1 (not clipped); t2 is padding
    prox = [[-1.0, -2.0, 0.0]]
    lp = [[-1.0 + math.log(1.5), -2.0, 5.0]]
    beh = [[-1.0 - L3, -2.0, -20.0]]
    loss, m = decoupled_ppo_loss(_inputs(lp, prox, beh, [1.0], [[1, 1, 0]]))
    assert set(m) == {
        "clip_frac", "is_weight_mean", "is_weight_max", "is_truncated_frac", "ratio_mean",
        "approx_kl_behavior",
    }
    assert all(type(v) is float for v in m.values())
    # loss = -(2 * 1.2 + 1 * 1) / 2 = -1.7
    torch.testing.assert_close(loss, torch.tensor(-1.7, dtype=torch.float64), atol=1e-6, rtol=0)
    assert m["clip_frac"] == pytest.approx(0.5, abs=1e-6)
    assert m["is_weight_mean"] == pytest.approx(1.5, abs=1e-6)  # (2 + 1) / 2
    assert m["is_weight_max"] == pytest.approx(3.0, abs=1e-6)
    assert m["is_truncated_frac"] == pytest.approx(0.5, abs=1e-6)
    assert m["ratio_mean"] == pytest.approx(1.25, abs=1e-6)  # (1.5 + 1) / 2
    # mean(log mu - log pi) = ((-1 - log 3) - (-1 + log 1.5) + 0) / 2 = -(log 3 + log 1.5) / 2
    assert m["approx_kl_behavior"] == pytest.approx(-(L3 + math.log(1.5)) / 2, abs=1e-6)
