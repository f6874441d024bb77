"""How far the rollout engine's behaviour log-probs are from the learner's on the same tokens and
weights: pure functions of the two per-token arrays.

The learner's importance weights are ``exp(log pi - log mu)``. With the same weights, an engine
that samples from exactly the distribution the learner computes gives log mu = log pi up to float
rounding; anything more (a different dtype, kernel or temperature handling) is off-policy noise
the learner's truncated importance sampling absorbs. `logprob_agreement` reports it:

- ``mean_abs`` and ``max_abs``: mean and largest |log mu - log pi| over the tokens;
- ``kl_k1``: ``mean(log mu - log pi)``, an unbiased estimate of KL(mu || pi) from tokens sampled
  from mu (it can come out negative on few tokens);
- ``kl_k3``: ``mean(r - 1 - log r)`` with ``r = pi / mu``, the low-variance non-negative estimate
  of the same KL (Schulman's k3);
- ``tokens``: how many tokens were compared.
"""

from __future__ import annotations

import numpy as np


def logprob_agreement(behavior_logprobs: np.ndarray, learner_logprobs: np.ndarray) -> dict[str, float]:
    """See the module docstring. Both arrays hold one log-prob per sampled token, in the same order."""
    mu = np.asarray(behavior_logprobs, dtype=np.float64)
    pi = np.asarray(learner_logprobs, dtype=np.float64)
    if mu.shape != pi.shape:
        raise ValueError(f"{mu.shape} behaviour log-probs against {pi.shape} learner log-probs")
    if mu.size == 0:
        raise ValueError("no tokens to compare")
    if not (np.isfinite(mu).all() and np.isfinite(pi).all()):
        raise ValueError("non-finite log-probs")
    diff = mu - pi
    log_r = -diff
    return {"mean_abs": float(np.abs(diff).mean()), "max_abs": float(np.abs(diff).max()),
            "kl_k1": float(diff.mean()), "kl_k3": float((np.exp(log_r) - 1.0 - log_r).mean()),
            "tokens": int(mu.size)}
