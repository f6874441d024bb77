"""The residual rule (`pipeline.verify.residual`) against hand-computed cases, and the places that
tell residual groups apart (ERPO's rule, RA, the learner's dynamic sampling, the lake report)
agreeing with it."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.erpo.rule import ErpoRule
from pipeline.erpo.store import empty_table, update
from pipeline.flow.intake import no_signal
from pipeline.lake.report import groups
from pipeline.rl.advantages import ra_advantages
from pipeline.verify.residual import residual


def test_residual_hand_computed():
    # Groups of 4: 4/4 correct -> all correct; 0/4 -> all wrong; 1/4, 2/4, 3/4 -> informative.
    # 1 - 1e-9 is 1.0 as float32 (the wire type of group_pass_rate) -> all correct; 1e-3 is not 0.
    rates = [1.0, 0.0, 0.25, 0.5, 0.75, 1 - 1e-9, 1e-3]
    all_correct, all_wrong = residual(rates)
    assert all_correct.tolist() == [True, False, False, False, False, True, False]
    assert all_wrong.tolist() == [False, True, False, False, False, False, False]
    # NaN is neither (validation rejects it before any consumer asks).
    assert [bool(m) for m in residual(np.float32(np.nan))] == [False, False]


RATES = [1.0, 0.0, 0.5]  # prompts p0 (all correct), p1 (all wrong), p2 (informative)


def test_every_consumer_of_the_rule_agrees():
    # The learner's dynamic sampling.
    kinds = [no_signal({"group_pass_rate": np.float32([r] * 4)}, "zero_variance") for r in RATES]
    assert kinds == ["all_correct", "all_wrong", None]
    # ERPO's rule: an all-correct group counts as residual, an all-wrong one starts a streak.
    table, _ = update(empty_table(), pl.DataFrame({"prompt_id": ["p0", "p1", "p2"], "pass_rate": RATES,
                                                   "policy_version": [0, 0, 0]}), ErpoRule(), now=0.0)
    assert table["times_residual"].to_list() == [1, 0, 0] and table["all_wrong_streak"].to_list() == [0, 1, 0]
    # RA: -ra_delta for the all-correct group only.
    out = ra_advantages(np.float32(RATES), np.zeros(3, np.float32), ErpoRule(ra_delta=0.5))
    np.testing.assert_array_equal(out, np.float32([-0.5, 0.0, 0.0]))
    # The lake report's per-group frame.
    scored = pl.DataFrame({"group_id": ["g0", "g1", "g2"], "prompt_id": ["p0", "p1", "p2"], "policy_version": [0, 0, 0],
                           "group_pass_rate": np.float32(RATES), "reward": [1.0, 0.0, 0.5],
                           "temperature": np.float32([1, 1, 1]), "_timestamp_ms": [0, 0, 0]})
    g = groups(scored)
    assert g["all_correct"].to_list() == [True, False, False] and g["all_wrong"].to_list() == [False, True, False]
