"""Semantic checks of decoded messages: what the Arrow schema cannot say.

A message that decodes has the right columns and types (`schemas.codec`); it can still be
nonsense: NaN or positive log-probs, one log-prob per token missing, token ids outside the
vocabulary, a sample index twice, a group with fewer rows than its `group_size`, ids that do not
follow their grammar, temperatures that are NaN or negative. Values are checked here, where they
enter a service, so nothing downstream meets them.

- Trajectory and ScoredTrajectory messages are split into groups (`check_groups`); a bad group is
  dead-lettered whole, with the first reason found, and the good groups of the same message go on.
- PromptTicket, TemperatureUpdate and PolicyUpdate messages are checked whole (`check_message`);
  producers send one row per message.

Ids follow ASCII grammars (`TICKET_ID`, `PROMPT_ID`, `HEX_ID`): Python's `str.isdigit` and
`int()` accept other scripts' digits, so a ticket id with a Unicode digit must be rejected here,
not parsed.

Pure and vectorised over rows (numpy); the per-group part loops over groups, not rows.
Reason codes are short and stable (they label a metric); the detail says what was wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from schemas import POLICY_UPDATE, PROMPT_TICKET, TEMPERATURE_UPDATE, Columns, MessageKind, Ragged, group_rows, take

FINISH_REASONS = ("stop", "length")
VERIFY_STATUSES = ("correct", "wrong", "no_answer", "error", "timeout", "truncated")
TEMPERATURE_REASONS = ("all_correct_raise", "capped", "reactivated", "decay", "clamped")
"""`pipeline.erpo.rule.REASONS` (kept here too: this module imports neither polars nor the ERPO table)."""
MAX_TEMPERATURE = 2.0
"""Highest sampling temperature any engine is asked for (vLLM accepts [0, 2])."""
LOGPROB_SLACK = 1e-3
"""Log-probs may exceed 0 by float rounding; more than this is not a probability."""
MAX_ATTEMPT = 1000
"""A ticket re-issued more often than this is not a lease that expired: it is a forged attempt."""
DTYPES = ("float32", "bfloat16", "float16", "mixed")

TICKET_ID = re.compile(r"e([0-9]{1,9})-([0-9]{1,12})", re.ASCII)
"""``e<epoch>-<place in the epoch>``, ASCII digits only (see `pipeline.flow.tickets.TicketSource`)."""
PROMPT_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}", re.ASCII)
"""Dataset prompt ids (`pipeline.data.tasks.prompt_id_of` gives 16 hex digits)."""
HEX_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
"""Group and trajectory ids: uuid4 hex."""
SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def parse_ticket_id(ticket_id: object) -> tuple[int, int] | None:
    """(epoch, place) of a well-formed ticket id, None for anything else."""
    m = TICKET_ID.fullmatch(ticket_id) if isinstance(ticket_id, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def _bad_ids(values: np.ndarray, grammar: re.Pattern) -> np.ndarray:
    """True per row whose id does not follow `grammar` (checked once per distinct value)."""
    uniq, inverse = np.unique(values.astype(object).astype(str), return_inverse=True)
    bad = np.fromiter((grammar.fullmatch(u) is None for u in uniq), dtype=bool, count=len(uniq))
    return bad[inverse.reshape(-1)]


@dataclass(frozen=True)
class Rejected:
    """One group that failed a check: its rows, a reason code and what was wrong."""

    columns: Columns
    code: str
    detail: str

    @property
    def reason(self) -> str:
        return f"invalid_group: {self.code}: {self.detail}"

    @property
    def message_reason(self) -> str:
        """The reason of a whole message (tickets, temperatures, policies)."""
        return f"invalid_message: {self.code}: {self.detail}"


@dataclass(frozen=True)
class Limits:
    """What the consumer knows beyond the schema; None skips the check."""

    vocab_size: int | None = None
    """Token ids must lie in [0, vocab_size)."""
    max_tokens: int | None = None
    """Prompt + completion tokens of one sample must not exceed this (the model's context)."""
    known_prompts: frozenset[str] | None = None
    """Prompt ids of the training pool."""
    max_chars: int | None = None
    """Longest prompt text a ticket may carry."""


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
    bad_id = (_bad_ids(cols["traj_id"], HEX_ID) | _bad_ids(cols["group_id"], HEX_ID)
              | _bad_ids(cols["ticket_id"], TICKET_ID) | _bad_ids(cols["prompt_id"], PROMPT_ID))
    checks.append(("bad_id", bad_id, "traj_id and group_id must be 32 hex digits, ticket_id e<digits>-<digits>, "
                   "prompt_id 1-128 of [A-Za-z0-9_.:-] (ASCII)"))
    attempt = np.asarray(cols["attempt"])
    checks.append(("bad_attempt", (attempt < 0) | (attempt > MAX_ATTEMPT), f"attempt must lie in [0, {MAX_ATTEMPT}]"))
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
        rates = np.asarray(cols["group_pass_rate"], dtype=np.float64)
        checks.append(("bad_reward", ~np.isin(rewards, (0.0, 1.0)) | ~(rates >= 0) | ~(rates <= 1),
                       "reward must be 0 or 1, group_pass_rate in [0, 1]"))
        statuses = cols["verify_status"].astype(str)
        checks.append(("bad_verify_status", ~np.isin(statuses, VERIFY_STATUSES),
                       f"verify_status must be one of {VERIFY_STATUSES}"))
        checks.append(("bad_verify_status", (statuses == "truncated")
                       & ((cols["finish_reason"].astype(str) != "length") | (rewards != 0.0)),
                       "verify_status 'truncated' needs finish_reason 'length' and reward 0"))
    return checks


def _group_problem(cols: Columns, rows: np.ndarray) -> tuple[str, str] | None:
    """The first group-level problem of the group made of `rows`, or None."""
    size = np.asarray(cols["group_size"])[rows]
    for name in ("ticket_id", "attempt", "prompt_id", "policy_version", "group_size", "temperature"):
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
    good: list[Columns] = []
    rejected: list[Rejected] = []
    for rows in group_rows(cols):
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


def _ticket_problem(cols: Columns, limits: Limits) -> tuple[str, str] | None:
    for i, tid in enumerate(cols["ticket_id"]):
        parsed = parse_ticket_id(tid)
        if parsed is None:
            return "bad_id", f"ticket_id {str(tid)[:40]!r} is not e<digits>-<digits> (ASCII)"
        if parsed[0] != int(cols["epoch"][i]):
            return "inconsistent_ticket", f"ticket_id {tid!r} names epoch {parsed[0]}, the epoch field {cols['epoch'][i]}"
    if _bad_ids(cols["prompt_id"], PROMPT_ID).any():
        return "bad_id", "prompt_id must be 1-128 of [A-Za-z0-9_.:-] (ASCII)"
    attempt = np.asarray(cols["attempt"])
    if ((attempt < 0) | (attempt > MAX_ATTEMPT)).any():
        return "bad_attempt", f"attempt must lie in [0, {MAX_ATTEMPT}]"
    if not all(isinstance(t, str) and t for t in cols["text"]):
        return "empty_prompt", "text must be non-empty"
    if limits.max_chars is not None and max(len(t) for t in cols["text"]) > limits.max_chars:
        return "too_long", f"prompt text longer than {limits.max_chars} characters"
    if not all(isinstance(a, str) and a for a in cols["answer"]):
        return "missing_answer", "answer must be non-empty"
    if (np.asarray(cols["issued_version"]) < 0).any() or not np.isfinite(np.asarray(cols["issued_at"])).all():
        return "bad_value", "issued_version must be >= 0 and issued_at finite"
    return None


def _temperature_problem(cols: Columns, limits: Limits) -> tuple[str, str] | None:
    if _bad_ids(cols["prompt_id"], PROMPT_ID).any():
        return "bad_id", "prompt_id must be 1-128 of [A-Za-z0-9_.:-] (ASCII)"
    temps = np.asarray(cols["temperature"], dtype=np.float64)
    if not (np.isfinite(temps) & (temps >= 0) & (temps <= MAX_TEMPERATURE)).all():
        return "bad_temperature", f"temperature must be finite and in [0, {MAX_TEMPERATURE}], got {temps.tolist()[:4]}"
    if not np.isin(cols["reason"].astype(str), TEMPERATURE_REASONS).all():
        return "bad_reason", f"reason must be one of {TEMPERATURE_REASONS}"
    rates = np.asarray(cols["mean_pass_rate"], dtype=np.float64)
    if ((np.asarray(cols["times_seen"]) < 1).any() or (np.asarray(cols["all_correct_streak"]) < 0).any()
            or not ((rates >= 0) & (rates <= 1)).all() or (np.asarray(cols["decided_at_version"]) < 0).any()
            or not np.isfinite(np.asarray(cols["decided_at"])).all()):
        return "bad_value", ("times_seen must be >= 1, all_correct_streak >= 0, mean_pass_rate in [0, 1], "
                             "decided_at_version >= 0, decided_at finite")
    return None


def _policy_problem(cols: Columns, limits: Limits) -> tuple[str, str] | None:
    if len(cols["version"]) != 1:
        return "bad_value", f"one policy per message, got {len(cols['version'])}"
    version, step = int(cols["version"][0]), int(cols["step"][0])
    if version < 0 or step < 0:
        return "bad_policy_version", f"version ({version}) and step ({step}) must be >= 0"
    if not isinstance(cols["sha256"][0], str) or not SHA256.fullmatch(cols["sha256"][0]):
        return "bad_value", "sha256 must be 64 lowercase hex digits"
    if cols["dtype"][0] not in DTYPES:
        return "bad_value", f"dtype must be one of {DTYPES}"
    uri = cols["uri"][0]
    if not isinstance(uri, str) or not uri or "\x00" in uri or len(uri) > 4096:
        return "bad_uri", "uri must be a non-empty path without NUL bytes"
    if not math.isfinite(float(cols["created_at"][0])):
        return "bad_value", "created_at must be finite"
    return None


_MESSAGE_CHECKS = {PROMPT_TICKET.name: _ticket_problem, TEMPERATURE_UPDATE.name: _temperature_problem,
                   POLICY_UPDATE.name: _policy_problem}


def check_message(kind: MessageKind, cols: Columns, limits: Limits = Limits()) -> Rejected | None:
    """The first problem of a whole PromptTicket, TemperatureUpdate or PolicyUpdate message, or
    None if it may be used. (Policy weights are checked against the disk when they are loaded:
    `pipeline.model.weights.verify_published`.)"""
    problem = _MESSAGE_CHECKS[kind.name](cols, limits)
    return None if problem is None else Rejected(cols, *problem)
