"""Prompt sources: the synthetic arithmetic task (the embedded default) and local JSONL/Parquet sets.

The arithmetic task exists so that the whole system can train something real on a laptop CPU in
minutes, with no model or dataset hub: prompts like ``37+5-12=`` whose answer is an integer the
verifier can check. ``difficulty`` is the knob: it sets how many operands and digits a problem has.

A problem's ``prompt_id`` is a hash of its text, and the held-out split is decided by that hash, so
train and evaluation prompts are disjoint by construction and stable across runs and machines.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import RunConfig


@dataclass(frozen=True)
class Problem:
    """One prompt with its verifiable reference answer."""

    prompt_id: str
    text: str
    answer: str
    difficulty: int = 0


def prompt_id_of(text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of the sha256 of its text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_heldout(prompt_id: str, heldout_per_mille: int = 100) -> bool:
    """Whether a prompt belongs to the held-out split (decided by its id, so stable everywhere)."""
    return int(prompt_id[:8], 16) % 1000 < heldout_per_mille


# difficulty -> (operand count range, digit count range of each operand); inclusive bounds.
# Chains of one-digit operands are what a tiny transformer learns fastest (a signed sum is a
# linear read-out); more operands make it harder, more digits much harder (carries).
DIFFICULTY_LEVELS: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
    1: ((2, 2), (1, 1)),
    2: ((3, 3), (1, 1)),
    3: ((4, 4), (1, 1)),
    4: ((5, 5), (1, 1)),
    5: ((2, 3), (1, 2)),
}


def _make_problem(rng: np.random.Generator, difficulty: int, ops: str) -> Problem:
    (k_lo, k_hi), (d_lo, d_hi) = DIFFICULTY_LEVELS[difficulty]
    k = int(rng.integers(k_lo, k_hi + 1))
    digits = rng.integers(d_lo, d_hi + 1, size=k)
    values = [int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10**d)) for d in digits]
    signs = [ops[int(i)] for i in rng.integers(0, len(ops), size=k - 1)]
    text = str(values[0]) + "".join(f"{s}{v}" for s, v in zip(signs, values[1:])) + "="
    total = values[0] + sum(v if s == "+" else -v for s, v in zip(signs, values[1:]))
    return Problem(prompt_id_of(text), text, str(total), difficulty)


def _level_weights(difficulties: dict[int, float], known, what: str) -> tuple[list[int], np.ndarray]:
    """The levels (each checked against ``known``) and their sampling probabilities."""
    levels = sorted(difficulties)
    for d in levels:
        if d not in known:
            raise ValueError(f"unknown {what} {d}; known: {sorted(known)}")
    weights = np.array([difficulties[d] for d in levels], dtype=np.float64)
    return levels, weights / weights.sum()


def _draws(seed: int, difficulties: dict[int, float], ops: str):
    """Endless problems (either split), each of a difficulty drawn with the given weights."""
    levels, weights = _level_weights(difficulties, DIFFICULTY_LEVELS, "difficulty")
    rng = np.random.default_rng(seed)
    while True:
        yield _make_problem(rng, levels[int(rng.choice(len(levels), p=weights))], ops)


def arithmetic_problems(
    n: int,
    seed: int,
    difficulties: dict[int, float],
    ops: str = "+-",
    split: str = "train",
    heldout_per_mille: int = 100,
) -> list[Problem]:
    """``n`` distinct problems of the given split, difficulty drawn with the given weights."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    draws = _draws(seed, difficulties, ops)
    out: dict[str, Problem] = {}
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} problems; the task is too small")
        p = next(draws)
        if is_heldout(p.prompt_id, heldout_per_mille) == (split == "heldout"):
            out.setdefault(p.prompt_id, p)
    return list(out.values())


def arithmetic_stream(seed: int, difficulties: dict[int, float], ops: str = "+-",
                      heldout_per_mille: int = 100):
    """Endless training problems (held-out ones skipped), for supervised warm-start."""
    return (p for p in _draws(seed, difficulties, ops) if not is_heldout(p.prompt_id, heldout_per_mille))


# Word problems: a chat model's arithmetic in the words it was trained on. Level -> one template
# (a question in plain English and its integer answer). Names and items are drawn from fixed lists,
# numbers from small ranges, so the set is large (tens of thousands of distinct problems per level)
# and every answer is a positive integer.
_NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Omar", "Sara", "Leo", "Nina", "Raj", "Eva")
_ITEMS = ("apples", "pencils", "cards", "books", "marbles", "stickers", "cookies", "coins", "stamps", "shells")


def _word_problem(rng: np.random.Generator, level: int) -> tuple[str, int]:
    def pick(options):
        return options[int(rng.integers(len(options)))]

    name, other, item = pick(_NAMES), pick(_NAMES), pick(_ITEMS)
    while other == name:
        other = pick(_NAMES)
    if level == 1:  # add
        a, b = int(rng.integers(2, 21)), int(rng.integers(2, 21))
        return f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?", a + b
    if level == 2:  # take away
        a = int(rng.integers(5, 31))
        b = int(rng.integers(1, a))
        return (f"{name} has {a} {item} and gives {b} of them to {other}. How many {item} does {name} have left?",
                a - b)
    if level == 3:  # multiply
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
        return (f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have in all?",
                a * b)
    if level == 4:  # two steps
        a, b = int(rng.integers(5, 21)), int(rng.integers(2, 16))
        c = int(rng.integers(1, a + b))
        return (f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {other}. How many {item} "
                f"does {name} have now?", a + b - c)
    if level == 5:  # share equally
        each, k = int(rng.integers(2, 10)), int(rng.integers(2, 7))
        return (f"{name} shares {each * k} {item} equally among {k} friends. How many {item} does each friend "
                "get?", each)
    raise ValueError(f"unknown word-problem level {level}; known: {sorted(WORD_LEVELS)}")


WORD_LEVELS = {1: "add", 2: "take away", 3: "multiply", 4: "two steps", 5: "share equally"}


def word_problems(n: int, seed: int, difficulties: dict[int, float], split: str = "train",
                  heldout_per_mille: int = 100) -> list[Problem]:
    """``n`` distinct word problems of the given split (by prompt-id hash, like `arithmetic_problems`),
    each of a level drawn with the given weights (`WORD_LEVELS`)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    levels, weights = _level_weights(difficulties, WORD_LEVELS, "word-problem level")
    rng = np.random.default_rng(seed)
    out: dict[str, Problem] = {}
    for _ in range(50 * n + 1000):
        if len(out) == n:
            break
        level = levels[int(rng.choice(len(levels), p=weights))]
        text, answer = _word_problem(rng, level)
        pid = prompt_id_of(text)
        if is_heldout(pid, heldout_per_mille) == (split == "heldout"):
            out.setdefault(pid, Problem(pid, text, str(answer), level))
    if len(out) < n:
        raise ValueError(f"could not draw {n} distinct {split} word problems")
    return list(out.values())


_GSM8K_ANSWER = re.compile(r".*####\s*(.+?)\s*$", re.S)  # the text after the last ####


def load_problems(path: str | Path, question_field: str = "question",
                  answer_field: str = "answer", limit: int | None = None) -> list[Problem]:
    """Problems from a local JSONL or Parquet file (never from a hub).

    The answer field may be a bare answer (MATH-500's ``answer``) or a GSM8K worked solution ending
    in ``#### <answer>``, in which case the part after ``####`` is the reference answer.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.suffix == ".parquet":
        import polars as pl

        rows = pl.read_parquet(path).to_dicts()
    elif path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"unsupported dataset format {path.suffix!r} (use .jsonl or .parquet)")
    problems = []
    for i, row in enumerate(rows[:limit] if limit is not None else rows):
        for field in (question_field, answer_field):
            if field not in row:
                raise KeyError(f"{path}: row {i} has no field {field!r} (fields: {sorted(row)})")
        answer = str(row[answer_field])
        m = _GSM8K_ANSWER.search(answer)
        if m:
            answer = m.group(1).replace(",", "")
        text = str(row[question_field])
        problems.append(Problem(prompt_id_of(text), text, answer))
    return problems


def train_problems(cfg: RunConfig) -> list[Problem]:
    """The training prompt pool of the run."""
    t = cfg.task
    if t.kind == "arithmetic":
        return arithmetic_problems(t.train_pool, cfg.seed, t.difficulty_weights_map(), t.ops,
                                   "train", t.heldout_per_mille)
    if t.kind == "word_problems":
        return word_problems(t.train_pool, cfg.seed, t.difficulty_weights_map(), "train", t.heldout_per_mille)
    return load_problems(t.train_path, t.question_field, t.answer_field, t.limit)


def heldout_problems(cfg: RunConfig) -> list[Problem]:
    """The held-out problems of the run's before/after evaluation (`task.eval_size` of them)."""
    t = cfg.task
    if t.kind == "arithmetic":
        return arithmetic_problems(t.eval_size, cfg.seed + 1, t.difficulty_weights_map(), t.ops,
                                   "heldout", t.heldout_per_mille)
    if t.kind == "word_problems":
        return word_problems(t.eval_size, cfg.seed + 1, t.difficulty_weights_map(), "heldout", t.heldout_per_mille)
    if t.eval_path is None:
        raise ValueError("task.eval_path is not set: this run has no held-out problems")
    return load_problems(t.eval_path, t.question_field, t.answer_field)[: t.eval_size]
