"""Any causal LM, not only the default Qwen2: tiny random Qwen2, Qwen3 and Llama models built here
load as themselves (strictly), generate, take a learner step, are published and exported; the
export loads with transformers and serves in vLLM as it is, and published weights reload in place
into both rollout engines."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from needs import require_vllm
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import LearnerConfig
from pipeline.erpo.rule import ErpoRule
from pipeline.model.policy import ModelLoadError, build_char_tokenizer, build_tiny, export_pretrained, load_policy
from pipeline.model.weights import publish
from pipeline.rl.learn import train_step
from pipeline.rl.trainer import TorchTrainer
from pipeline.model.batch import pack, token_logprobs
from pipeline.rollout.engine import TorchEngine
from services.rollout import group_columns

pytestmark = pytest.mark.integration

ARCHS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
PROMPTS = ["3+4=", "9-2+1=", "5+5-3="]


@pytest.fixture(scope="module", params=list(ARCHS))
def folder(request, tmp_path_factory) -> tuple[str, Path]:
    """A tiny random model of each architecture (head size 32: vLLM's CPU minimum), saved with the
    character tokenizer; Llama's output layer is untied, as in real Llama checkpoints."""
    arch = request.param
    tok = build_char_tokenizer()
    model = build_tiny(arch, len(tok), hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate_size=128,
                       seed=3, tie_word_embeddings=arch != "llama")
    path = tmp_path_factory.mktemp(arch)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return arch, path


def _scored(samples, rewards: np.ndarray) -> list:
    """Scored groups (as the reward service sends them) from an engine's samples."""
    groups = []
    for i, prompt in enumerate(PROMPTS):
        mine = [s for s in samples if s.prompt_index == i]
        ticket = {"ticket_id": f"e0-{i:06d}", "attempt": 0, "prompt_id": f"p{i}", "text": prompt, "answer": "7"}
        cols = group_columns(mine, ticket, 0, 1.0, len(mine), 0.0)
        r = rewards[i * len(mine):(i + 1) * len(mine)].astype(np.float32)
        n = len(r)
        cols.update(reward=r, verify_status=np.array(["correct" if x else "wrong" for x in r], dtype=object),
                    group_pass_rate=np.full(n, r.mean(), np.float32), scored_at=np.zeros(n))
        groups.append(cols)
    return groups


def test_loads_as_itself_and_refuses_weights_that_are_not_its_own(folder, tmp_path):
    arch, path = folder
    model, tokenizer = load_policy(path)
    assert type(model).__name__ == ARCHS[arch] and model.dtype == torch.float32
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "left"
    weights = load_file(str(path / "model.safetensors"))
    norm = next(k for k in weights if "norm" in k)
    mlp = next(k for k in weights if "mlp" in k and k.endswith(".weight"))
    for name, change in (("missing", lambda w: w.pop(norm)),
                         ("unexpected", lambda w: w.__setitem__("model.layers.0.extra.weight", torch.zeros(2))),
                         ("mismatched", lambda w: w.__setitem__(mlp, w[mlp][:-1].clone()))):  # one row short
        broken = tmp_path / name
        shutil.copytree(path, broken)
        w = dict(weights)
        change(w)
        save_file(w, str(broken / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ModelLoadError, match=name) as raised:
            load_policy(broken)
        if name == "mismatched":
            assert mlp in str(raised.value)


def test_generates_learns_publishes_and_reloads_in_both_engines(folder, tmp_path):
    arch, path = folder
    model, tokenizer = load_policy(path)
    engine = TorchEngine(model, tokenizer, max_new_tokens=6, seed=0)
    samples = engine.generate(PROMPTS, [1.0] * len(PROMPTS), 4)
    assert len(samples) == 12 and all(s.finish_reason in ("stop", "length") for s in samples)
    groups = _scored(samples, np.random.default_rng(0).integers(0, 2, 12))
    lc = LearnerConfig(optimizer={"lr": 1e-2, "warmup_steps": 0}, backend="torch", groups_per_step=3)
    trainer = TorchTrainer(model, lc)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = train_step(trainer, None, groups, lc, ErpoRule(), tokenizer.pad_token_id, np.random.default_rng(0))
    assert np.isfinite(metrics["loss"]) and metrics["tokens"] == sum(len(s.completion_token_ids) for s in samples)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    pub = publish(trainer.full_state_dict(), tmp_path / "policies", 1, keep=1)
    export = export_pretrained(trainer.full_state_dict(), path, tmp_path / "export")

    # A fresh engine on the original folder takes the published weights, and the exported folder
    # loads (strictly) as the trained model: the same greedy outputs as the trained model itself.
    trained = [s.completion_token_ids.tolist() for s in engine.generate(PROMPTS, [0.0] * 3, 1)]
    fresh_model, _ = load_policy(path)
    fresh = TorchEngine(fresh_model, tokenizer, max_new_tokens=6, seed=1)
    fresh.load_published(pub.uri, pub.sha256, 1)
    assert [s.completion_token_ids.tolist() for s in fresh.generate(PROMPTS, [0.0] * 3, 1)] == trained
    exported, exported_tok = load_policy(export)
    assert type(exported).__name__ == ARCHS[arch] and (export / "generation_config.json").exists()
    assert exported_tok.get_vocab() == tokenizer.get_vocab()
    again = TorchEngine(exported, exported_tok, max_new_tokens=6, seed=2)
    assert [s.completion_token_ids.tolist() for s in again.generate(PROMPTS, [0.0] * 3, 1)] == trained

    require_vllm()
    from pipeline.rollout.engine_vllm import VllmEngine

    def vllm_matches(v: VllmEngine, reference: torch.nn.Module, other: torch.nn.Module) -> None:
        """vLLM's behaviour log-probs are ``reference``'s (the learner's recomputation), not
        ``other``'s. (Greedy tokens of a random model are near ties, which vLLM's and torch's
        kernels may break differently, so log-probs are compared.)"""
        sampled = v.generate(PROMPTS, [1.0] * 3, 4)
        batch = pack([s.prompt_token_ids for s in sampled], [s.completion_token_ids for s in sampled],
                     [1.0] * len(sampled), tokenizer.pad_token_id)
        reported = np.concatenate([s.behavior_logprobs for s in sampled])
        with torch.no_grad():
            want = token_logprobs(reference, batch)[0][batch.completion_mask.bool()].numpy()
            not_want = token_logprobs(other, batch)[0][batch.completion_mask.bool()].numpy()
        np.testing.assert_allclose(reported, want, atol=1e-4, rtol=0)
        assert np.abs(reported - not_want).max() > 1e-3

    # vLLM serves the export as it is; then a second learner step, published, reloads in place.
    v = VllmEngine(export, exported_tok, max_new_tokens=6, seed=0, max_model_len=64)
    try:
        vllm_matches(v, model, load_policy(path)[0])
        step_one = {k: t.clone() for k, t in model.state_dict().items()}
        train_step(trainer, None, groups, lc, ErpoRule(), tokenizer.pad_token_id, np.random.default_rng(1))
        pub2 = publish(trainer.full_state_dict(), tmp_path / "policies", 2, keep=2)
        v.load_published(pub2.uri, pub2.sha256, 2)
        before_step_two = load_policy(path)[0]
        before_step_two.load_state_dict(step_one)
        vllm_matches(v, model, before_step_two)
    finally:
        v.close()
