"""`learner.share_prompts` keeps to the token budget: measured memory, long prompts, short completions.

With shared prompts a micro-batch runs each prompt once, but every row attends to its own copy of
the prompt's keys and values, which attention keeps for the backward pass. Counting the prompt
once per micro-batch let a budget meant for 7 rows of 1,028 tokens take 128 rows of a 1,024-token
prompt, and 2.5 times the memory. `row_prompt_weight` counts each row's copy.

Each case runs in its own process and measures the rise of its peak resident memory over the
forward and backward pass of the first (largest) micro-batch the budget allows
(`bench/peak_memory.py`: `VmHWM` reset before the pass), on a random 4-layer Llama with
grouped-query attention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BUDGET, PROMPT, COMPLETION, PROMPTS, GROUP = 8192, 1024, 4, 4, 32


def _measure(mode: str) -> dict:
    """Peak memory of one case, run in a fresh process (this file's `__main__`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, mode], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_shared_micro_batch_holds_no_more_than_an_unshared_one_of_the_same_budget():
    full, shared, once = _measure("full"), _measure("shared"), _measure("prompt_once")
    print(f"budget {BUDGET}: unshared {full}, shared {shared}, prompt counted once {once}")
    assert shared["rows"] > full["rows"]  # sharing still buys rows
    assert shared["mb"] <= 1.1 * full["mb"], (shared, full)
    # The check has teeth: counting the prompt once per micro-batch breaks the budget.
    assert once["mb"] > 1.5 * full["mb"], (once, full)


def _case(mode: str) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from peak_memory import peak_rise_mb

    from pipeline.model.batch import pack
    from pipeline.rl.learn import (completion_hidden, micro_batches, row_prompt_weight, shared_micro_batches,
                                   shared_prompt_hidden)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).train()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 250, PROMPT) for _ in range(PROMPTS)]
    rows = np.arange(PROMPTS * GROUP)
    prompt_of = rows // GROUP
    completions = [rng.integers(3, 250, COMPLETION) for _ in rows]
    prompt_len, completion_len = np.full(len(rows), PROMPT), np.full(len(rows), COMPLETION)
    if mode == "full":
        part = micro_batches(rows, prompt_len + completion_len, BUDGET)[0]
    else:
        weight = row_prompt_weight(config) if mode == "shared" else 0.0
        part = shared_micro_batches(rows, prompt_of, prompt_len, completion_len, BUDGET, weight)[0]
    def forward_backward() -> None:
        if mode == "full":
            batch = pack([prompts[prompt_of[r]] for r in part], [completions[r] for r in part], [1.0] * len(part), 0)
            hidden = completion_hidden(model, batch)
        else:
            _, first, local = np.unique(prompt_of[part], return_index=True, return_inverse=True)
            hidden = shared_prompt_hidden(model, [prompts[prompt_of[part[i]]] for i in first], local,
                                          [completions[r] for r in part], 0, torch.device("cpu"))
        hidden.float().square().mean().backward()

    mb = peak_rise_mb(forward_backward)
    assert mb is not None, "/proc/self/clear_refs cannot be written: the peak cannot be reset"
    return {"mode": mode, "rows": len(part), "mb": mb}


if __name__ == "__main__":
    print(json.dumps(_case(sys.argv[1])))
