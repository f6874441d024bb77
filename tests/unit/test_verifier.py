"""Unit tests for pipeline.verify.verifier: hand-picked verdicts, the ERROR path, and the process pool
(order, parent-enforced timeouts, crashes, adversarial input). Pools use "spawn", so each one
costs ~1.5 s to start; they are module-scoped and kept to two."""

from __future__ import annotations

import os
import random
import threading
import time

import math_verify
import pytest

from pipeline.verify.verifier import (Verdict, VerifierPool, VerifyStatus, integer_list_verdict, math_verify_one,
                                      verify_one)

C, W, N, E, T = (
    VerifyStatus.CORRECT,
    VerifyStatus.WRONG,
    VerifyStatus.NO_ANSWER,
    VerifyStatus.ERROR,
    VerifyStatus.TIMEOUT,
)

HANG = "__test_hang__"
CRASH = "__test_crash__"


def slow_verify(
    completion: str, answer: str, *, max_chars: int, signal_timeout_s: int | None
) -> Verdict:
    """Test hook run inside pool workers (imported there via "module:function"): hangs or
    crashes the worker on a sentinel completion, otherwise defers to verify_one."""
    if completion == HANG:
        time.sleep(600)
    if completion == CRASH:
        os._exit(3)
    return verify_one(completion, answer, max_chars=max_chars, signal_timeout_s=signal_timeout_s)


HOOK = f"{__name__}:slow_verify"  # the worker inherits sys.path, so this name imports there


# -- verify_one, in-process ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("42", "42", C),
        ("The answer is \\boxed{42}", "42", C),
        ("The answer is 42", "42", C),
        ("41", "42", W),
        ("", "42", N),
        ("no idea", "42", N),
        ("-7", "-7", C),
        ("7", "-7", W),
        # math-verify's LaTeX parser reads gold "$0.5$" as Rational(1, 2), so this is exact equality.
        ("\\frac{1}{2}", "0.5", C),
        ("$\\frac{1}{3}$", "0.5", W),
        ("She sold 3 + 15 = 18 clips.\n#### 18", "18", C),
        # GSM8K gold: only the text after "####" counts.
        ("#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", C),
        ("#### 1,000", "1000", C),
        # Bare LaTeX gold is wrapped in $...$; unwrapped, math-verify parses "\\sqrt{2}" to nothing.
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", C),
        ("\\boxed{2\\pi}", "2\\pi", C),
        ("\\boxed{2}", "2\\pi", W),
        # The boxed answer wins over an earlier "answer is".
        ("The answer is 5. Wait, no: \\boxed{6}", "6", C),
    ],
)
def test_verify_one_cases(completion: str, answer: str, expected: VerifyStatus) -> None:
    v = verify_one(completion, answer)
    assert v.status is expected, v
    assert v.reward == (1.0 if expected is C else 0.0)
    assert len(v.detail) <= 200


def test_detail_names_parsed_values() -> None:
    assert verify_one("41", "42").detail == "gold='42' pred='41'"


# -- the integer-list fast path --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        (" 7 12 10", "10", C),
        (" 7 12 10", "12", W),
        # math-verify reads these as the expressions -3-6 = -9 and 6-1 = 5: the last integer counts.
        (" -3 -6", "-6", C),
        (" -3 -6", "-9", W),
        ("6 -1", "-1", C),
        ("6 -1", "5", W),
        # ... and this one as 63824 (a space as thousands separator)
        ("34 63 824", "824", C),
        ("-0", "0", C),
        ("007", "7", C),
        (" 1  2\n3 ", "3", C),
        ("12345678", "12345679", W),
        ("5", "Natalia sold 5 clips.\n#### 5", C),
    ],
)
def test_integer_lists_are_read_by_their_last_number(completion: str, answer: str, expected: VerifyStatus) -> None:
    fast = integer_list_verdict(completion, answer)
    assert fast is not None and fast.status is expected, fast
    assert verify_one(completion, answer) == fast


@pytest.mark.parametrize(
    ("completion", "answer"),
    [("6 - 1", "5"), ("6 -1 =", "5"), ("1.5", "1.5"), ("+5", "5"), ("x 5", "5"), ("5", "1,000"), ("5", "0.5"),
     ("", "5"), ("-", "5"), ("1" * 16, "1" * 16), ("\u0665", "5"), ("5\u00a0", "5")],
)
def test_everything_else_goes_to_math_verify(completion: str, answer: str) -> None:
    assert integer_list_verdict(completion, answer) is None
    assert verify_one(completion, answer) == math_verify_one(completion, answer)


def test_fast_path_agrees_with_math_verify_on_single_integers() -> None:
    """On one integer (signed, padded with whitespace) both give the same status, right and wrong."""
    rng = random.Random(0)
    for _ in range(300):
        value = rng.randint(-10**6, 10**6)
        completion = rng.choice(["", " ", "\n"]) + str(value) + rng.choice(["", " ", "\n"])
        answer = str(value + rng.choice([0, 0, 1, -1, 10]))
        fast = integer_list_verdict(completion, answer)
        assert fast is not None
        assert fast.status is math_verify_one(completion, answer).status, (completion, answer)
