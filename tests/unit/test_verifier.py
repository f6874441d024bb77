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


def test_verifier_exception_is_error_not_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("sympy blew up")

    monkeypatch.setattr(math_verify, "verify", boom)
    v = verify_one("The answer is 42", "42")  # not a bare integer list, so math-verify decides
    assert v == Verdict(E, 0.0, "compare: RuntimeError: sympy blew up")


def test_unparseable_gold_is_error() -> None:
    v = verify_one("42", "\\text{}")
    assert v.status is E and "gold" in v.detail


def test_over_long_completion_is_no_answer_not_truncated() -> None:
    # The answer sits at the end; truncation would change it, so the whole item is rejected.
    v = verify_one("x" * 50 + " 42", "42", max_chars=40)
    assert v.status is N and "53 > max_chars=40" in v.detail
    assert verify_one("x" * 36 + " 42", "42", max_chars=40).status is C


def test_off_main_thread_disables_signal_timeouts() -> None:
    # signal.alarm raises ValueError off the main thread; verify_one must not turn that into ERROR.
    out: list[Verdict] = []
    t = threading.Thread(target=lambda: out.append(verify_one("\\boxed{42}", "42")))
    t.start()
    t.join(timeout=30)
    assert out and out[0].status is C


def test_inline_pool_workers_zero_counts_stats() -> None:
    pool = VerifierPool(workers=0)
    got = pool.verify([("1", "1"), ("2", "3"), ("", "3"), ("x" * 5000, "3")])
    assert [v.status for v in got] == [C, W, N, N]
    assert pool.stats == {"correct": 1, "wrong": 1, "no_answer": 2, "error": 0, "timeout": 0}
    pool.close()


# -- VerifierPool with worker processes -----------------------------------------------------------


@pytest.fixture(scope="module")
def pool2():
    with VerifierPool(workers=2, timeout_s=3.0) as pool:
        yield pool


@pytest.fixture(scope="module")
def hook_pool():
    with VerifierPool(workers=1, timeout_s=2.0, _verify_fn=HOOK) as pool:
        yield pool


def test_pool_preserves_order_over_mixed_items(pool2: VerifierPool) -> None:
    base = [
        ("42", "42"),
        ("41", "42"),
        ("no idea", "42"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("#### 18", "18"),
        ("-7", "-7"),
        (" -3 -6", "-6"),  # decided in the parent (integer list), between items the workers decide
    ]
    pairs = [(f"{c} " if i % 2 else c, a) for i, (c, a) in enumerate(base * 5)]  # 35 items
    before = dict(pool2.stats)
    got = pool2.verify(pairs)
    assert got == [verify_one(c, a) for c, a in pairs]
    assert [v.status for v in got[:7]] == [C, W, N, C, C, C, C]
    assert pool2.stats["correct"] - before["correct"] == 25
    assert pool2.restarts == 0


def test_pool_adversarial_latex_comes_back_within_timeout(pool2: VerifierPool) -> None:
    pairs = [
        ("\\boxed{" + "9^" * 5000 + "9}", "42"),  # 10 008 chars: over max_chars
        ("\\boxed{" + "9^" * 200 + "9}", "42"),  # parses; sympy comparison blows up
        ("\\boxed{9^{9^{9^{9}}}}", "42"),
        ("\\boxed{42}", "42"),
    ]
    t0 = time.monotonic()
    got = pool2.verify(pairs)
    elapsed = time.monotonic() - t0
    assert all(v.status in (T, N, E) for v in got[:3]), got
    assert got[0].status is N
    assert got[3].status is C
    # Two workers, three slow items, each bounded by timeout_s=3 (+ a restart if one was killed).
    assert elapsed < 3 * 3.0 + 5.0


def test_pool_kills_hung_worker_and_carries_on(hook_pool: VerifierPool) -> None:
    restarts = hook_pool.restarts
    t0 = time.monotonic()
    got = hook_pool.verify([("1", "1"), (HANG, "1"), ("2", "2"), ("3", "4")])
    assert [v.status for v in got] == [C, T, C, W]
    assert "killed" in got[1].detail
    assert hook_pool.restarts == restarts + 1
    assert time.monotonic() - t0 < 2.0 + 30.0  # timeout + worker restart, never the 600 s sleep
    assert [v.status for v in hook_pool.verify([("5", "5")])] == [C]  # still works afterwards


def test_pool_worker_crash_is_error_and_restarts(hook_pool: VerifierPool) -> None:
    restarts = hook_pool.restarts
    got = hook_pool.verify([(CRASH, "1"), ("2", "2")])
    assert [v.status for v in got] == [E, C]
    assert "exitcode 3" in got[0].detail
    assert hook_pool.restarts == restarts + 1


def test_pool_rejects_non_str_and_use_after_close() -> None:
    pool = VerifierPool(workers=0)
    with pytest.raises(TypeError):
        pool.verify([(42, "42")])  # type: ignore[list-item]
    pool.close()
    with pytest.raises(RuntimeError):
        pool.verify([("1", "1")])


def test_bad_verify_fn_spec_fails_at_startup() -> None:
    with pytest.raises(RuntimeError, match="startup failed"):
        VerifierPool(workers=1, _verify_fn="pipeline.verify.verifier:no_such_function")


@pytest.mark.parametrize("gold, completion", [
    (r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", r"so \boxed{\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}}"),
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", r"\boxed{\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}}"),
    (r"\$32,\!348", r"The total is \boxed{\$32,\!348}."),
    (r"\$18.90", r"It costs \$18.90 in all, so the answer is \boxed{18.90}"),
    (r"11,\! 111,\! 111,\! 100", r"\boxed{11,111,111,100}"),
    (r"\$36", r"The answer is \$36."),
    (r"[2,3)", r"\boxed{[2,3)}"),
    (r"(2,3)", r"\boxed{(2, 3)}"),
])
def test_reference_answers_in_every_form_parse(gold, completion):
    # Matrices were read as their last entry, escaped dollars made the gold unparseable.
    assert verify_one(completion, gold).status is VerifyStatus.CORRECT


def test_a_matrix_with_one_wrong_entry_is_wrong():
    gold = r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}"
    assert verify_one(r"\boxed{\begin{pmatrix} -1/3 \\ 2/3 \\ 5/4 \end{pmatrix}}", gold).status is VerifyStatus.WRONG


def test_every_reference_solution_scores_against_its_own_answer(shared_data):
    """MATH-500's worked solutions (with \\boxed{}) and GSM8K's (ending in #### N) against their
    reference answers: every one must verify as correct."""
    import json

    for name, text_field in (("math500/test.jsonl", "solution"), ("gsm8k/test.jsonl", "answer")):
        rows = [json.loads(line) for line in (shared_data / name).read_text().splitlines() if line.strip()]
        wrong = [(r.get("unique_id", i), r["answer"][-40:]) for i, r in enumerate(rows)
                 if verify_one(r[text_field], r["answer"], max_chars=100_000).status is not VerifyStatus.CORRECT]
        assert not wrong, f"{name}: {len(wrong)} of {len(rows)} reference solutions not correct: {wrong[:5]}"
