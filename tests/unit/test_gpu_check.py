"""bench/gpu_check.sh: exits at once with a clear message without a GPU, and its plain-torch
Qwen2-shaped decoder is a real decoder (cached decoding = full forward; Qwen2.5-0.5B's size)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_exits_at_once_saying_so():
    proc = subprocess.run([str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU is visible" in proc.stderr and "RESULT" not in proc.stdout


def test_default_shape_is_qwen25_05b():
    with torch.device("meta"):
        model = gpu_check.Decoder(gpu_check.Shape())
    assert sum(p.numel() for p in model.parameters()) == 494_032_768


def test_cached_decoding_equals_the_full_forward():
    torch.manual_seed(0)
    model = gpu_check.Decoder(gpu_check.TINY).eval()
    ids = torch.randint(0, gpu_check.TINY.vocab, (2, 9))
    with torch.no_grad():
        full = model.hidden(ids)
        caches = [{} for _ in model.blocks]
        steps = [model.hidden(ids[:, :5], 0, caches)]
        steps += [model.hidden(ids[:, t:t + 1], t, caches) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cpu_smoke_run_ends_with_its_result_line():
    proc = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--prompts", "2",
                           "--group", "2", "--prompt-len", "8", "--new-tokens", "8", "--steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT rollout_tok_s=") and "learner_tok_s=" in last and "sync_s=" in last
