"""Held-out evaluation: accuracy of a policy on problems it never trained on.

Accuracy is the mean verifier reward over held-out problems: greedy decoding (one sample at
temperature 0) and sampled pass@1 (mean over ``samples`` samples at ``temperature``), the latter
being what RL optimises and what the rollout engine generates with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.data.tasks import Problem
from pipeline.rollout.engine import TorchEngine
from pipeline.verify.verifier import verify_one


@dataclass(frozen=True)
class EvalResult:
    greedy_accuracy: float
    sampled_accuracy: float
    """Mean pass@1 over ``samples`` samples per problem at ``temperature``."""
    problems: int
    samples: int
    temperature: float


def accuracy(engine: TorchEngine, problems: Sequence[Problem], temperature: float, samples: int,
             batch: int = 256) -> float:
    """Mean verifier reward of ``samples`` completions per problem."""
    rewards = []
    for i in range(0, len(problems), batch):
        chunk = problems[i: i + batch]
        out = engine.generate([p.text for p in chunk], [temperature] * len(chunk), samples)
        rewards += [verify_one(s.text, chunk[s.prompt_index].answer, signal_timeout_s=None).reward
                    for s in out]
    return float(np.mean(rewards)) if rewards else float("nan")


def evaluate(engine: TorchEngine, problems: Sequence[Problem], temperature: float = 1.0,
             samples: int = 4, batch: int = 256) -> EvalResult:
    return EvalResult(
        greedy_accuracy=accuracy(engine, problems, 0.0, 1, batch),
        sampled_accuracy=accuracy(engine, problems, temperature, samples, batch),
        problems=len(problems),
        samples=samples,
        temperature=temperature,
    )
