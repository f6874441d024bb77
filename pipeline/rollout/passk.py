"""pass@k and the other measures of what a policy can solve with a sampling budget, as pure
functions of per-problem counts and samples (the generation is `pipeline.rollout.evaluate`).

- `pass_at_k`: the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models
  Trained on Code"): from ``n`` samples of a problem of which ``c`` are correct, the probability
  that at least one of ``k`` samples drawn without replacement is correct,
  ``1 - C(n - c, k) / C(n, k)``, computed as the product ``prod_{i=n-c+1}^{n} (1 - k / i)`` so it
  never forms large binomials. The mean over problems is the pass@k of the policy.
- `solved_beyond`: problems the policy solved at least once that the base model never solved with
  the same number of samples (RAPO's claim: reverse KL keeps a policy inside the base model's
  support, forward KL to a reward-reweighted reference lets it leave).
- `final_answer`, `distinct_answers`: how many different final answers a problem's samples give
  (diversity of what is said, not of how).
- `entropy_estimate`: mean per-token entropy of the sampling distribution, estimated by the mean
  negative log-probability of the sampled tokens (``E[-log p(y)] = H(p)`` for ``y ~ p``: unbiased,
  and it needs only what the engine returns).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

POWERS_OF_TWO = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def pass_at_k(n: int, c: int | np.ndarray, k: int) -> float | np.ndarray:
    """Unbiased pass@k of problems with ``c`` correct out of ``n`` samples (``c`` may be an array
    of per-problem counts); needs ``1 <= k <= n``."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={n}")
    c = np.asarray(c)
    if np.any(c < 0) or np.any(c > n):
        raise ValueError(f"correct counts must lie in [0, {n}]")
    # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i), and exactly 1 when n - c < k.
    # suffix[c] = sum of log(1 - k/i) over the c largest i; the terms with i <= k only ever enter
    # the sums of counts with n - c < k, whose value is 1 regardless.
    ratio = k / np.arange(n, 0, -1, dtype=np.float64)  # i = n, n-1, ..., 1
    logs = np.full(n, -np.inf)
    np.log1p(-ratio, out=logs, where=ratio < 1)
    suffix = np.concatenate([[0.0], np.cumsum(logs)])
    out = np.where(n - c < k, 1.0, 1.0 - np.exp(suffix[c]))
    return float(out) if out.ndim == 0 else out


def pass_at_k_curve(correct: np.ndarray, n: int, ks: Sequence[int] = POWERS_OF_TWO) -> dict[int, float]:
    """Mean pass@k over problems (``correct``: per-problem counts out of ``n``) for every ``k`` in
    ``ks`` not above ``n``."""
    correct = np.asarray(correct)
    return {k: float(np.mean(pass_at_k(n, correct, k))) for k in ks if k <= n}


def solved_beyond(base_correct: np.ndarray, policy_correct: np.ndarray) -> int:
    """Problems the policy solved at least once and the base model never did (same problems, in
    the same order, and the same number of samples each)."""
    base_correct, policy_correct = np.asarray(base_correct), np.asarray(policy_correct)
    if base_correct.shape != policy_correct.shape:
        raise ValueError(f"base and policy counts differ in shape: {base_correct.shape} vs {policy_correct.shape}")
    return int(np.sum((policy_correct > 0) & (base_correct == 0)))


_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str:
    """What a completion answers: the last ``\\boxed{...}``, else the last number, else the
    stripped text (whitespace collapsed)."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", "")
    return " ".join(text.split())


def distinct_answers(groups: Sequence[Sequence[str]]) -> float:
    """Mean number of distinct final answers per group of completions."""
    if not groups:
        return float("nan")
    return float(np.mean([len({final_answer(t) for t in g}) for g in groups]))


def entropy_estimate(logprobs: Sequence[np.ndarray]) -> float:
    """Mean per-token entropy (nats) of the sampling distribution, from the log-probabilities of
    sampled tokens (at the sampling temperature)."""
    tokens = [np.asarray(lp, dtype=np.float64) for lp in logprobs if len(lp)]
    if not tokens:
        return float("nan")
    return float(-np.concatenate(tokens).mean())
