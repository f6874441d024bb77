"""Multi-GPU correctness without a GPU: the learner's step on 2 gloo ranks (DeepSpeed, CPU) leaves
the same weights as on 1 rank for the same batch. Rank 0 hands the batch to rank 1 through the
learner's `BatchChannel` (tensors on the rank's device, as NCCL needs), each rank trains on half of
the groups with every token weighted against the whole update, and DeepSpeed averages the
gradients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(ranks: int, stage: int, out: Path) -> dict[str, torch.Tensor]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(_port()), str(HERE / "ranks_step.py"), str(out), str(REPO / "infra" / "deepspeed" / f"zero{stage}.json")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(str(out))


@pytest.mark.parametrize("stage", [0])
def test_two_ranks_leave_the_weights_of_one(stage, tmp_path):
    one = _step(1, stage, tmp_path / "one.safetensors")
    two = _step(2, stage, tmp_path / "two.safetensors")
    assert one.keys() == two.keys() and len(one) > 10
    for name, a in one.items():
        torch.testing.assert_close(two[name], a, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
