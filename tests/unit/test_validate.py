"""Semantic checks of decoded groups: each broken field gets its own reason, good groups pass."""

from __future__ import annotations

import numpy as np
import pytest

from factories import policy_update, scored_group, temperature_update, ticket, trajectory_group
from pipeline.flow.validate import MAX_ATTEMPT, Limits, check_groups, check_message, parse_ticket_id
from schemas import POLICY_UPDATE, PROMPT_TICKET, TEMPERATURE_UPDATE, Ragged, concat


def _codes(cols, limits: Limits = Limits()) -> list[str]:
    good, rejected = check_groups(cols, limits)
    return [r.code for r in rejected]


def test_valid_groups_pass_in_order():
    a, b = trajectory_group("e0-000001", "p1"), scored_group([1, 0, 0], ticket_id="e0-000002", prompt_id="p2")
    good, rejected = check_groups(a)
    assert rejected == [] and len(good) == 1
    good, rejected = check_groups(b, Limits(vocab_size=20, max_tokens=16, known_prompts=frozenset({"p2"})))
    assert rejected == [] and len(good) == 1
    # two groups in one message, interleaved rows
    c = concat([trajectory_group("e0-000003", "p3", size=2), trajectory_group("e0-000004", "p4", size=2)])
    order = np.array([0, 2, 1, 3])
    c = {k: (Ragged.from_list([v[i] for i in order], v.values.dtype) if isinstance(v, Ragged) else v[order])
         for k, v in c.items()}
    good, rejected = check_groups(c)
    assert [g["ticket_id"][0] for g in good] == ["e0-000003", "e0-000004"] and not rejected
    assert all(len(g["traj_id"]) == 2 for g in good)


def _with(cols, name, value):
    cols = dict(cols)
    cols[name] = value
    return cols


@pytest.mark.parametrize("field, value, code", [
    ("ticket_id", np.array(["", "", "", ""], dtype=object), "missing_id"),
    ("behavior_logprobs", Ragged.from_list([[-0.5, -0.1], [-0.5], [-0.5, -0.5], [-0.5, -0.5]], np.float32),
     "logprob_count"),
    ("behavior_logprobs", Ragged.from_list([[-0.5, np.nan]] + [[-0.5, -0.5]] * 3, np.float32), "nonfinite_logprob"),
    ("behavior_logprobs", Ragged.from_list([[-0.5, -np.inf]] + [[-0.5, -0.5]] * 3, np.float32), "nonfinite_logprob"),
    ("behavior_logprobs", Ragged.from_list([[0.5, -0.5]] + [[-0.5, -0.5]] * 3, np.float32), "positive_logprob"),
    ("prompt_token_ids", Ragged.from_list([[]] + [[1, 2]] * 3, np.int32), "empty_prompt"),
    ("completion_token_ids", Ragged.from_list([[7, -1]] + [[7, 2]] * 3, np.int32), "token_out_of_vocab"),
    ("temperature", np.full(4, np.nan, dtype=np.float32), "bad_temperature"),
    ("temperature", np.full(4, 3.0, dtype=np.float32), "bad_temperature"),
    ("finish_reason", np.array(["stop", "eos", "stop", "stop"], dtype=object), "bad_finish_reason"),
    ("policy_version", np.full(4, -1, dtype=np.int64), "bad_policy_version"),
    ("sample_idx", np.array([0, 1, 1, 3], dtype=np.int32), "incomplete_group"),
    ("group_size", np.full(4, 8, dtype=np.int32), "incomplete_group"),
    ("prompt_id", np.array(["p0", "p0", "p1", "p0"], dtype=object), "inconsistent_group"),
])
def test_each_problem_has_its_reason(field, value, code):
    assert _codes(_with(trajectory_group(), field, value)) == [code]


def test_limits_vocabulary_length_and_prompt_pool():
    big = trajectory_group(completions=[[7, 2], [7, 25], [7, 2], [7, 2]])
    assert _codes(big) == []
    assert _codes(big, Limits(vocab_size=20)) == ["token_out_of_vocab"]
    assert _codes(trajectory_group(), Limits(max_tokens=5)) == ["too_long"]  # 4 prompt + 2 completion
    assert _codes(trajectory_group(prompt_id="zz"), Limits(known_prompts=frozenset({"p0"}))) == ["unknown_prompt"]


def test_empty_completion_is_valid():
    # an empty completion is a legitimate sample (the verifier says no_answer), not bad input
    assert _codes(trajectory_group(completions=[[], [7], [7, 2], []])) == []


def test_scored_checks():
    g = scored_group([1, 0, 1, 1])
    assert _codes(_with(g, "reward", np.array([1, 0.5, 1, 1], dtype=np.float32))) == ["bad_reward"]
    assert _codes(_with(g, "group_pass_rate", np.full(4, 0.5, dtype=np.float32))) == ["bad_pass_rate"]
    assert _codes(_with(g, "verify_status", np.array(["correct", "maybe", "correct", "correct"], dtype=object))) \
        == ["bad_verify_status"]
    # "truncated" (rollout.overlong = "zero_reward") only for a completion cut at the length limit, with reward 0
    cut = _with(g, "finish_reason", np.array(["stop", "length", "stop", "stop"], dtype=object))
    assert _codes(_with(cut, "verify_status", np.array(["correct", "truncated", "correct", "correct"],
                                                       dtype=object))) == []
    assert _codes(_with(cut, "verify_status", np.array(["truncated", "wrong", "correct", "correct"],
                                                       dtype=object))) == ["bad_verify_status"]


def test_one_bad_group_does_not_take_the_others():
    bad = trajectory_group("e0-000009", "p9")
    bad = _with(bad, "behavior_logprobs", Ragged.from_list([[np.nan, -1]] * 4, np.float32))
    good, rejected = check_groups(concat([trajectory_group("e0-000001"), bad, trajectory_group("e0-000002")]))
    assert [g["ticket_id"][0] for g in good] == ["e0-000001", "e0-000002"]
    assert len(rejected) == 1 and rejected[0].columns["ticket_id"][0] == "e0-000009"
    assert rejected[0].reason.startswith("invalid_group: nonfinite_logprob: sample_idx 0")


@pytest.mark.parametrize("field, value, code", [
    ("ticket_id", "e0-00000\u0663", "bad_id"),  # an Arabic-Indic digit: isdigit() and int() accept it
    ("ticket_id", "e0-1 ", "bad_id"),
    ("prompt_id", "p\u00e9", "bad_id"),
    ("group_id", "G" * 32, "bad_id"),
])
def test_ids_follow_their_ascii_grammar(field, value, code):
    g = trajectory_group()
    g[field] = np.full(len(g[field]), value, dtype=object)
    assert _codes(g) == [code]


def test_attempts_are_bounded_and_shared_by_the_group():
    assert _codes(trajectory_group(attempt=MAX_ATTEMPT + 1)) == ["bad_attempt"]
    g = trajectory_group()
    g["attempt"] = np.array([0, 0, 1, 0], dtype=np.int32)
    assert _codes(g) == ["inconsistent_group"]


def _message(kind, cols):
    r = check_message(kind, cols)
    return None if r is None else r.code


def test_whole_messages_are_checked():
    assert _message(PROMPT_TICKET, ticket()) is None
    assert _message(PROMPT_TICKET, ticket(ticket_id="e\u0661-000001")) == "bad_id"
    assert _message(PROMPT_TICKET, ticket(ticket_id="e3-000001", epoch=0)) == "inconsistent_ticket"
    assert _message(PROMPT_TICKET, ticket(attempt=-1)) == "bad_attempt"
    assert _message(PROMPT_TICKET, ticket(text="")) == "empty_prompt"
    assert check_message(PROMPT_TICKET, ticket(text="x" * 11), Limits(max_chars=10)).code == "too_long"
    assert _message(PROMPT_TICKET, ticket(answer="")) == "missing_answer"
    assert _message(TEMPERATURE_UPDATE, temperature_update()) is None
    for bad in (np.nan, np.inf, -0.5, 2.5):
        assert _message(TEMPERATURE_UPDATE, temperature_update(temperature=bad)) == "bad_temperature"
    assert _message(TEMPERATURE_UPDATE, temperature_update(reason="because")) == "bad_reason"
    assert _message(POLICY_UPDATE, policy_update()) is None
    assert _message(POLICY_UPDATE, policy_update(version=-3)) == "bad_policy_version"
    assert _message(POLICY_UPDATE, policy_update(sha256="xyz")) == "bad_value"
    assert _message(POLICY_UPDATE, policy_update(uri="/a\x00b")) == "bad_uri"
    two = {k: np.concatenate([v, v]) for k, v in policy_update().items()}
    assert _message(POLICY_UPDATE, two) == "bad_value"


def test_parse_ticket_id():
    assert parse_ticket_id("e12-000034") == (12, 34)
    assert parse_ticket_id("e1-\u0661") is None and parse_ticket_id(None) is None and parse_ticket_id("e-1") is None
