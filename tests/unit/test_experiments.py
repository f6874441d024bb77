"""bench/experiments.py: which runs are finished, what is read from a run folder, and the report's
means and spreads (hand-computed); the runner itself launches `rlstream demo` (not run here)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import experiments as ex  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from services.cli import shipped_config  # noqa: E402


def _run(root: Path, arm: str, seed: int, stamp: str, acc: tuple[float, float], finished: bool = True,
         budget: bool = False) -> Path:
    run = root / arm / f"seed{seed}" / stamp
    (run / "progress").mkdir(parents=True)
    (run / "progress" / "learner.jsonl").write_text(
        json.dumps({"step": 1, "all_correct_frac": 0.25, "all_wrong_frac": 0.25}) + "\n"
        + json.dumps({"step": 2, "all_correct_frac": 0.0, "all_wrong_frac": 0.5}) + "\n"
        + json.dumps({"step": 3}) + "\n")
    (run / "progress" / "rollout-0.jsonl").write_text(json.dumps({"tokens": 100}) + "\n" + json.dumps({"tokens": 250}) + "\n")
    (run / "progress" / "rollout-1.jsonl").write_text(json.dumps({"tokens": 50}) + "\n")
    if finished:
        summary = {"acc_before": acc[0], "acc_after": acc[1], "greedy_before": 0.6, "greedy_after": 0.7, "rl_s": 120.0}
        if budget:
            summary |= {"budget_after": {"pass@1": 0.4, "pass@8": 0.8, "pass@64": 0.95}, "solved_beyond_base": 3}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_finished_takes_the_newest_run_with_a_summary_and_skips_interrupted_ones(tmp_path):
    assert ex.finished(tmp_path, "grpo", 0) is None
    _run(tmp_path, "grpo", 0, "20261203-100000", (0.3, 0.4), finished=False)
    assert ex.finished(tmp_path, "grpo", 0) is None  # interrupted: run again
    done = _run(tmp_path, "grpo", 0, "20261203-110000", (0.3, 0.4))
    _run(tmp_path, "grpo", 0, "20261203-120000", (0.3, 0.5), finished=False)
    assert ex.finished(tmp_path, "grpo", 0) == done
    assert ex.finished(tmp_path, "grpo", 1) is None


def test_collect_reads_accuracy_signal_and_sampled_tokens(tmp_path):
    row = ex.collect(_run(tmp_path, "dapo", 0, "t", (0.3, 0.4), budget=True))
    assert row["acc_before"] == 0.3 and row["greedy_after"] == 0.7 and row["rl_s"] == 120.0
    assert row["signal"] == pytest.approx(0.5)  # steps 1 and 2: 1 - 0.5 each; step 3 has no fractions
    assert row["tokens"] == 300.0  # the last running total of each rollout worker: 250 + 50
    assert (row["pass@1"], row["pass@8"], row["pass@64"], row["solved_beyond_base"]) == (0.4, 0.8, 0.95, 3.0)
    plain = ex.collect(_run(tmp_path, "grpo", 0, "t", (0.3, 0.4)))
    assert math.isnan(plain["pass@64"]) and math.isnan(plain["solved_beyond_base"])


def test_aggregate_and_render_mean_and_sample_sd(tmp_path):
    rows = {s: ex.collect(_run(tmp_path, "erpo", s, "t", (0.3, a))) for s, a in ((0, 0.4), (1, 0.5), (2, 0.6))}
    stats = ex.aggregate(list(rows.values()))
    mean, sd, n = stats["acc_after"]
    assert (mean, n) == (pytest.approx(0.5), 3) and sd == pytest.approx(0.1)  # sample sd of 0.4, 0.5, 0.6
    assert "pass@8" not in stats  # measured by no run
    text = ex.render({"erpo": rows}, "Grid", "python bench/experiments.py --arms erpo")
    assert "| erpo | 3 | 0.300 ± 0.000 | 0.500 ± 0.100 |" in text
    assert "| erpo | 1 | 0.300 | 0.500 |" in text  # raw run of seed 1
    assert text.count("| erpo |") == 4 and "| – |" in text


def test_every_arm_is_a_valid_run_config_that_sets_erpo_kl_and_dynamic_sampling():
    for arm, sets in ex.ARMS.items():
        keys = {s.split("=", 1)[0] for s in sets}
        assert {"erpo.enabled", "learner.kl.kind", "learner.dynamic_sampling"} <= keys, arm
        cfg = load_config(shipped_config(), sets + ex.seed_sets(2))
        assert cfg.seed == 2 and cfg.rollout.seed == 2, arm
    assert load_config(shipped_config(), ex.ARMS["dapo"]).learner.dynamic_sampling == "zero_variance"
    assert load_config(shipped_config(), ex.ARMS["erpo_rapo"]).learner.kl.kind == "rapo"
    with pytest.raises(SystemExit):
        ex.main(["--arms", "nope", "--report-only"])
