"""A small batch of scored groups and a tiny model for the learning-step tests (the unit tests and
the multi-rank script share them)."""

from __future__ import annotations

import numpy as np

from factories import scored_group
from pipeline.model.policy import build_tiny
from schemas import Ragged

V = 29


def batch_groups(n_groups: int = 4, size: int = 3, seed: int = 0, one_prompt: bool = False) -> list[dict]:
    """Whole ScoredTrajectory groups of random tokens, completions of varied length (one empty).
    Each row has its own random prompt, or with ``one_prompt`` each group's rows share one (as
    the rollout's groups do)."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        prompts = [rng.integers(3, V, int(rng.integers(2, 6))).tolist() for _ in range(size)]
        if one_prompt:
            prompts = [prompts[0]] * size
        comps = [rng.integers(3, V, int(rng.integers(0 if g == 0 else 1, 7))).tolist() for _ in range(size)]
        cols = scored_group(rng.integers(0, 2, size).astype(float).tolist(), ticket_id=f"e0-{g:06d}",
                            prompt_id=f"p{g}", completions=comps, texts=["x"] * size,
                            temperature=0.8 + 0.2 * g)
        cols["prompt_token_ids"] = Ragged.from_list(prompts, np.int32)
        cols["behavior_logprobs"] = Ragged.from_list([(-rng.random(len(c)) * 3).tolist() for c in comps], np.float32)
        groups.append(cols)
    return groups


def tiny_model(seed: int = 0):
    return build_tiny("qwen2", V, hidden_size=16, layers=2, heads=2, kv_heads=1, intermediate_size=32, seed=seed)
