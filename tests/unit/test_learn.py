"""The learning step: micro-batches by token budget whose gradients add up to exactly the whole
update's, and the same update as the plain formulation (full log-softmax, one batch, autograd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learn_batch import batch_groups, tiny_model
from pipeline.config import LearnerConfig
from pipeline.erpo.history import ErpoRule
from pipeline.rl.learn import micro_batches, train_step
from pipeline.rl.losses import (
    PolicyLossInputs,
    decoupled_ppo_loss,
    k3_kl,
    kl_term,
    phi_clamp,
    rapo_exact_kl,
    reference_token_logprobs,
    reweighted_reference,
)
from pipeline.rl.trainer import TorchTrainer
from pipeline.rollout.engine import pack, scatter_completion, token_logprobs_full
from schemas import concat

FAST = {"lr": 1e-2, "warmup_steps": 0}


def _kl(kind: str, coef: float = 0.3) -> dict:
    return {"kind": kind} | ({"coef": coef} if kind != "none" else {})


def _gradients(lc: LearnerConfig, groups, rank: int = 0, world: int = 1,
               overlong: str = "keep") -> tuple[list[list[torch.Tensor]], dict]:
    """The accumulated gradient handed to each optimiser update (the parameters are left as they
    are: Adam's first step turns float-level differences of near-zero gradients into whole steps,
    so updates are compared through their gradients)."""
    model = tiny_model()
    ref = tiny_model(1) if lc.kl.kind != "none" else None
    trainer = TorchTrainer(model, lc)
    trainer.rank, trainer.world_size = rank, world
    seen = []

    def update() -> float:
        seen.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return 0.0

    trainer.update = update
    metrics = train_step(trainer, ref, groups, lc, ErpoRule(), 0, np.random.default_rng(0), overlong)
    return seen, metrics


def test_micro_batches_fill_the_budget_and_never_split_a_row():
    lengths = np.array([5, 9, 2, 9, 30, 4])
    parts = micro_batches(np.arange(6), lengths, max_tokens=18)
    assert [p.tolist() for p in parts] == [[4], [1, 3], [0, 5, 2]]  # longest first; 2 x 9, 3 x 5 <= 18
    assert sorted(np.concatenate(parts).tolist()) == list(range(6))


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("kl", ["none", "k3", "rapo", "rapo_sampled"])
@pytest.mark.parametrize("mini_batches", [1, 2])
def test_accumulated_micro_batches_give_the_whole_update(aggregation, kl, mini_batches):
    groups = batch_groups()
    base = dict(optimizer=FAST, backend="torch", loss={"aggregation": aggregation}, kl=_kl(kl),
                mini_batches=mini_batches, groups_per_step=4)
    whole, m1 = _gradients(LearnerConfig(**base, max_tokens_per_micro_batch=10**6), groups)
    split, m2 = _gradients(LearnerConfig(**base, max_tokens_per_micro_batch=12, logit_chunk_mb=1e-4), groups)
    assert len(whole) == len(split) == mini_batches
    for g1, g2 in zip(whole, split):
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    for k in ("loss", "pg_loss", "clip_frac", "entropy") + (("kl",) if kl != "none" else ()):
        assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("overlong", ["keep", "mask"])
@pytest.mark.parametrize("kl", ["none", "k3", "rapo"])
def test_one_update_equals_the_plain_formulation(kl, overlong):
    """The update as the learner computed it before micro-batching: the whole batch packed, the
    full tempered log-softmax, decoupled PPO and the KL term through autograd, one AdamW step.
    With ``overlong="mask"`` the completions cut at the length limit are out of the loss's mask
    (and of its token count), while their groups' advantages still count their rewards."""
    groups = batch_groups(seed=3)
    for g in groups:  # the second sample of every group was cut at the length limit
        g["finish_reason"] = np.array(["stop", "length", "stop"], dtype=object)
    lc = LearnerConfig(optimizer=FAST, backend="torch", kl=_kl(kl), groups_per_step=4,
                       max_tokens_per_micro_batch=16, logit_chunk_mb=1e-4)
    ours, metrics = _gradients(lc, groups, overlong=overlong)
    assert metrics["overlong_frac"] == pytest.approx(1 / 3)
    assert metrics["overlong_masked"] == (4 if overlong == "mask" else 0)

    model, ref = tiny_model(), tiny_model(1)
    cols = concat(groups)
    _, gi = np.unique(cols["group_id"], return_inverse=True)
    rewards = torch.as_tensor(cols["shaped_reward"])
    from pipeline.rl.advantages import get_advantage

    adv = get_advantage("grpo")(rewards, torch.as_tensor(gi))
    adv = torch.where(torch.as_tensor(cols["group_pass_rate"]) >= 1, torch.tensor(-0.1), adv)  # ERPO's RA
    n = len(rewards)
    batch = pack([cols["prompt_token_ids"][i] for i in range(n)], [cols["completion_token_ids"][i] for i in range(n)],
                 cols["temperature"], 0)
    behavior = scatter_completion(cols["behavior_logprobs"].values, batch.completion_mask)
    lp, _, logp = token_logprobs_full(model, batch)
    mask = batch.completion_mask
    if overlong == "mask":
        mask = mask * torch.as_tensor(cols["finish_reason"] != "length", dtype=mask.dtype).unsqueeze(1)
    loss, _ = decoupled_ppo_loss(PolicyLossInputs(lp, lp.detach(), behavior, adv, mask),
                                 eps_low=lc.loss.eps_low, eps_high=lc.loss.eps_high, tis_cap=lc.loss.tis_cap)
    if kl != "none":
        idx = batch.completion_mask.bool()
        with torch.no_grad():
            ref_logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][idx]
        temps = batch.temperatures.unsqueeze(1).expand_as(idx)[idx]
        if kl == "k3":
            ref_lp, _ = reference_token_logprobs(ref_logits, batch.input_ids[:, 1:][idx], temps)
            per = k3_kl(lp[idx], ref_lp)
        else:
            phi = phi_clamp(rewards, lc.kl.phi_floor).unsqueeze(1).expand_as(idx)[idx]
            per = rapo_exact_kl(logp, reweighted_reference(ref_logits, temps, phi))
        kl_loss, _ = kl_term(torch.zeros_like(lp).masked_scatter(idx, per), mask)
        loss = loss + lc.kl.coef * kl_loss
    loss.backward()
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-5, abs=1e-7)
    for a, b in zip(ours[0], model.parameters()):
        torch.testing.assert_close(a, b.grad, atol=1e-7, rtol=1e-5)


def test_ranks_weigh_tokens_against_the_whole_update():
    """Two ranks' shares, each weighted by the whole update's token count (times the two ranks
    whose gradients the trainer averages), average to the single-rank gradient."""
    groups = batch_groups(seed=5)
    lc = LearnerConfig(optimizer=FAST, backend="torch", groups_per_step=4, max_tokens_per_micro_batch=20)
    (one,), _ = _gradients(lc, groups)
    (r0,), _ = _gradients(lc, groups, rank=0, world=2)
    (r1,), _ = _gradients(lc, groups, rank=1, world=2)
    for a, b, c in zip(r0, r1, one):
        torch.testing.assert_close((a + b) / 2, c, atol=1e-7, rtol=1e-5)


def test_an_update_whose_completions_were_all_cut_and_masked_is_skipped():
    """Nothing in the loss: no optimiser update at all (Adam's momentum would still move the
    weights), and the step says so."""
    groups = batch_groups(seed=4)
    for g in groups:
        g["finish_reason"] = np.array(["length"] * len(g["finish_reason"]), dtype=object)
    lc = LearnerConfig(optimizer=FAST | {"weight_decay": 0.1}, backend="torch", groups_per_step=4)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = TorchTrainer(model, lc)
    metrics = train_step(trainer, None, groups, lc, ErpoRule(), 0, np.random.default_rng(0), "mask")
    assert trainer.updates == 0 and metrics["updates_skipped"] == 1 and metrics["tokens"] == 0
    assert metrics["overlong_frac"] == 1 and metrics["loss"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    kept = train_step(TorchTrainer(tiny_model(), lc), None, groups, lc, ErpoRule(), 0, np.random.default_rng(0), "keep")
    assert kept["updates_skipped"] == 0 and kept["tokens"] > 0
