"""Semantic checks of decoded trajectory groups: what the Arrow schema cannot say.

A message that decodes has the right columns and types (`schemas.codec`); it can still be
nonsense: NaN or positive log-probs, one log-prob per token missing, token ids outside the
vocabulary, a sample index twice, a group with fewer rows than its `group_size`, ids that are
empty. Consumers split every delivery into its groups and check them here; a bad group is
dead-lettered whole, with the first reason found, and the good groups of the same message go on.

Pure and vectorised over rows (numpy); the per-group part loops over groups, not rows.
Reason codes are short and stable (they label a metric); the detail says what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas import Columns, Ragged, take

FINISH_REASONS = ("stop", "length")
VERIFY_STATUSES = ("correct", "wrong", "no_answer", "error", "timeout")
MAX_TEMPERATURE = 2.0
LOGPROB_SLACK = 1e-3
"""Log-probs may exceed 0 by float rounding; more than this is not a probability."""


@dataclass(frozen=True)
class Rejected:
    """One group that failed a check: its rows, a reason code and what was wrong."""

    columns: Columns
    code: str
    detail: str

    @property
    def reason(self) -> str:
        return f"invalid_group: {self.code}: {self.detail}"


@dataclass(frozen=True)
class Limits:
    """What the consumer knows beyond the schema; None skips the check."""

    vocab_size: int | None = None
    """Token ids must lie in [0, vocab_size)."""
    max_tokens: int | None = None
    """Prompt + completion tokens of one sample must not exceed this (the model's context)."""
    known_prompts: frozenset[str] | None = None
    """Prompt ids of the training pool."""


def _row_problems(cols: Columns, limits: Limits) -> list[tuple[str, np.ndarray, str]]:
    """(code, bad-row mask, what the check requires) for each row-level check, in order."""
    n = len(cols["traj_id"])
    prompt: Ragged = cols["prompt_token_ids"]
    completion: Ragged = cols["completion_token_ids"]
    logprobs: Ragged = cols["behavior_logprobs"]
    c_len, lp_len, p_len = completion.lengths(), logprobs.lengths(), prompt.lengths()
    checks: list[tuple[str, np.ndarray, str]] = []

    ids = ("traj_id", "group_id", "ticket_id", "prompt_id")
    empty = ~np.logical_and.reduce([cols[name].astype(bool) for name in ids])  # "" is falsy
    checks.append(("missing_id", empty, "traj_id, group_id, ticket_id and prompt_id must be non-empty"))
    checks.append(("logprob_count", c_len != lp_len, "one behaviour log-prob per completion token"))
    row_of_lp = np.repeat(np.arange(n), lp_len)
    lp = np.asarray(logprobs.values, dtype=np.float64)
    nonfinite = np.zeros(n, dtype=bool)
    nonfinite[row_of_lp[~np.isfinite(lp)]] = True
    positive = np.zeros(n, dtype=bool)
    positive[row_of_lp[np.isfinite(lp) & (lp > LOGPROB_SLACK)]] = True
    checks.append(("nonfinite_logprob", nonfinite, "behaviour log-probs must be finite"))
    checks.append(("positive_logprob", positive, f"behaviour log-probs must be <= 0 (+{LOGPROB_SLACK})"))
    checks.append(("empty_prompt", p_len == 0, "prompt_token_ids must be non-empty"))
    out_of_vocab = np.zeros(n, dtype=bool)
    for ragged, lengths in ((prompt, p_len), (completion, c_len)):
        ids = np.asarray(ragged.values, dtype=np.int64)
        bad = ids < 0
        if limits.vocab_size is not None:
            bad |= ids >= limits.vocab_size
        out_of_vocab[np.repeat(np.arange(n), lengths)[bad]] = True
    vocab = f"[0, {limits.vocab_size})" if limits.vocab_size is not None else ">= 0"
    checks.append(("token_out_of_vocab", out_of_vocab, f"token ids must lie in {vocab}"))
    if limits.max_tokens is not None:
        checks.append(("too_long", p_len + c_len > limits.max_tokens,
                       f"prompt + completion must be at most {limits.max_tokens} tokens"))
    temps = np.asarray(cols["temperature"], dtype=np.float64)
    checks.append(("bad_temperature", ~np.isfinite(temps) | (temps < 0) | (temps > MAX_TEMPERATURE),
                   f"temperature must lie in [0, {MAX_TEMPERATURE}]"))
    checks.append(("bad_finish_reason", ~np.isin(cols["finish_reason"].astype(str), FINISH_REASONS),
                   f"finish_reason must be one of {FINISH_REASONS}"))
    checks.append(("bad_policy_version", np.asarray(cols["policy_version"]) < 0, "policy_version must be >= 0"))
    if limits.known_prompts is not None:
        unknown = np.fromiter((p not in limits.known_prompts for p in cols["prompt_id"]), dtype=bool, count=n)
        checks.append(("unknown_prompt", unknown, "prompt_id must belong to the training pool"))
    if "reward" in cols:
        rewards = np.asarray(cols["reward"], dtype=np.float64)
        shaped = np.asarray(cols["shaped_reward"], dtype=np.float64)
        rates = np.asarray(cols["group_pass_rate"], dtype=np.float64)
        checks.append(("bad_reward", ~np.isin(rewards, (0.0, 1.0)) | ~np.isfinite(shaped)
                       | ~(rates >= 0) | ~(rates <= 1),
                       "reward must be 0 or 1, shaped_reward finite, group_pass_rate in [0, 1]"))
        checks.append(("bad_verify_status", ~np.isin(cols["verify_status"].astype(str), VERIFY_STATUSES),
                       f"verify_status must be one of {VERIFY_STATUSES}"))
    return checks


def _group_problem(cols: Columns, rows: np.ndarray) -> tuple[str, str] | None:
    """The first group-level problem of the group made of `rows`, or None."""
    size = np.asarray(cols["group_size"])[rows]
    for name in ("ticket_id", "prompt_id", "policy_version", "group_size", "temperature"):
        values = cols[name][rows]
        if len(set(values.tolist())) != 1:
            return "inconsistent_group", f"{name} differs within the group"
    idx = np.sort(np.asarray(cols["sample_idx"])[rows])
    if len(rows) != size[0] or not np.array_equal(idx, np.arange(size[0])):
        return "incomplete_group", (f"group_size={size[0]} but {len(rows)} rows with sample_idx "
                                    f"{idx[:8].tolist()}{'...' if len(idx) > 8 else ''}")
    if "reward" in cols:
        rewards = np.asarray(cols["reward"], dtype=np.float64)[rows]
        rates = np.asarray(cols["group_pass_rate"], dtype=np.float64)[rows]
        if not np.allclose(rates, rewards.mean(), atol=1e-4):
            return "bad_pass_rate", f"group_pass_rate {rates[0]:.4f} is not the mean reward {rewards.mean():.4f}"
    return None


def check_groups(cols: Columns, limits: Limits = Limits()) -> tuple[list[Columns], list[Rejected]]:
    """Split decoded Trajectory or ScoredTrajectory columns into valid groups (in order of first
    appearance) and rejected ones, each with the first problem found."""
    n = len(cols["traj_id"])
    if n == 0:
        return [], []
    row_code = np.full(n, -1, dtype=np.int64)
    checks = _row_problems(cols, limits)
    for i, (_, bad, _) in enumerate(checks):
        row_code[(row_code < 0) & bad] = i
    _, first, inverse = np.unique(cols["group_id"], return_index=True, return_inverse=True)
    good: list[Columns] = []
    rejected: list[Rejected] = []
    for g in np.argsort(first):
        rows = np.flatnonzero(inverse == g)
        group = take(cols, rows)
        codes = row_code[rows]
        if (codes >= 0).any():
            row = int(rows[np.argmax(codes >= 0)])
            code, _, rule = checks[int(row_code[row])]
            rejected.append(Rejected(group, code, f"sample_idx {int(cols['sample_idx'][row])}: {rule}"))
            continue
        problem = _group_problem(cols, rows)
        if problem is not None:
            rejected.append(Rejected(group, *problem))
            continue
        good.append(group)
    return good, rejected
