"""The learner's loss, `rl_loss`, against hand-computed losses, gradients and metrics; the KL
estimators against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import LossConfig, NoKL, RapoKL, ReverseKL
from pipeline.rl.losses import (
    LossInputs,
    LossSettings,
    k3_kl,
    phi_clamp,
    rapo_exact_kl,
    rapo_kl,
    reweighted_reference,
    rl_loss,
)

L2, L3, LH = math.log(2.0), math.log(3.0), math.log(0.5)
SYMMETRIC = {"eps_low": 0.2, "eps_high": 0.2}


def _weights(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Each token's weight in one update's loss, as the learner sets it: token-mean 1 / tokens,
    sequence-mean 1 / (sequences with tokens x the row's tokens)."""
    if aggregation == "token_mean":
        return mask / mask.sum().clamp(min=1.0)
    per_row = mask.sum(-1, keepdim=True)
    return mask / (per_row.clamp(min=1.0) * (per_row > 0).sum().clamp(min=1))


def _inputs(logprobs, proximal, behavior, advantages, mask, aggregation="token_mean", kl=None, updates=1,
            **loss) -> LossInputs:
    """[B, T] inputs, one advantage per row, the loss config's defaults but a symmetric clip."""
    f = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    m = f(mask)
    settings = LossSettings(LossConfig(**(SYMMETRIC | loss)), kl or NoKL(), updates=updates,
                            tokens=float(m.sum().clamp(min=1.0)))
    return LossInputs(
        logprobs=f(logprobs).requires_grad_(True),
        proximal_logprobs=f(proximal),
        behavior_logprobs=f(behavior),
        advantages=f(advantages).unsqueeze(-1).expand_as(m),
        loss_weights=_weights(m, aggregation),
        settings=settings,
    )


def _grad(inp: LossInputs, loss: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, inp.logprobs)
    return g


def _float(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def test_on_policy_loss_is_minus_mean_advantage_and_grad():
    lp = [[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]]
    inp = _inputs(lp, lp, lp, [2.0, -1.0], [[1, 1, 1], [1, 1, 0]])
    loss = rl_loss(inp).loss
    # ratio = w = 1, per-token loss = -A: -(2 * 3 + (-1) * 2) / 5 tokens = -4 / 5
    torch.testing.assert_close(loss, torch.tensor(-0.8, dtype=torch.float64), atol=1e-6, rtol=0)
    # d(-rho A)/d logprob = -rho A = -A, over 5 tokens; the padded token gets nothing
    expected = torch.tensor([[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(_grad(inp, loss), expected, atol=1e-6, rtol=0)


def test_clipping_asymmetric_eps():
    # proximal = behavior = 0 (w = 1); ratios per row: [1.5, 0.5]; eps_low .1, eps_high .3
    r = [[math.log(1.5), math.log(0.5)], [math.log(1.5), math.log(0.5)]]
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    inp = _inputs(r, zeros, zeros, [1.0, -1.0], [[1, 1], [1, 1]], eps_low=0.1, eps_high=0.3)
    out = rl_loss(inp)
    # A=+1, rho 1.5: min(1.5, 1.3) = 1.3 -> -1.3 (clipped at 1 + eps_high, no grad)
    # A=+1, rho 0.5: min(0.5, 0.9) = 0.5 -> -0.5 (unclipped, grad -rho A = -0.5)
    # A=-1, rho 1.5: min(-1.5, -1.3) = -1.5 -> 1.5 (unclipped, grad -rho A = 1.5)
    # A=-1, rho 0.5: min(-0.5, -0.9) = -0.9 -> 0.9 (clipped at 1 - eps_low, no grad)
    # token mean = (-1.3 - 0.5 + 1.5 + 0.9) / 4 = 0.6 / 4 = 0.15
    torch.testing.assert_close(out.loss, torch.tensor(0.15, dtype=torch.float64), atol=1e-6, rtol=0)
    expected = torch.tensor([[0.0, -0.5 / 4], [1.5 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(_grad(inp, out.loss), expected, atol=1e-6, rtol=0)
    # the two clipped tokens of four; ratio mean = (1.5 + .5 + 1.5 + .5) / 4 = 1
    assert float(out.metrics["clip_frac"]) == pytest.approx(0.5, abs=1e-6)
    assert float(out.metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)


def test_default_clip_is_clip_higher():
    # learner.loss defaults: eps_low .2, eps_high .28. rho = 1.5, A = 2: min(3.0, 1.28 * 2) = 2.56
    f = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    inp = LossInputs(f(math.log(1.5)), f(0.0), f(0.0), f(2.0), f(1.0), LossSettings(LossConfig()))
    torch.testing.assert_close(rl_loss(inp).loss, torch.tensor(-2.56, dtype=torch.float64), atol=1e-6, rtol=0)


def test_truncated_importance_weight():
    # behaviour logprobs lag the proximal ones: log w = [log 3, log .5], cap 2 -> w = [2, .5]
    # logprobs = proximal (rho = 1), A = 1: per-token = [-2, -.5], token mean = -1.25
    prox = [[-1.0, -2.0]]
    inp = _inputs(prox, prox, [[-1.0 - L3, -2.0 - LH]], [1.0], [[1, 1]], tis_cap=2.0)
    out = rl_loss(inp)
    torch.testing.assert_close(out.loss, torch.tensor(-1.25, dtype=torch.float64), atol=1e-6, rtol=0)
    # grad = -w A / 2 tokens = [-1, -.25]
    expected = torch.tensor([[-1.0, -0.25]], dtype=torch.float64)
    torch.testing.assert_close(_grad(inp, out.loss), expected, atol=1e-6, rtol=0)
    assert float(out.metrics["is_truncated_frac"]) == pytest.approx(0.5, abs=1e-6)  # 1 of 2 tokens over the cap
    assert float(out.metrics["is_weight_mean"]) == pytest.approx(1.25, abs=1e-6)  # (2 + .5) / 2, after truncation
    assert float(out.maxima["is_weight_max"]) == pytest.approx(3.0, abs=1e-6)  # before truncation


def test_no_gradient_to_proximal_or_behavior():
    inp = _inputs([[-1.0]], [[-1.2]], [[-1.5]], [1.0], [[1]])
    inp.proximal_logprobs.requires_grad_(True)
    inp.behavior_logprobs.requires_grad_(True)
    loss = rl_loss(inp).loss
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
    out_p, out_s = rl_loss(padded), rl_loss(short)
    # real tokens: rho 1.1 w 1 -> -1.1; rho 1 w 2 -> -2; mean = -1.55
    torch.testing.assert_close(out_p.loss, torch.tensor(-1.55, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(out_p.loss, out_s.loss, atol=1e-12, rtol=0)
    assert _grad(padded, out_p.loss)[0, 2].item() == 0.0
    assert _float(out_p.metrics) == pytest.approx(_float(out_s.metrics), abs=1e-12)
    assert _float(out_p.maxima) == pytest.approx(_float(out_s.maxima), abs=1e-12)


def test_token_mean_vs_seq_mean():
    # row 0: 3 tokens, A = 1, w = [1, 2, .5] -> per-token [-1, -2, -.5]
    # row 1: 1 token, A = 4, w = 1 -> [-4];  row 2: no completion tokens at all
    lp = [[-1.0, -1.0, -1.0], [-0.5, 0.0, 0.0], [-0.1, -0.1, -0.1]]
    beh = [[-1.0, -1.0 - L2, -1.0 - LH], [-0.5, 0.0, 0.0], [-0.1, -0.1, -0.1]]
    mask = [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    token = rl_loss(_inputs(lp, lp, beh, [1.0, 4.0, 7.0], mask, "token_mean")).loss
    inp = _inputs(lp, lp, beh, [1.0, 4.0, 7.0], mask, "seq_mean")
    seq = rl_loss(inp).loss
    # token mean: (-1 - 2 - .5 - 4) / 4 = -7.5 / 4 = -1.875
    torch.testing.assert_close(token, torch.tensor(-1.875, dtype=torch.float64), atol=1e-6, rtol=0)
    # seq mean over the 2 non-empty rows: (-3.5 / 3 + -4 / 1) / 2 = -31 / 12
    torch.testing.assert_close(seq, torch.tensor(-31 / 12, dtype=torch.float64), atol=1e-6, rtol=0)
    # seq-mean grad: -w A / (len * n_rows): row 0 -> [-1, -2, -.5] / 6, row 1 -> -4 / 2
    expected = torch.tensor(
        [[-1 / 6, -2 / 6, -0.5 / 6], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(_grad(inp, seq), expected, atol=1e-6, rtol=0)


def test_metrics_keys_and_values():
    # two tokens, A = 1, eps .2, cap 2:
    #   t0: prox - beh = log 3 -> w_raw 3, w 2; lp - prox = log 1.5 -> rho 1.5, clipped to 1.2
    #   t1: prox - beh = 0 -> w 1; rho 1 (not clipped); t2 is padding
    prox = [[-1.0, -2.0, 0.0]]
    lp = [[-1.0 + math.log(1.5), -2.0, 5.0]]
    beh = [[-1.0 - L3, -2.0, -20.0]]
    inp = _inputs(lp, prox, beh, [1.0], [[1, 1, 0]], updates=2)
    inp.entropy = torch.tensor([[0.5, 1.5, 9.0]], dtype=torch.float64)
    out = rl_loss(inp)
    assert set(out.metrics) == {
        "pg_loss", "clip_frac", "is_weight_mean", "is_truncated_frac", "is_masked_frac", "ratio_mean",
        "approx_kl_behavior", "entropy",
    }
    assert set(out.maxima) == {"is_weight_max"}
    assert not any(v.requires_grad for v in [*out.metrics.values(), *out.maxima.values()])
    m = _float(out.metrics) | _float(out.maxima)
    # loss = -(2 * 1.2 + 1 * 1) / 2 = -1.7; pg_loss is its mean over the step's 2 updates: -0.85
    torch.testing.assert_close(out.loss, torch.tensor(-1.7, dtype=torch.float64), atol=1e-6, rtol=0)
    assert m["pg_loss"] == pytest.approx(-0.85, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(0.5, abs=1e-6)
    assert m["is_weight_mean"] == pytest.approx(1.5, abs=1e-6)  # (2 + 1) / 2
    assert m["is_weight_max"] == pytest.approx(3.0, abs=1e-6)
    assert m["is_truncated_frac"] == pytest.approx(0.5, abs=1e-6)
    assert m["ratio_mean"] == pytest.approx(1.25, abs=1e-6)  # (1.5 + 1) / 2
    assert m["entropy"] == pytest.approx(1.0, abs=1e-6)  # (0.5 + 1.5) / 2
    # mean(log mu - log pi) = ((-1 - log 3) - (-1 + log 1.5) + 0) / 2 = -(log 3 + log 1.5) / 2
    assert m["approx_kl_behavior"] == pytest.approx(-(L3 + math.log(1.5)) / 2, abs=1e-6)


def test_per_token_metrics_are_the_chunks_share_of_the_step():
    # Two chunks of one step with 4 tokens in the loss: clip_frac adds up to 1 of 4, not 1 of 2 + 0 of 2.
    zeros = [[0.0, 0.0]]
    chunks = [_inputs([[math.log(1.5), 0.0]], zeros, zeros, [1.0], [[1, 1]]),
              _inputs([[0.0, 0.0]], zeros, zeros, [1.0], [[1, 1]])]
    total = 0.0
    for inp in chunks:
        inp.settings = LossSettings(inp.settings.loss, tokens=4.0)
        total += float(rl_loss(inp).metrics["clip_frac"])
    assert total == pytest.approx(0.25, abs=1e-9)


def test_an_empty_chunk_names_every_metric_at_zero():
    for kl, extra in ((NoKL(), set()), (ReverseKL(), {"kl", "kl_max"}), (RapoKL(kind="rapo"), {"kl", "kl_max"})):
        out = rl_loss(LossInputs.empty(LossSettings(LossConfig(), kl)))
        assert set(out.metrics) | set(out.maxima) == {
            "pg_loss", "clip_frac", "is_weight_mean", "is_truncated_frac", "is_masked_frac", "ratio_mean",
            "approx_kl_behavior", "entropy", "is_weight_max"} | extra
        assert all(float(v) == 0.0 for v in [*out.metrics.values(), *out.maxima.values()])
        assert float(out.loss) == 0.0


# ---------------------------------------------------------------------------------------------
# MIS masking


def test_mis_masks_tokens_outside_the_weight_range():
    # w_raw = exp(prox - behav) = [3, 1, 1/4]; with [0.5, 2] only the middle token is kept.
    prox = [[L3, 0.0, -math.log(4.0)]]
    inp = _inputs(prox, prox, [[0.0, 0.0, 0.0]], [1.0], [[1, 1, 1]], tis_cap=10.0, mis_low=0.5, mis_high=2.0)
    out = rl_loss(inp)
    # ratio = 1, A = 1: per-token -w * keep = [0, -1, 0]; token mean over 3 tokens = -1/3
    torch.testing.assert_close(out.loss, torch.tensor(-1.0 / 3.0, dtype=torch.float64), atol=1e-9, rtol=0)
    assert float(out.metrics["is_masked_frac"]) == pytest.approx(2.0 / 3.0)
    torch.testing.assert_close(_grad(inp, out.loss), torch.tensor([[0.0, -1.0 / 3.0, 0.0]], dtype=torch.float64))
    unmasked = _inputs(prox, prox, [[0.0, 0.0, 0.0]], [1.0], [[1, 1, 1]], tis_cap=10.0)
    assert float(rl_loss(unmasked).metrics["is_masked_frac"]) == 0.0


# ---------------------------------------------------------------------------------------------
# KL terms: k3 and RAPO


def test_k3_values_and_gradient():
    # A = 0: no policy term. x = log pi_ref - log pi_theta = [ln 2, -ln 2]:
    # K = e^x - x - 1 = [2 - 0.6931472 - 1, 0.5 + 0.6931472 - 1] = [0.3068528, 0.1931472]
    inp = _inputs([[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]], [0.0], [[1, 1]], kl=ReverseKL(coef=0.5))
    inp.ref_logprobs = torch.tensor([[L2, LH]], dtype=torch.float64)
    out = rl_loss(inp)
    # loss = 0.5 x token mean of K = 0.5 x (0.3068528 + 0.1931472) / 2 = 0.125
    torch.testing.assert_close(out.loss, torch.tensor(0.125, dtype=torch.float64))
    # dK/dlog pi_theta = 1 - e^x = [-1, 0.5], x 0.5 over 2 tokens
    torch.testing.assert_close(_grad(inp, out.loss), torch.tensor([[-0.25, 0.125]], dtype=torch.float64))
    assert float(out.metrics["kl"]) == pytest.approx(0.25)
    assert float(out.maxima["kl_max"]) == pytest.approx(0.3068528194)
    # with 2 updates and 2 ranks (token weights 2 / tokens): kl = 2 x 0.25 / 2 ranks / 2 updates = 0.125
    inp.loss_weights = inp.loss_weights * 2
    inp.settings = LossSettings(inp.settings.loss, inp.settings.kl, updates=2, ranks=2, tokens=2.0)
    assert float(rl_loss(inp).metrics["kl"]) == pytest.approx(0.125)


def test_a_kl_term_without_its_inputs_is_an_error():
    inp = _inputs([[0.0]], [[0.0]], [[0.0]], [0.0], [[1]], kl=RapoKL(kind="rapo_sampled"))
    with pytest.raises(ValueError, match="'rapo_sampled' needs LossInputs.ref_hat_logprobs"):
        rl_loss(inp)


def test_rapo_exact_is_reported_not_added():
    # The chunked head adds the exact forward KL's value and gradient; the loss reports its token
    # mean (0.2 + 0.4) / 2 = 0.3 and adds nothing (A = 0: loss 0).
    inp = _inputs([[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]], [0.0], [[1, 1]], kl=RapoKL(kind="rapo", coef=1.0))
    inp.exact_kl = torch.tensor([[0.2, 0.4]], dtype=torch.float64)
    out = rl_loss(inp)
    assert float(out.loss.detach()) == 0.0
    assert float(out.metrics["kl"]) == pytest.approx(0.3) and float(out.maxima["kl_max"]) == pytest.approx(0.4)


def test_rapo_penalty_zero_at_the_reweighted_reference_positive_elsewhere():
    lp = torch.tensor([[-1.2, -0.3, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(rapo_kl(lp, lp), torch.zeros_like(lp))
    # log w = [ln 2, -ln 2, 0]: K = w ln w - w + 1 = [2 ln 2 - 1, 1 - 0.5 - 0.5 ln 2, 0]
    per_token = rapo_kl(lp, lp + torch.tensor([[L2, LH, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(per_token, torch.tensor([[0.3862943611, 0.1534264097, 0.0]], dtype=torch.float64))


def test_rapo_gradient_sign_per_token():
    inp = _inputs([[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]], [0.0], [[1, 1]],
                  kl=RapoKL(kind="rapo_sampled", coef=1.0))
    inp.ref_hat_logprobs = torch.tensor([[L2, LH]], dtype=torch.float64)
    loss = rl_loss(inp).loss
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


def test_phi_clamp():
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
