"""Held-out evaluation: accuracy of a policy on problems it never trained on.

Accuracy is the mean verifier reward over held-out problems: greedy decoding (one sample at
temperature 0) and sampled pass@1 (mean over ``samples`` samples at ``temperature``), the latter
being what RL optimises and what the rollout engine generates with. `sample_budget` draws ``n``
samples per problem for pass@k, solved-beyond-base and diversity (`pipeline.rollout.passk`).
`by_style` splits accuracy by a style of completion (the demo task: worked solution or terse answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from pipeline.data.tasks import Problem
from pipeline.rollout.engine import TorchEngine
from pipeline.rollout.passk import POWERS_OF_TWO, distinct_answers, entropy_estimate, pass_at_k_curve
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
             batch: int = 256, progress: Callable[[str], None] | None = None) -> float:
    """Mean verifier reward of ``samples`` completions per problem; ``progress`` hears of each batch."""
    rewards = []
    for i in range(0, len(problems), batch):
        chunk = problems[i: i + batch]
        out = engine.generate([p.text for p in chunk], [temperature] * len(chunk), samples)
        rewards += [verify_one(s.text, chunk[s.prompt_index].answer, signal_timeout_s=None).reward
                    for s in out]
        if progress is not None:
            progress(f"{'greedy' if temperature == 0 else f'T={temperature} x {samples}'}: "
                     f"{min(i + batch, len(problems))}/{len(problems)} problems, mean reward {np.mean(rewards):.3f}")
    return float(np.mean(rewards)) if rewards else float("nan")


def evaluate(engine: TorchEngine, problems: Sequence[Problem], temperature: float = 1.0,
             samples: int = 4, batch: int = 256, progress: Callable[[str], None] | None = None) -> EvalResult:
    return EvalResult(
        greedy_accuracy=accuracy(engine, problems, 0.0, 1, batch, progress),
        sampled_accuracy=accuracy(engine, problems, temperature, samples, batch, progress),
        problems=len(problems),
        samples=samples,
        temperature=temperature,
    )


def by_style(engine: TorchEngine, problems: Sequence[Problem], temperature: float, samples: int,
             style: Callable[[str], str], batch: int = 256) -> dict[str, dict[str, float]]:
    """Per completion style (``style(text)`` names it, e.g. worked solution or terse answer): its
    share of the ``samples`` completions per problem at ``temperature`` (0: greedy) and their
    accuracy."""
    counts: dict[str, list[float]] = {}
    for i in range(0, len(problems), batch):
        chunk = problems[i: i + batch]
        for s in engine.generate([p.text for p in chunk], [temperature] * len(chunk), samples):
            reward = verify_one(s.text, chunk[s.prompt_index].answer, signal_timeout_s=None).reward
            counts.setdefault(style(s.text), []).append(reward)
    total = sum(len(v) for v in counts.values())
    return {k: {"share": len(v) / total, "accuracy": sum(v) / len(v)} for k, v in sorted(counts.items())}


@dataclass(frozen=True)
class BudgetResult:
    """What ``n`` samples per problem show (`sample_budget`)."""

    correct: np.ndarray
    """Correct samples per problem (int, one per problem, in order): keep it to count problems
    solved beyond another policy's (`pipeline.rollout.passk.solved_beyond`)."""
    samples: int
    temperature: float
    pass_at: dict[int, float]
    """Unbiased pass@k for k = 1, 2, 4, ... up to ``samples``."""
    distinct_answers: float
    """Mean distinct final answers per problem's samples."""
    entropy: float
    """Mean per-token entropy (nats) of the sampling distribution, estimated from sampled tokens."""
    tokens: int
    """Completion tokens sampled."""

    def summary(self) -> dict:
        return {"samples": self.samples, "temperature": self.temperature,
                **{f"pass@{k}": v for k, v in self.pass_at.items()}, "solved_any": int((self.correct > 0).sum()),
                "distinct_answers": self.distinct_answers, "entropy": self.entropy, "tokens": self.tokens}


def sample_budget(engine: TorchEngine, problems: Sequence[Problem], n: int, temperature: float = 1.0,
                  batch: int = 64) -> BudgetResult:
    """``n`` samples per problem at ``temperature``: per-problem correct counts, pass@k,
    diversity of final answers and token entropy."""
    correct = np.zeros(len(problems), dtype=np.int64)
    texts: list[list[str]] = [[] for _ in problems]
    logprobs, tokens = [], 0
    for i in range(0, len(problems), batch):
        chunk = problems[i: i + batch]
        for s in engine.generate([p.text for p in chunk], [temperature] * len(chunk), n):
            j = i + s.prompt_index
            correct[j] += verify_one(s.text, problems[j].answer, signal_timeout_s=None).reward == 1.0
            texts[j].append(s.text)
            logprobs.append(s.behavior_logprobs)
            tokens += len(s.completion_token_ids)
    return BudgetResult(correct=correct, samples=n, temperature=temperature,
                        pass_at=pass_at_k_curve(correct, n, POWERS_OF_TWO), distinct_answers=distinct_answers(texts),
                        entropy=entropy_estimate(logprobs), tokens=tokens)
