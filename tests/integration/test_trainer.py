"""Training backends: DeepSpeed ZeRO 0/2/3 on CPU against the plain torch loop, checkpoints that
resume bit for bit, and fp32-faithful published weights.

All runs use the same tiny Qwen2, the same synthetic scored groups and the learner's real
`train_step` (decoupled PPO + RAPO's KL term, two mini-batches per step).
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch

from pipeline.config import LearnerConfig
from pipeline.erpo.rule import ErpoRule
from pipeline.model.policy import build_tiny_qwen2
from pipeline.rl.learn import train_step
from pipeline.rl.trainer import (DeepSpeedTrainer, TorchTrainer, deepspeed_config, ensure_extensions_dir, lr_at,
                              make_trainer)
from schemas import Ragged

pytestmark = pytest.mark.integration

VOCAB, G, GROUPS, STEPS = 21, 4, 4, 3


def _model() -> torch.nn.Module:
    return build_tiny_qwen2(VOCAB, hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64, seed=7)


def _groups(seed: int) -> list[dict]:
    """GROUPS scored groups of G samples with random tokens, rewards and near-on-policy log-probs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(GROUPS):
        gid = uuid.UUID(int=int(rng.integers(1 << 62))).hex
        prompts = [rng.integers(4, VOCAB, rng.integers(3, 6)).astype(np.int32) for _ in range(G)]
        comps = [rng.integers(4, VOCAB, rng.integers(2, 5)).astype(np.int32) for _ in range(G)]
        reward = rng.integers(0, 2, G).astype(np.float32)
        out.append({
            "group_id": np.array([gid] * G, dtype=object),
            "prompt_token_ids": Ragged.from_list(prompts, np.int32),
            "completion_token_ids": Ragged.from_list(comps, np.int32),
            "temperature": rng.choice([0.8, 1.0, 1.2], G).astype(np.float32),
            "finish_reason": np.array(["stop"] * G, dtype=object),
            "behavior_logprobs": Ragged.from_list([-rng.random(len(c)).astype(np.float32) - 2.5 for c in comps],
                                                  np.float32),
            "reward": reward,
            "group_pass_rate": np.full(G, reward.mean(), np.float32),
        })
    return out


LC = LearnerConfig(optimizer={"lr": 1e-3, "warmup_steps": 2}, mini_batches=2, kl={"kind": "rapo", "coef": 0.1},
                   groups_per_step=GROUPS)


def _losses(trainer, steps: range, ref: torch.nn.Module, key: str = "loss") -> list[float]:
    out = []
    for step in steps:
        m = train_step(trainer, ref, _groups(step), LC, ErpoRule(), 0, np.random.default_rng([0, step]))
        out.append(m[key] if key == "loss" else (m["loss"], m[key]))
    return out


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor], torch.nn.Module]:
    """The plain torch loop: losses of the first steps and the weights after them."""
    torch.manual_seed(0)
    ref = _model().eval().requires_grad_(False)
    trainer = TorchTrainer(_model(), LC)
    return _losses(trainer, range(STEPS), ref, "grad_norm"), trainer.full_state_dict(), ref


def test_lr_schedule():
    assert [lr_at(u, 1.0, 4) for u in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 0.1, 0) == 0.1


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_stage_matches_plain_torch(stage, reference, repo_root):
    want_losses, want_weights, ref = reference
    trainer = DeepSpeedTrainer(_model(), LC, repo_root / f"infra/deepspeed/zero{stage}.json")
    assert trainer.zero_stage == stage and trainer.world_size == 1
    got = _losses(trainer, range(STEPS), ref, "grad_norm")
    np.testing.assert_allclose(got, want_losses, rtol=1e-5, atol=1e-6)  # losses and gradient norms
    weights = trainer.full_state_dict()
    assert weights.keys() == want_weights.keys()
    for name, w in weights.items():
        assert w.dtype == torch.float32 and w.shape == want_weights[name].shape, name  # no ZeRO-3 placeholders
        # ~1e-8 apart, except k_proj.bias (~2e-6): its exact gradient is 0 (a key bias shifts all
        # scores of a query alike), so Adam normalises float noise into steps of either run.
        torch.testing.assert_close(w, want_weights[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_resume_gives_identical_next_steps(backend, reference, tmp_path):
    _, _, ref = reference
    lc = LC.model_copy(update={"backend": backend, "deepspeed_config": "infra/deepspeed/zero2.json"})
    first = make_trainer(_model(), lc)
    _losses(first, range(2), ref)
    first.save(tmp_path / "ckpt")
    want = _losses(first, range(2, 4), ref)

    second = make_trainer(_model(), lc)  # fresh weights, then the checkpoint
    second.load(tmp_path / "ckpt")
    assert second.updates == first.updates - 2 * LC.mini_batches
    assert _losses(second, range(2, 4), ref) == want  # bit for bit


def test_deepspeed_config_owns_no_optimiser(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}')
    with pytest.raises(ValueError, match=r"sets \['optimizer'\]"):
        deepspeed_config(bad, LC)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        deepspeed_config(bad, LC)
    with pytest.raises(FileNotFoundError, match="not found"):
        deepspeed_config(tmp_path / "missing.json", LC)


def test_extension_builds_are_kept_per_python_environment(monkeypatch):
    import sys

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    ensure_extensions_dir()
    here = os.environ["TORCH_EXTENSIONS_DIR"]
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    ensure_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] != here
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen")
    ensure_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/chosen"


def test_a_deepspeed_trainer_after_a_closed_one_in_the_same_process(repo_root):
    # close() destroys the process group; DeepSpeed's cached clone of the world group must go too
    # (a stale one failed the next trainer's init with "Group ... is not registered").
    first = DeepSpeedTrainer(_model(), LC, repo_root / "infra/deepspeed/zero0.json")
    first.close()
    second = DeepSpeedTrainer(_model(), LC, repo_root / "infra/deepspeed/zero0.json")
    assert second.world_size == 1
    second.close()
