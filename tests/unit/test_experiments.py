"""bench/experiments.py: which runs are finished, what is read from a run folder (progress rows, the
recorded lake), the report's means, spreads, paired differences and equal-budget interpolation
(hand-computed), and the results block it rewrites; the runner itself launches `rlstream demo`
(not run here)."""

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
        json.dumps({"step": 1, "all_correct_frac": 0.25, "all_wrong_frac": 0.25, "time": 10.0}) + "\n"
        + json.dumps({"step": 2, "all_correct_frac": 0.0, "all_wrong_frac": 0.5}) + "\n"
        + json.dumps({"step": 3, "time": 20.0}) + "\n")
    (run / "progress" / "rollout-0.jsonl").write_text(json.dumps({"tokens": 100, "time": 10.0, "groups": 4}) + "\n"
                                                       + json.dumps({"tokens": 250, "time": 20.0, "groups": 10}) + "\n")
    (run / "progress" / "rollout-1.jsonl").write_text(json.dumps({"tokens": 50, "time": 15.0, "groups": 2}) + "\n")
    (run / "config.json").write_text(json.dumps({"rollout": {"group_size": 8}, "erpo": {"tau0": 1.0}}))
    if finished:
        summary = {"acc_before": acc[0], "acc_after": acc[1], "greedy_before": 0.6, "greedy_after": 0.7, "rl_s": 120.0}
        if budget:
            summary |= {"budget_after": {"pass@1": 0.4, "pass@8": 0.8, "pass@64": 0.95, "distinct_answers": 2.5,
                                         "entropy": 0.7}, "solved_beyond_base": 3}
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
    assert row["traj_s"] == pytest.approx(12 * 8 / 120.0)  # (10 + 2) groups of 8 in 120 s of RL
    # From the learner's first step (t = 10) to its last (t = 20): worker 0 went from 4 to 10 groups,
    # worker 1 from 0 to 2.
    assert row["train_traj_s"] == pytest.approx((6 + 2) * 8 / 10.0)
    assert (row["pass@1"], row["pass@8"], row["pass@64"], row["solved_beyond_base"]) == (0.4, 0.8, 0.95, 3.0)
    assert (row["distinct"], row["entropy"]) == (2.5, 0.7)
    plain = ex.collect(_run(tmp_path, "grpo", 0, "t", (0.3, 0.4)))
    assert math.isnan(plain["pass@64"]) and math.isnan(plain["solved_beyond_base"]) and math.isnan(plain["ra"])
    run = _run(tmp_path, "erpo", 0, "t", (0.3, 0.4))
    assert ex.sampled_tokens_by(run, 9.0) == 0.0
    assert ex.sampled_tokens_by(run, 15.0) == 150.0  # worker 0 at t=10 (100) + worker 1 at t=15 (50)
    assert ex.sampled_tokens_by(run, 30.0) == 300.0


def test_lake_signal_counts_reactivated_groups_and_those_that_differed(tmp_path):
    import polars as pl

    # four groups of two trajectories: two sampled hotter than tau0 = 1.0, one of them with differing rewards
    groups = [("a", 1.0, 0.5), ("b", 1.2, 0.5), ("c", 1.2, 1.0), ("d", 1.0, 0.0)]
    rows = [{"group_id": g, "prompt_id": g, "policy_version": 0, "group_pass_rate": rate, "reward": rate,
             "temperature": temp, "_timestamp_ms": i, "_partition": 0, "_offset": i}
            for i, (g, temp, rate) in enumerate(g for g in groups for _ in range(2))]
    folder = tmp_path / "lake" / "topic=scored" / "version=0"
    folder.mkdir(parents=True)
    pl.DataFrame(rows).write_parquet(folder / "part-0.parquet")
    assert ex.lake_signal(tmp_path, 1.0) == {"ra": 0.5, "ra_signal": 0.25}
    assert math.isnan(ex.lake_signal(tmp_path / "nothing", 1.0)["ra"])


def test_interpolate_and_equal_budgets_read_each_curve_at_the_budget_all_runs_reached():
    a = [{"tokens": 0, "rl_s": 0, "acc": 0.3, "greedy": 0.5}, {"tokens": 100, "rl_s": 10, "acc": 0.5, "greedy": 0.7},
         {"tokens": 300, "rl_s": 40, "acc": 0.6, "greedy": 0.9}]
    b = [{"tokens": 0, "rl_s": 0, "acc": 0.3, "greedy": 0.5}, {"tokens": 200, "rl_s": 30, "acc": 0.4, "greedy": 0.6}]
    assert ex.interpolate(a, "tokens", 50, "acc") == pytest.approx(0.4)
    assert ex.interpolate(a, "tokens", 200, "greedy") == pytest.approx(0.8)
    assert ex.interpolate(a, "rl_s", 40, "acc") == pytest.approx(0.6)
    assert math.isnan(ex.interpolate(b, "tokens", 250, "acc"))
    assert ex.equal_budgets({"x": {0: a}, "y": {0: b}}) == {"tokens": 200, "rl_s": 30}
    text = ex.render({"x": {0: {"acc_after": 0.6}}, "y": {0: {"acc_after": 0.4}}}, "cmd", {"x": {0: a}, "y": {0: b}})
    # x at 200 tokens: 0.55 sampled, 0.8 greedy; at 30 s: 0.5 + (20/30) * 0.1, 0.7 + (20/30) * 0.2
    assert "| x | 1 | 0.550 | 0.800 | 0.567 | 0.833 |" in text
    assert "| y | 1 | 0.400 | 0.600 | 0.400 | 0.600 |" in text


def test_paired_differences_are_per_seed_and_only_over_seeds_both_arms_finished():
    runs = {"erpo": {0: {"acc_after": 0.5, "greedy_after": 0.7}, 1: {"acc_after": 0.7, "greedy_after": 0.6},
                     2: {"acc_after": 0.9, "greedy_after": 0.9}},
            "grpo": {0: {"acc_after": 0.4, "greedy_after": 0.7}, 1: {"acc_after": 0.4, "greedy_after": 0.7}}}
    d = ex.paired(runs, "erpo", "grpo")
    assert d["acc_after"][0] == pytest.approx(0.2) and d["acc_after"][1] == pytest.approx(math.sqrt(0.02))
    assert d["acc_after"][2] == 2 and d["greedy_after"][0] == pytest.approx(-0.05)
    text = ex.render(runs, "cmd")
    assert "| erpo − grpo | 2 | +0.200 ± 0.141 | -0.050 ± 0.071 |" in text


def test_the_results_block_is_replaced_between_its_markers_and_nothing_else_changes(tmp_path):
    doc = tmp_path / "results.md"
    ex.replace_block(doc, "first\n")
    assert doc.read_text() == f"{ex.MARK_BEGIN}\nfirst\n{ex.MARK_END}\n"
    doc.write_text(f"# Results\n\nbefore\n\n{ex.MARK_BEGIN}\nold\n{ex.MARK_END}\n\n## Faults\nafter\n")
    ex.replace_block(doc, "new\n")
    assert doc.read_text() == f"# Results\n\nbefore\n\n{ex.MARK_BEGIN}\nnew\n{ex.MARK_END}\n\n## Faults\nafter\n"


def test_aggregate_and_render_mean_and_sample_sd(tmp_path):
    rows = {s: ex.collect(_run(tmp_path, "erpo", s, "t", (0.3, a))) for s, a in ((0, 0.4), (1, 0.5), (2, 0.6))}
    stats = ex.aggregate(list(rows.values()))
    mean, sd, n = stats["acc_after"]
    assert (mean, n) == (pytest.approx(0.5), 3) and sd == pytest.approx(0.1)  # sample sd of 0.4, 0.5, 0.6
    assert "pass@8" not in stats  # measured by no run
    text = ex.render({"erpo": rows}, "python bench/experiments.py --arms erpo")
    assert "| erpo | 3 | 0.300 ± 0.000 | 0.500 ± 0.100 |" in text
    assert "| erpo | 1 | 0.300 | 0.500 |" in text  # raw run of seed 1
    assert text.count("| erpo |") == 4 and "| – |" in text


def test_every_arm_is_a_valid_run_config_that_sets_erpo_kl_and_dynamic_sampling():
    for arm, sets in ex.ARMS.items():
        keys = {s.split("=", 1)[0] for s in sets}
        assert {"erpo.enabled", "learner.kl.kind", "learner.dynamic_sampling",
                "learner.staleness.max_versions"} <= keys, arm
        cfg = load_config(shipped_config(), ex.GRID_SETS + sets + ex.seed_sets(2))
        assert cfg.seed == 2 and cfg.rollout.seed == 2 and cfg.eval.budget_samples == 64, arm
    exports = load_config(shipped_config(), ex.curve_sets(None, [], 4)).learner
    assert exports.checkpoint.export_every * 4 == exports.total_steps
    assert exports.checkpoint.keep >= 4  # every intermediate export survives until it is evaluated
    assert load_config(shipped_config(), ex.ARMS["dapo"]).learner.dynamic_sampling == "zero_variance"
    assert load_config(shipped_config(), ex.ARMS["erpo_rapo"]).learner.kl.kind == "rapo"
    with pytest.raises(SystemExit):
        ex.main(["--arms", "nope", "--report-only"])


def test_time_to_reach_is_the_first_crossing_of_the_target():
    c = [{"rl_s": 0, "acc": 0.2}, {"rl_s": 10, "acc": 0.4}, {"rl_s": 20, "acc": 0.3}, {"rl_s": 30, "acc": 0.6}]
    assert ex.time_to_reach(c, "acc", 0.3) == pytest.approx(5.0)
    assert ex.time_to_reach(c, "acc", 0.5) == pytest.approx(20 + 10 * 2 / 3)
    assert ex.time_to_reach(c, "acc", 0.1) == 0
    assert math.isnan(ex.time_to_reach(c, "acc", 0.7))


def test_the_report_is_rebuilt_from_records_when_the_run_folders_are_gone(tmp_path):
    runs, records, results = tmp_path / "runs", tmp_path / "records", tmp_path / "results.md"
    _run(runs, "grpo", 0, "t", (0.3, 0.4), budget=True)
    _run(runs, "erpo", 0, "t", (0.3, 0.5))
    args = ["--arms", "grpo,erpo", "--seeds", "0", "--out", str(runs), "--records", str(records),
            "--curve-points", "0", "--results", str(results), "--figures", str(tmp_path / "fig"), "--report-only"]
    assert ex.main(args) == 0
    first = results.read_text()
    grpo = json.loads((records / "grpo-seed0.json").read_text())
    assert grpo["row"]["acc_after"] == 0.4 and grpo["row"]["pass@64"] == 0.95 and grpo["arm"] == "grpo"
    assert json.loads((records / "erpo-seed0.json").read_text())["row"]["pass@64"] is None  # NaN kept as null
    import shutil
    shutil.rmtree(runs)  # a clean checkout: only the records are left
    results.unlink()
    assert ex.main(args) == 0
    assert results.read_text() == first
    record = ex.load_record(records / "erpo-seed0.json")
    assert math.isnan(record["row"]["pass@64"]) and record["row"]["acc_after"] == 0.5


def test_refresh_rows_recomputes_a_record_from_its_run_folder(tmp_path):
    """A record made before a measure existed gets it from its run folder (still on disk); without
    the flag, or without the folder, the record stays as it was."""
    runs, records = tmp_path / "runs", tmp_path / "records"
    _run(runs, "grpo", 0, "t", (0.3, 0.4))
    args = ["--arms", "grpo", "--seeds", "0", "--out", str(runs), "--records", str(records),
            "--curve-points", "0", "--results", "-", "--figures", str(tmp_path / "fig"), "--report-only"]
    assert ex.main(args) == 0
    path = records / "grpo-seed0.json"
    old = json.loads(path.read_text())
    del old["row"]["train_traj_s"]  # as recorded before the measure was added
    old["row"]["acc_after"] = 0.1  # and a value that the run folder disagrees with
    path.write_text(json.dumps(old))
    assert ex.main(args) == 0
    assert json.loads(path.read_text())["row"]["acc_after"] == 0.1  # records are not rewritten by default
    assert ex.main(args + ["--refresh-rows"]) == 0
    row = json.loads(path.read_text())["row"]
    assert row["acc_after"] == 0.4 and row["train_traj_s"] == pytest.approx(6.4)
