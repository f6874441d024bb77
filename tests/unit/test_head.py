"""The chunked output layer (`pipeline.rl.head`) against plain autograd over the full
``[tokens, vocabulary]`` log-softmax: the same values, loss and gradients, whatever the chunk."""

from __future__ import annotations

import pytest
import torch

from pipeline.rl.head import HeadPlan, chunk_tokens, completion_head
from pipeline.rl.losses import k3_kl, ppo_per_token, rapo_exact_kl, rapo_kl

N, D, V = 11, 8, 37


def _setup(seed: int = 0, greedy: bool = True):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g))
    ref_head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        ref_head.weight.copy_(head.weight + 0.3 * torch.randn(V, D, generator=g))
    hidden = torch.randn(N, D, generator=g)
    ref_hidden = hidden + 0.1 * torch.randn(N, D, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    temps = torch.rand(N, generator=g) + 0.5
    if greedy:
        temps[3] = 0.0  # greedy: computed at the floor, as the engines do
    extra = {"behavior": -torch.rand(N, generator=g) * 3, "adv": torch.randn(N, generator=g),
             "weights": torch.rand(N, generator=g), "phi": torch.rand(N, generator=g) * 0.9 + 0.1}
    return head, ref_head, hidden, ref_hidden, targets, temps, extra


def _reference(kind: str, head, ref_head, hidden, ref_hidden, targets, temps, x):
    """The same loss through autograd on the full log-softmax (the un-chunked path)."""
    t = temps.clamp(min=1e-4).unsqueeze(1)
    logp = torch.log_softmax(head(hidden) / t, dim=-1)
    lp = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    pg, _ = ppo_per_token(lp, lp.detach() - 0.05, x["behavior"], x["adv"], tis_cap=2.0)
    loss = (pg * x["weights"]).sum()
    with torch.no_grad():
        ref_logp = torch.log_softmax(ref_head(ref_hidden) / t, dim=-1)
        hat = torch.log_softmax(ref_logp * x["phi"].unsqueeze(1), dim=-1)
    if kind == "k3":
        loss = loss + 0.5 * (k3_kl(lp, ref_logp.gather(1, targets.unsqueeze(1)).squeeze(1)) * x["weights"]).sum()
    elif kind == "rapo_sampled":
        loss = loss + 0.5 * (rapo_kl(lp, hat.gather(1, targets.unsqueeze(1)).squeeze(1)) * x["weights"]).sum()
    elif kind == "rapo":
        loss = loss + 0.5 * (rapo_exact_kl(logp, hat) * x["weights"]).sum()
    return loss, lp, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("kind", ["none", "k3", "rapo_sampled", "rapo"])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_head_equals_autograd_on_the_full_log_softmax(kind, chunk):
    # (A greedy row's KL terms are inf - inf in plain autograd: compared for the PPO term only.)
    head, ref_head, hidden, ref_hidden, targets, temps, x = _setup(greedy=kind == "none")
    h1 = hidden.clone().requires_grad_()
    want, want_lp, want_ent = _reference(kind, head, ref_head, h1, ref_hidden, targets, temps, x)
    want.backward()
    want_gh, want_gw = h1.grad.clone(), head.weight.grad.clone()
    head.weight.grad = None

    def token_loss(lp, values, sl):
        pg, _ = ppo_per_token(lp, lp.detach() - 0.05, x["behavior"][sl], x["adv"][sl], tis_cap=2.0)
        total = (pg * x["weights"][sl]).sum()
        if kind == "k3":
            total = total + 0.5 * (k3_kl(lp, values["ref_logprobs"]) * x["weights"][sl]).sum()
        if kind == "rapo_sampled":
            total = total + 0.5 * (rapo_kl(lp, values["ref_hat_logprobs"]) * x["weights"][sl]).sum()
        return total

    h2 = hidden.clone().requires_grad_()
    plan = HeadPlan(targets, temps, chunk, token_loss, ref_hidden=ref_hidden if kind != "none" else None,
                    ref_head=ref_head, phi=x["phi"] if kind.startswith("rapo") else None,
                    exact_kl_weight=0.5 * x["weights"] if kind == "rapo" else None)
    got = completion_head(head, h2, plan)
    got.backward()
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plan.values["logprobs"], want_lp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plan.values["entropy"], want_ent.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2.grad, want_gh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.weight.grad, want_gw, atol=1e-5, rtol=1e-4)
    assert not hasattr(head, "forward") or head.forward.__func__ is torch.nn.Linear.forward  # restored


def test_values_only_keeps_no_gradient_and_the_chunk_follows_the_budget():
    head, _, hidden, _, targets, temps, _ = _setup(1)
    plan = HeadPlan(targets, temps, 4)
    with torch.no_grad():
        loss = completion_head(head, hidden, plan)
    assert float(loss) == 0.0 and plan.values["logprobs"].shape == (N,)
    # 151,936-token vocabulary, 256 MiB for 3 fp32 buffers of [chunk, V]: 147 tokens a chunk.
    assert chunk_tokens(151_936, 256, buffers=3) == 256 * 2**20 // (3 * 4 * 151_936) == 147
    assert chunk_tokens(10**9, 1) == 1
