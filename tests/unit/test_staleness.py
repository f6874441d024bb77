"""The staleness budget (`pipeline.flow.staleness.StalenessBudget`) against hand-computed
capacities and accepted versions; the learner version is a plain argument."""

from __future__ import annotations

import pytest

from pipeline.config import LearnerConfig
from pipeline.flow.staleness import StalenessBudget


def test_capacity_is_max_one_versions_times_groups_per_step():
    # max(1, 2) x 32 = 64 tickets in flight (AReaL's (2 + 1) x 32 = 96 less one version)
    assert StalenessBudget(max_versions=2, groups_per_step=32).capacity == 64
    # max(1, 10) x 4 = 40
    assert StalenessBudget(max_versions=10, groups_per_step=4).capacity == 40
    # max(1, 1) x 8 = 8: one version behind keeps one step in flight, as no staleness does
    assert StalenessBudget(max_versions=1, groups_per_step=8).capacity == 8
    # max(1, 0) x 8 = 8
    assert StalenessBudget(max_versions=0, groups_per_step=8).capacity == 8


@pytest.mark.parametrize("learner_version", [0, 3, 7])
def test_accepted_versions_are_the_last_max_versions_and_the_current(learner_version):
    budget = StalenessBudget(max_versions=2, groups_per_step=4)
    v = learner_version
    # accepted: v - 2 <= b <= v
    assert budget.oldest_accepted(v) == v - 2
    assert [b for b in range(v - 5, v + 3) if budget.accepts(b, v)] == [v - 2, v - 1, v]


def test_the_accepted_window_moves_with_the_learner_version():
    budget = StalenessBudget(max_versions=3, groups_per_step=4)
    # a group sampled at version 5: lag 0..3 at learner versions 5..8, lag 4 at 9
    assert [budget.accepts(5, v) for v in range(4, 10)] == [False, True, True, True, True, False]


def test_lockstep_accepts_only_the_learner_version():
    budget = StalenessBudget(max_versions=0, groups_per_step=6, lockstep=True)
    # capacity max(1, 0) x 6 = 6: one step's tickets; accepted: 4 - 0 <= b <= 4
    assert budget.capacity == 6
    assert [b for b in range(2, 7) if budget.accepts(b, 4)] == [4]
    with pytest.raises(ValueError, match="lockstep needs max_versions = 0, not 1"):
        StalenessBudget(max_versions=1, groups_per_step=6, lockstep=True)


def test_invalid_budgets_are_errors():
    with pytest.raises(ValueError, match="max_versions must be >= 0"):
        StalenessBudget(max_versions=-1, groups_per_step=4)
    with pytest.raises(ValueError, match="groups_per_step must be >= 1"):
        StalenessBudget(max_versions=2, groups_per_step=0)


def test_the_budget_of_the_learner_section():
    lc = LearnerConfig(groups_per_step=16, staleness={"max_versions": 3})
    budget = StalenessBudget.of(lc)
    # max(1, 3) x 16 = 48
    assert (budget.max_versions, budget.groups_per_step, budget.lockstep, budget.capacity) == (3, 16, False, 48)
    assert StalenessBudget.of(LearnerConfig()).capacity == max(1, 2) * LearnerConfig().groups_per_step
