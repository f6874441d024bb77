"""The staleness budget: which behaviour-policy versions the learner trains on, and how many
tickets it keeps in flight so that the groups it gets back are mostly within that bound.

`StalenessBudget` is the rule, with no I/O and no clock: the learner service asks it for its
ticket capacity, and the intake (`pipeline.flow.intake.triage`) asks it whether a group is stale.
It departs from AReaL's capacity rule ``(max_staleness + 1) x batch`` by one version, because our
rollout's behaviour version trails the learner's by up to one.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import LearnerConfig


@dataclass(frozen=True)
class StalenessBudget:
    """With learner version v, ``max_versions`` m and ``groups_per_step`` G:

    - a group sampled with behaviour policy version b is accepted iff

          v - m <= b <= v          (its lag v - b is at most m)

      (b > v is a forged or foreign group, which the intake dead-letters before asking here);
    - tickets in flight (issued, not yet decided) stay within

          capacity = max(1, m) x G

      so at most one step's tickets when m = 0.

    ``lockstep`` (synchronous training) needs m = 0: only groups sampled with the learner's own
    version are accepted, one step's tickets are in flight, and the rollout waits for the weights
    a ticket was issued at (`services.rollout`).
    """

    max_versions: int
    """`learner.staleness.max_versions` (m)."""
    groups_per_step: int
    """`learner.groups_per_step` (G)."""
    lockstep: bool = False
    """`learner.staleness.lockstep`."""

    def __post_init__(self) -> None:
        if self.max_versions < 0:
            raise ValueError(f"max_versions must be >= 0, got {self.max_versions}")
        if self.groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1, got {self.groups_per_step}")
        if self.lockstep and self.max_versions != 0:
            raise ValueError(f"lockstep needs max_versions = 0, not {self.max_versions}")

    @classmethod
    def of(cls, lc: LearnerConfig) -> StalenessBudget:
        """The budget of the `learner` section."""
        return cls(lc.staleness.max_versions, lc.groups_per_step, lc.staleness.lockstep)

    @property
    def capacity(self) -> int:
        """Tickets in flight at most: max(1, m) x G."""
        return max(1, self.max_versions) * self.groups_per_step

    def oldest_accepted(self, learner_version: int) -> int:
        """The oldest behaviour version accepted at ``learner_version``: v - m."""
        return learner_version - self.max_versions

    def accepts(self, behavior_version: int, learner_version: int) -> bool:
        """Whether a group sampled with ``behavior_version`` is trained on at ``learner_version``:
        v - m <= b <= v."""
        return self.oldest_accepted(learner_version) <= behavior_version <= learner_version
