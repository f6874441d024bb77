"""Prompt sources: the arithmetic task's answers and splits, and local JSONL/Parquet loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.data.tasks import (
    DIFFICULTY_LEVELS,
    Problem,
    arithmetic_problems,
    is_heldout,
    load_problems,
    prompt_id_of,
)

ALL_LEVELS = {d: 1.0 for d in DIFFICULTY_LEVELS}


def _evaluate(text: str) -> int:
    """Value of ``a+b-c=``: digits and +/- only, left to right; anything else is an error."""
    m = re.fullmatch(r"(\d+)((?:[+-]\d+)*)=", text)
    assert m, f"not a +/- chain: {text!r}"
    total = int(m.group(1))
    for sign, digits in re.findall(r"([+-])(\d+)", m.group(2)):
        total += int(digits) if sign == "+" else -int(digits)
    return total


def test_evaluate_helper():
    assert _evaluate("12+34-5=") == 41  # 12 + 34 = 46, 46 - 5 = 41
    assert _evaluate("3-9=") == -6


def test_arithmetic_answers_are_right():
    problems = arithmetic_problems(300, seed=1, difficulties=ALL_LEVELS)
    assert len(problems) == 300
    for p in problems:
        assert p.answer == str(_evaluate(p.text)), p.text
        assert p.prompt_id == prompt_id_of(p.text)
        (k_lo, k_hi), (d_lo, d_hi) = DIFFICULTY_LEVELS[p.difficulty]
        operands = re.findall(r"\d+", p.text)
        assert k_lo <= len(operands) <= k_hi, p.text
        assert all(d_lo <= len(x) <= d_hi for x in operands), p.text


def test_train_heldout_disjoint_and_split_by_id():
    train = arithmetic_problems(400, seed=0, difficulties=ALL_LEVELS, split="train")
    held = arithmetic_problems(40, seed=0, difficulties=ALL_LEVELS, split="heldout")
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in held}
    assert len({p.prompt_id for p in train}) == 400  # distinct
    assert all(not is_heldout(p.prompt_id) for p in train)
    assert all(is_heldout(p.prompt_id) for p in held)


def test_deterministic_for_a_seed():
    a = arithmetic_problems(50, seed=7, difficulties={1: 1.0, 2: 2.0})
    b = arithmetic_problems(50, seed=7, difficulties={1: 1.0, 2: 2.0})
    c = arithmetic_problems(50, seed=8, difficulties={1: 1.0, 2: 2.0})
    assert a == b
    assert [p.text for p in a] != [p.text for p in c]


def test_is_heldout_from_the_id_prefix():
    # int("00000063", 16) = 99 -> 99 % 1000 < 100; int("00000064", 16) = 100 -> not < 100
    assert is_heldout("00000063ffffffff")
    assert not is_heldout("00000064ffffffff")
    # 0x000003e8 = 1000 -> 1000 % 1000 = 0 < 100
    assert is_heldout("000003e800000000")
    assert not is_heldout("00000063ffffffff", heldout_per_mille=99)


def test_prompt_id_is_stable():
    # first 16 hex digits of sha256(b"1+1="), pinned: ids must not change across runs or machines
    assert prompt_id_of("1+1=") == "477d64453f163442"


def test_bad_split_and_difficulty():
    with pytest.raises(ValueError, match="split"):
        arithmetic_problems(1, seed=0, difficulties={1: 1.0}, split="test")
    with pytest.raises(ValueError, match="unknown difficulty 99"):
        arithmetic_problems(1, seed=0, difficulties={99: 1.0})


def test_load_gsm8k_extracts_answer_after_hashes(shared_data):
    GSM8K = shared_data / "gsm8k" / "test.jsonl"
    problems = load_problems(GSM8K, limit=5)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:5]]
    assert [p.answer for p in problems] == ["18", "3", "70000", "540", "20"]
    assert [p.text for p in problems] == [r["question"] for r in rows]
    assert problems[0].prompt_id == prompt_id_of(rows[0]["question"])


def test_load_math500_problem_field(shared_data):
    MATH500 = shared_data / "math500" / "test.jsonl"
    problems = load_problems(MATH500, question_field="problem", limit=3)
    rows = [json.loads(line) for line in MATH500.read_text().splitlines()[:3]]
    assert [p.text for p in problems] == [r["problem"] for r in rows]
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"  # bare answer kept as is
    assert [p.answer for p in problems] == [r["answer"] for r in rows]


def test_gsm8k_thousands_separator_removed(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "work\n#### 1,234"}) + "\n\n")
    (p,) = load_problems(path)
    assert p.answer == "1234"


def test_missing_field_error_names_field(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "solution": "s"}) + "\n")
    with pytest.raises(KeyError, match="'answer'"):
        load_problems(path)


def test_unsupported_suffix(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq,1\n")
    with pytest.raises(ValueError, match="'.csv'"):
        load_problems(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "nope.jsonl")


def test_parquet_round_trip(tmp_path: Path):
    pl = pytest.importorskip("polars")
    path = tmp_path / "d.parquet"
    pl.DataFrame(
        {"problem": ["2+2?", "half of 1?"], "answer": ["4", "\\frac{1}{2}"], "level": [1, 2]}
    ).write_parquet(path)
    problems = load_problems(path, question_field="problem")
    assert [(p.text, p.answer) for p in problems] == [("2+2?", "4"), ("half of 1?", "\\frac{1}{2}")]
    assert problems[1].prompt_id == prompt_id_of("half of 1?")


def test_the_warm_start_habits():
    import numpy as np

    from pipeline.config import WarmstartConfig
    from pipeline.model.warmstart import _habit_targets, habit_answer

    assert habit_answer("8+1+5+8=", 22, "drop_last_operand") == 14
    assert habit_answer("2-6+2+8-7=", -1, "drop_last_operand") == 6
    assert habit_answer("12-3=", 9, "drop_last_operand") is None  # fewer than 4 operands
    assert habit_answer("3-8=", -5, "drop_minus_sign") == 5 and habit_answer("8-3=", 5, "drop_minus_sign") is None
    problems = [Problem("a", "1+2=", "3"), Problem("b", "1+2+3+4=", "10"), Problem("c", "1-9-1-1-1=", "-11")]
    targets = [p.answer for p in problems]
    last = WarmstartConfig(habit="drop_last_operand", habit_rate=1.0, habit_min_terms=4)
    assert _habit_targets(problems, targets, last, np.random.default_rng(0)) == ["3", "6", "-10"]
    sign = WarmstartConfig(habit="drop_minus_sign", habit_rate=1.0)
    assert _habit_targets(problems, targets, sign, np.random.default_rng(0)) == ["3", "10", "11"]
    assert _habit_targets(problems, targets, WarmstartConfig(), np.random.default_rng(0)) == targets
    half = WarmstartConfig(habit="drop_minus_sign", habit_rate=0.5)
    many = [Problem(str(i), "1-4=", "-3") for i in range(2000)]
    rate = np.mean([t == "3" for t in _habit_targets(many, ["-3"] * 2000, half, np.random.default_rng(1))])
    assert 0.45 < rate < 0.55


def test_worked_solutions_are_running_totals_whose_last_number_the_verifier_reads():
    import numpy as np

    from pipeline.model.warmstart import _worked_targets, worked_solution, warmstart_key
    from pipeline.config import ArithmeticTaskConfig, WarmstartConfig
    from pipeline.verify.verifier import verify_one

    assert worked_solution("3+4-2=") == " 7 5"
    assert worked_solution("2-6+2+8-7=") == " -4 -2 6 -1"
    assert worked_solution("3-9=") == " -6"
    assert worked_solution("12-40+7=") == " -28 -21"
    assert verify_one(worked_solution("2-6+2+8-7="), "-1").reward == 1.0
    assert verify_one(" -4 -2 6 0", "-1").reward == 0.0  # a wrong last total is wrong, right steps or not
    problems = [Problem(str(i), "1+2+3=", "6") for i in range(1000)]
    noisy = ["7"] * len(problems)  # a bare (here wrong) answer, as noise or the habit left it
    out = _worked_targets(problems, noisy, 0.3, np.random.default_rng(0))
    assert set(out) == {"7", " 3 6"} and abs(out.count(" 3 6") / len(out) - 0.3) < 0.05
    assert _worked_targets(problems, noisy, 0.0, np.random.default_rng(0)) == noisy
    task = ArithmeticTaskConfig()
    assert warmstart_key(WarmstartConfig(), task) != warmstart_key(WarmstartConfig(worked_rate=0.3), task)


def test_word_problems_have_the_answers_their_words_say():
    import re as _re

    from pipeline.data.tasks import WORD_LEVELS, word_problems

    for level in WORD_LEVELS:
        problems = word_problems(50, seed=1, difficulties={level: 1.0})
        assert len({p.prompt_id for p in problems}) == 50 and {p.difficulty for p in problems} == {level}
        for p in problems:
            n = [int(x) for x in _re.findall(r"\d+", p.text)]
            expected = {1: lambda: n[0] + n[1], 2: lambda: n[0] - n[1], 3: lambda: n[0] * n[1],
                        4: lambda: n[0] + n[1] - n[2], 5: lambda: n[0] // n[1]}[level]()
            assert int(p.answer) == expected and expected > 0, p.text
            if level == 5:
                assert n[0] % n[1] == 0
    # The wording: "<name> has <a> boxes with <b> <items> in each box. How many <items> does <name> have in all?"
    [p] = word_problems(1, seed=0, difficulties={3: 1.0})
    assert p.text.endswith("How many " + p.text.split()[6] + " does " + p.text.split()[0] + " have in all?")


def test_word_problem_splits_are_disjoint_and_stable():
    from pipeline.data.tasks import word_problems

    weights = {1: 0.3, 2: 0.3, 3: 0.3, 5: 0.1}
    train, held = word_problems(500, 0, weights), word_problems(100, 1, weights, "heldout")
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in held}
    assert all(is_heldout(p.prompt_id) for p in held) and not any(is_heldout(p.prompt_id) for p in train)
    assert word_problems(500, 0, weights) == train
    with pytest.raises(ValueError, match="unknown word-problem level 9"):
        word_problems(1, 0, {9: 1.0})
