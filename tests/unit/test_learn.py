"""The learning step: micro-batches by token budget whose gradients add up to exactly the whole
update's, and the same update as the plain formulation (full log-softmax, one batch, autograd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learn_batch import batch_groups, tiny_model
from pipeline.config import LearnerConfig
from pipeline.erpo.rule import ErpoRule
from pipeline.rl.learn import completion_hidden, micro_batches, shared_micro_batches, shared_prompt_hidden, train_step
from pipeline.rl.losses import k3_kl, phi_clamp, ppo_per_token, rapo_exact_kl, reweighted_reference
from pipeline.rl.trainer import TorchTrainer
from pipeline.model.batch import pack, scatter_completion, token_logprobs_full
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


def test_shared_micro_batches_keep_a_prompt_together_within_the_budget():
    # rows 0-2 share prompt 0 (3 tokens), rows 3-4 prompt 1 (6 tokens), row 5 prompt 2 (2 tokens)
    prompt_of = np.array([0, 0, 0, 1, 1, 2])
    prompt_len = np.array([3, 3, 3, 6, 6, 2])
    completion_len = np.array([4, 1, 2, 5, 3, 10])
    parts = shared_micro_batches(np.arange(6), prompt_of, prompt_len, completion_len, 20, prompt_weight=0.0)
    # Prompt 2 has the longest row (12), then prompt 1 (11), then prompt 0 (7). [5] costs 2 + 10;
    # adding row 3 would cost 2 x 6 + 2 x 10 > 20. [3, 4] costs 6 + 2 x 5 = 16; adding row 0:
    # 2 x 6 + 3 x 5 > 20. [0, 2, 1]: 3 + 3 x 4 = 15.
    assert [p.tolist() for p in parts] == [[5], [3, 4], [0, 2, 1]]
    # A prompt whose rows do not fit together is split; a row too long for the budget is alone.
    parts = shared_micro_batches(np.arange(3), prompt_of, prompt_len, completion_len, 8, prompt_weight=0.0)
    assert [p.tolist() for p in parts] == [[0], [2, 1]]  # 3 + 4 = 7; 3 + 2 x 4 > 8; 3 + 2 x 2 = 7
    assert [p.tolist() for p in shared_micro_batches(np.arange(3), prompt_of, prompt_len, completion_len, 2, 0.0)] \
        == [[0], [2], [1]]
    assert shared_micro_batches(np.arange(0), prompt_of, prompt_len, completion_len, 8, 0.0) == []
    # Every row also holds its prompt's keys and values: at weight 0.5 a row of prompt 0 costs its
    # completion + 0.5 x 3. [0] costs 3 + (4 + 1.5) = 8.5; with row 2: 3 + 2 x (4 + 1.5) = 14 > 12.
    parts = shared_micro_batches(np.arange(3), prompt_of, prompt_len, completion_len, 12, prompt_weight=0.5)
    assert [p.tolist() for p in parts] == [[0], [2, 1]]  # [2, 1]: 3 + 2 x (2 + 1.5) = 10


def test_a_rows_prompt_token_weighs_its_keys_and_values_against_a_tokens_activations():
    from transformers import LlamaConfig

    from pipeline.rl.learn import row_prompt_weight

    # SmolLM2-135M: 9 heads of 64, 3 key/value heads, hidden 576, intermediate 1536:
    # 2 x (9 + 3) x 64 = 1536 floats against 8 x 576 + 4 x 1536 = 10,752.
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    assert row_prompt_weight(smollm2) == pytest.approx(1536 / 10752, abs=1e-12)
    assert row_prompt_weight(None) == 1.0


def test_shared_prompt_hidden_states_equal_the_whole_sequences():
    """Prompts of different lengths, each computed once for its rows, give the hidden states the
    whole right-padded sequences give, and the same gradient through them."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 29, n) for n in (2, 5, 4)]
    prompt_of = np.array([0, 0, 1, 1, 1, 2, 0])
    completions = [rng.integers(3, 29, n) for n in (3, 1, 6, 0, 2, 4, 5)]
    weights = torch.randn(sum(len(c) for c in completions), 16)
    grads = []
    for shared in (True, False):
        model = tiny_model()
        if shared:
            hidden = shared_prompt_hidden(model, prompts, prompt_of, completions, 0, torch.device("cpu"))
        else:
            batch = pack([prompts[p] for p in prompt_of], completions, np.ones(len(completions)), 0)
            hidden = completion_hidden(model, batch)
        (hidden * weights).sum().backward()
        grads.append((hidden.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kl", ["none", "k3", "rapo"])
@pytest.mark.parametrize("mini_batches", [1, 2])
def test_shared_prompts_give_the_unshared_update(kl, mini_batches):
    """Groups whose rows share their prompt: the step with each prompt computed once (micro-
    batches that keep or split a prompt's rows) has the gradient of the step without sharing."""
    groups = batch_groups(seed=6, size=4, one_prompt=True)
    base = dict(optimizer=FAST, backend="torch", kl=_kl(kl), mini_batches=mini_batches, groups_per_step=4)
    plain, m0 = _gradients(LearnerConfig(**base, share_prompts=False), groups)
    for budget in (10**6, 14):
        shared, m1 = _gradients(LearnerConfig(**base, share_prompts=True, max_tokens_per_micro_batch=budget), groups)
        for g1, g2 in zip(plain, shared):
            for a, b in zip(g1, g2):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        for k in ("loss", "pg_loss", "entropy") + (("kl",) if kl != "none" else ()):
            assert m0[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k


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
    rewards = torch.as_tensor(cols["reward"])
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
    weights = mask / mask.sum()  # token mean over the loss's completion tokens
    pg, _ = ppo_per_token(lp, lp.detach(), behavior, adv.unsqueeze(1), eps_low=lc.loss.eps_low,
                          eps_high=lc.loss.eps_high, tis_cap=lc.loss.tis_cap)
    loss = (pg * weights).sum()
    if kl != "none":
        idx = batch.completion_mask.bool()
        with torch.no_grad():
            ref_logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][idx]
        temps = batch.temperatures.unsqueeze(1).expand_as(idx)[idx]
        if kl == "k3":
            ref_logp = torch.log_softmax(ref_logits.float() / temps.unsqueeze(1), dim=-1)
            per = k3_kl(lp[idx], ref_logp.gather(1, batch.input_ids[:, 1:][idx].unsqueeze(1)).squeeze(1))
        else:
            phi = phi_clamp(rewards, lc.kl.phi_floor).unsqueeze(1).expand_as(idx)[idx]
            per = rapo_exact_kl(logp, reweighted_reference(ref_logits, temps, phi))
        loss = loss + lc.kl.coef * (per * weights[idx]).sum()
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


def test_prompts_are_not_shared_through_a_sliding_window():
    """A sliding-window layer's cache keeps only the window's last keys: such models train on whole
    sequences."""
    from transformers import Qwen2Config

    from pipeline.rl.learn import _sliding_window

    assert not _sliding_window(tiny_model().config) and not _sliding_window(None)
    assert _sliding_window(Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=0,
                                       num_hidden_layers=2))


@pytest.mark.parametrize("kl", ["none", "rapo"])
def test_bf16_autocast_trains_the_fp32_update_to_bf16_precision(kl):
    # learner.autocast = "bfloat16": the same gradient as fp32 up to bf16 rounding of the matmuls
    # (8 bits of mantissa: relative error ~1e-2), with fp32 parameters and gradients throughout.
    groups = batch_groups(one_prompt=True)
    fp32, m32 = _gradients(LearnerConfig(backend="torch", optimizer=FAST, kl=_kl(kl)), groups)
    bf16, m16 = _gradients(LearnerConfig(backend="torch", optimizer=FAST, kl=_kl(kl), autocast="bfloat16"), groups)
    assert all(g.dtype == torch.float32 for g in bf16[0])
    flat32, flat16 = torch.cat([g.flatten() for g in fp32[0]]), torch.cat([g.flatten() for g in bf16[0]])
    assert not torch.equal(flat32, flat16)  # bf16 matmuls did run
    assert torch.linalg.vector_norm(flat16 - flat32) <= 0.05 * torch.linalg.vector_norm(flat32)
    assert m16["loss"] == pytest.approx(m32["loss"], abs=0.02)


def test_auto_autocast_trains_in_bf16_exactly_where_the_cpu_multiplies_bf16_natively():
    # learner.autocast = "auto": bf16 on a CPU with AVX512-BF16/AMX, fp32 elsewhere (there torch's
    # bf16 matmul is a reference loop: a real model's step ran over 10 minutes instead of ~100 s).
    from pipeline.rl.learn import bf16_native, resolved_autocast

    groups = batch_groups(one_prompt=True)
    auto, _ = _gradients(LearnerConfig(backend="torch", optimizer=FAST, autocast="auto"), groups)
    like = "bfloat16" if bf16_native("cpu") else "off"
    same, _ = _gradients(LearnerConfig(backend="torch", optimizer=FAST, autocast=like), groups)
    assert resolved_autocast("auto", "cpu") == like
    assert all(torch.equal(a, b) for a, b in zip(auto[0], same[0]))
    assert resolved_autocast("bfloat16", "cpu") == "bfloat16" and resolved_autocast("off", "cpu") == "off"
