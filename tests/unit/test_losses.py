"""decoupled_ppo_loss against hand-computed losses, gradients and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.rl.losses import (
    PolicyLossInputs,
    decoupled_ppo_loss,
    k3_kl,
    kl_term,
    phi_clamp,
    rapo_exact_kl,
    rapo_kl,
    reference_token_logprobs,
    reweighted_reference,
)

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
        "clip_frac", "is_weight_mean", "is_weight_max", "is_truncated_frac", "is_masked_frac", "ratio_mean",
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


# ---------------------------------------------------------------------------------------------
# MIS masking


def test_mis_masks_tokens_outside_the_weight_range():
    # w_raw = exp(prox - behav) = [3, 1, 1/4]; with [0.5, 2] only the middle token is kept.
    prox = [[L3, 0.0, -math.log(4.0)]]
    inp = _inputs(prox, prox, [[0.0, 0.0, 0.0]], [1.0], [[1, 1, 1]])
    loss, m = decoupled_ppo_loss(inp, tis_cap=10.0, mis_low=0.5, mis_high=2.0)
    # ratio = 1, A = 1: per-token -w * keep = [0, -1, 0]; token mean over 3 tokens = -1/3
    torch.testing.assert_close(loss, torch.tensor(-1.0 / 3.0, dtype=torch.float64), atol=1e-9, rtol=0)
    assert m["is_masked_frac"] == pytest.approx(2.0 / 3.0)
    torch.testing.assert_close(_grad(inp, loss), torch.tensor([[0.0, -1.0 / 3.0, 0.0]], dtype=torch.float64))
    _, m = decoupled_ppo_loss(inp, tis_cap=10.0)
    assert m["is_masked_frac"] == 0.0


# ---------------------------------------------------------------------------------------------
# KL terms: k3 and RAPO


def test_k3_values_and_gradient():
    # x = log pi_ref - log pi_theta = [ln 2, -ln 2]:
    # K = e^x - x - 1 = [2 - 0.6931472 - 1, 0.5 + 0.6931472 - 1] = [0.3068528, 0.1931472]
    inp = _inputs([[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]], [0.0], [[1, 1]])
    ref = torch.tensor([[L2, LH]], dtype=torch.float64)
    loss, m = kl_term(k3_kl(inp.logprobs, ref), inp.mask)
    torch.testing.assert_close(loss, torch.tensor((0.3068528194 + 0.1931471806) / 2, dtype=torch.float64))
    # dK/dlog pi_theta = 1 - e^x = [-1, 0.5], over 2 tokens
    torch.testing.assert_close(_grad(inp, loss), torch.tensor([[-0.5, 0.25]], dtype=torch.float64))
    assert m["kl"] == pytest.approx(0.25)


def test_rapo_penalty_zero_at_the_reweighted_reference_positive_elsewhere():
    lp = torch.tensor([[-1.2, -0.3, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(rapo_kl(lp, lp), torch.zeros_like(lp))
    # log w = [ln 2, -ln 2, 0]: K = w ln w - w + 1 = [2 ln 2 - 1, 1 - 0.5 - 0.5 ln 2, 0]
    per_token = rapo_kl(lp, lp + torch.tensor([[L2, LH, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(per_token, torch.tensor([[0.3862943611, 0.1534264097, 0.0]], dtype=torch.float64))


def test_rapo_gradient_sign_per_token():
    inp = _inputs([[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]], [0.0], [[1, 1]])
    hat = torch.tensor([[L2, LH]], dtype=torch.float64)
    loss, _ = kl_term(rapo_kl(inp.logprobs, hat), inp.mask)
    torch.testing.assert_close(loss, torch.tensor((0.3862943611 + 0.1534264097) / 2, dtype=torch.float64))
    # gradient (1 - w) per token = [-1, 0.5], over 2 tokens: w > 1 is pushed up, w < 1 down
    torch.testing.assert_close(_grad(inp, loss), torch.tensor([[-0.5, 0.25]], dtype=torch.float64))


def test_rapo_sampled_weight_is_truncated_in_value_and_gradient():
    # log w = [6, ln 3]: w = [e^6 ~ 403, 3]; truncated at 5: value 5 ln 5 - 4 = 4.0471896, gradient 1 - 5 = -4
    lp = torch.tensor([-7.0, -2.0], dtype=torch.float64, requires_grad=True)
    k = rapo_kl(lp, torch.tensor([-1.0, -2.0 + math.log(3.0)], dtype=torch.float64), max_weight=5.0)
    torch.testing.assert_close(k.detach(), torch.tensor([4.0471895622, 3 * math.log(3) - 2], dtype=torch.float64))
    (g,) = torch.autograd.grad(k.sum(), lp)
    torch.testing.assert_close(g, torch.tensor([-4.0, -2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="max_weight"):
        rapo_kl(lp, lp, max_weight=1.0)


def test_rapo_sampled_gradient_in_expectation_is_the_exact_forward_kl_gradient():
    # Summed over the vocabulary with each token's sampling probability pi_theta(y) as weight (the
    # expectation over y ~ pi_theta), the sampled penalty's gradient on the logits equals the exact
    # forward KL's: pi_theta - pi_hat. (The old gradient, -w log w, did not.)
    hat = torch.tensor([0.2411809, 0.3410813, 0.4177378], dtype=torch.float64).log()
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(theta, 0)
    (sampled,) = torch.autograd.grad((logp.exp().detach() * rapo_kl(logp, hat, max_weight=1000.0)).sum(), theta)
    (exact,) = torch.autograd.grad(rapo_exact_kl(torch.log_softmax(theta, 0).unsqueeze(0), hat.unsqueeze(0)).sum(), theta)
    torch.testing.assert_close(sampled, exact)
    torch.testing.assert_close(exact, torch.softmax(theta.detach(), 0) - hat.exp())


def test_reweighted_reference_on_three_tokens():
    # z = log [1, 2, 3]. Row 0: tau = 1, phi = 0.5: pi_hat ∝ pi_ref^0.5 = [1, √2, √3] / 4.1462644
    # = [0.2411809, 0.3410813, 0.4177378]. Row 1: tau = 2, phi = 1: softmax(z / 2), the same.
    z = torch.log(torch.tensor([1.0, 2.0, 3.0])).expand(2, 3, 3).clone()
    targets = torch.tensor([[0, 1, 2], [2, 1, 0]])
    lp, hat = reference_token_logprobs(z, targets, torch.tensor([[1.0], [2.0]]), torch.tensor([[0.5], [1.0]]), chunk=2)
    want_hat = torch.tensor([[0.2411809, 0.3410813, 0.4177378], [0.4177378, 0.3410813, 0.2411809]]).log()
    torch.testing.assert_close(hat, want_hat, atol=1e-6, rtol=0)
    want_lp = torch.stack([torch.tensor([1 / 6, 2 / 6, 3 / 6]).log(), want_hat[1]])
    torch.testing.assert_close(lp, want_lp, atol=1e-6, rtol=0)
    lp_only, none = reference_token_logprobs(z, targets, torch.tensor([[1.0], [2.0]]))
    assert none is None
    torch.testing.assert_close(lp_only, lp)
    with pytest.raises(ValueError, match="phi floor"):
        phi_clamp(torch.tensor([0.0]), 0.0)
    torch.testing.assert_close(phi_clamp(torch.tensor([0.0, 0.4, 1.0]), 0.1), torch.tensor([0.1, 0.4, 1.0]))


def test_rapo_gradient_moves_policy_toward_reweighted_reference():
    """3-token vocabulary: minimise the expected per-token penalty sum_y pi(y) K(y) (the sampled
    estimator in expectation, samples' probabilities held fixed) from a uniform policy."""
    hat = torch.tensor([0.2411809, 0.3410813, 0.4177378], dtype=torch.float64)
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)

    def forward_kl() -> float:
        p = torch.softmax(theta.detach(), 0)
        return float((hat * (hat / p).log()).sum())

    kls = [forward_kl()]
    for i in range(400):
        logp = torch.log_softmax(theta, 0)
        loss = (logp.exp().detach() * rapo_kl(logp, hat.log())).sum()
        (g,) = torch.autograd.grad(loss, theta)
        if i == 0:  # token 2 is under-weighted by the uniform policy, token 0 over-weighted
            assert g[2] < 0 < g[0]
        with torch.no_grad():
            theta -= 2.0 * g
        kls.append(forward_kl())
    assert all(b <= a + 1e-12 for a, b in zip(kls, kls[1:])) and kls[0] > 0.01
    torch.testing.assert_close(torch.softmax(theta.detach(), 0), hat, atol=1e-4, rtol=0)


HAT = torch.tensor([0.2411809549, 0.3410813774, 0.4177376677], dtype=torch.float64)  # [1, √2, √3] / 4.1462644


def test_reweighted_reference_full_vocabulary():
    z = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    # row 0: tau 1, phi 0.5 -> pi_ref^0.5 normalised; row 1: tau 2, phi 1 -> softmax(z / 2): both HAT
    got = reweighted_reference(z, torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(got.exp(), HAT.float().expand(2, 3), atol=1e-6, rtol=0)
    assert z[0, 0] == 0.0  # the caller's logits are untouched


def test_rapo_exact_value_gradient_and_zero_at_target():
    # KL(HAT || uniform) = sum HAT ln(3 HAT) = 0.0240802 (by hand: -0.0780407 + 0.0078372 + 0.0942837)
    theta = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    kl = rapo_exact_kl(torch.log_softmax(theta, -1), HAT.log().unsqueeze(0))
    torch.testing.assert_close(kl, torch.tensor([0.0240801768], dtype=torch.float64), atol=1e-9, rtol=0)
    (g,) = torch.autograd.grad(kl.sum(), theta)
    # d KL / d logits = pi_theta - pi_hat = [1/3 - HAT]
    torch.testing.assert_close(g, (1 / 3 - HAT).unsqueeze(0), atol=1e-9, rtol=0)
    at_target = rapo_exact_kl(HAT.log().unsqueeze(0), HAT.log().unsqueeze(0))
    torch.testing.assert_close(at_target, torch.zeros(1, dtype=torch.float64))


def test_rapo_exact_gradient_descent_reaches_the_reweighted_reference():
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    kls = []
    for _ in range(300):
        kl = rapo_exact_kl(torch.log_softmax(theta, 0), HAT.log())
        kls.append(float(kl.detach()))
        (g,) = torch.autograd.grad(kl, theta)
        with torch.no_grad():
            theta -= 1.0 * g
    assert all(b <= a + 1e-15 for a, b in zip(kls, kls[1:])) and kls[-1] < 1e-9, kls[::50]
    torch.testing.assert_close(torch.softmax(theta.detach(), 0), HAT, atol=1e-5, rtol=0)


def test_every_kl_setting_has_its_term():
    from typing import get_args

    from pipeline.config import NoKL, RapoKL, ReverseKL
    from pipeline.rl.losses import KL_TERMS

    kinds = [k for variant in (NoKL, ReverseKL, RapoKL) for k in get_args(variant.model_fields["kind"].annotation)]
    assert sorted(kinds) == sorted(KL_TERMS)
    assert [n for n, t in KL_TERMS.items() if t.exact] == ["rapo"]
    assert all((t.sampled is None) == (t.exact or not t.reference) for t in KL_TERMS.values())
