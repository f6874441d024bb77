"""End to end: `rlstream demo` on the embedded default, asserting that the policy learned.

The demo warm-starts the tiny model (cached in .cache/rlstream), evaluates it on 400 held-out
problems, runs broker + learner + reward + rollout as processes, and evaluates again. We assert on
sampled pass@1 (4 samples per problem at T=1), the quantity GRPO optimises.

Margin: over 3 seeds of the full demo (300 steps) the gain was +7.6 to +8.3 points, and the
before-value is fixed (same warm-start, same held-out set, same eval seed), so run-to-run spread
of the gain is about 1 point; the standard error of one evaluation (1,600 samples) is ~1.2 points.
This shortened run (200 steps) gains about 6 points; we require +3 points, more than twice the
evaluation's standard error and well below the measured gain.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MARGIN = 0.03


def test_demo_learns(tmp_path: Path):
    cmd = [sys.executable, "-m", "services.cli", "demo",
           "--set", f'workdir="{tmp_path}"', "--set", "learner.total_steps=200",
           "--set", "demo.progress_every_s=15"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    print(out[-3000:])
    m = re.search(r"^RESULT acc_before=([\d.]+) acc_after=([\d.]+) .*wall_s=(\d+)$", proc.stdout, re.M)
    assert m, f"no RESULT line in:\n{proc.stdout[-2000:]}"
    before, after = float(m.group(1)), float(m.group(2))
    assert 0.2 < before < 0.6, f"warm-start accuracy {before} is outside the range the demo is tuned for"
    assert after - before > MARGIN, f"held-out pass@1 went {before:.3f} -> {after:.3f}"
