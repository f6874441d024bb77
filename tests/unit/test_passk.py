"""pass@k and the diversity measures against hand-computed values and exact binomials."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from pipeline.rollout.passk import (
    distinct_answers,
    entropy_estimate,
    final_answer,
    pass_at_k,
    pass_at_k_curve,
    solved_beyond,
)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # 1 - C(3,1)/C(4,1)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 2, 4) == 1.0  # fewer than k wrong samples: any k contain a correct one
    assert pass_at_k(64, 16, 1) == pytest.approx(16 / 64)  # pass@1 is the fraction correct


def test_pass_at_k_matches_exact_binomials_and_takes_arrays():
    rng = np.random.default_rng(0)
    n = 64
    c = rng.integers(0, n + 1, size=200)
    for k in (1, 2, 8, 33, 64):
        exact = np.array([1 - comb(n - ci, k) / comb(n, k) for ci in c])
        np.testing.assert_allclose(pass_at_k(n, c, k), exact, rtol=1e-9, atol=1e-12)
    curve = pass_at_k_curve(np.array([0, 1, 64]), 64, ks=(1, 8, 64, 128))
    assert list(curve) == [1, 8, 64]  # k above n is left out
    assert curve[1] == pytest.approx((0 + 1 / 64 + 1) / 3) and curve[64] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        pass_at_k(4, 5, 1)


def test_solved_beyond_counts_problems_only_the_policy_solved():
    base, policy = np.array([0, 0, 3, 1, 0]), np.array([2, 0, 0, 5, 1])
    assert solved_beyond(base, policy) == 2  # problems 0 and 4
    with pytest.raises(ValueError, match="shape"):
        solved_beyond(base, policy[:3])


def test_final_answers_and_their_diversity():
    assert final_answer("so the total is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert final_answer("3 + 4 = 7, then 1,200") == "1200"
    assert final_answer("  no   number ") == "no number"
    assert distinct_answers([["7", " 7", "8"], ["\\boxed{2}", "2"]]) == pytest.approx((2 + 1) / 2)
    assert np.isnan(distinct_answers([]))


def test_entropy_estimate_is_the_mean_negative_logprob():
    assert entropy_estimate([np.log([0.5, 0.25]), np.array([]), np.log([0.5])]) == pytest.approx(
        -(np.log(0.5) * 2 + np.log(0.25)) / 3)
    # Sampling from a known distribution, the estimate converges to its entropy.
    p = np.array([0.7, 0.2, 0.1])
    y = np.random.default_rng(1).choice(3, size=200_000, p=p)
    assert entropy_estimate([np.log(p[y])]) == pytest.approx(-(p * np.log(p)).sum(), rel=0.01)


def test_the_base_evaluation_cache_round_trips_and_is_keyed_by_what_the_evaluation_depends_on(tmp_path):
    import numpy as np

    from pipeline.config import load_config
    from pipeline.data.tasks import Problem
    from pipeline.rollout.evaluate import BudgetResult, EvalResult
    from services.cli import shipped_config
    from services.demo import base_eval_key, load_base_eval, save_base_eval

    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "model.safetensors").write_bytes(b"weights")
    problems = [Problem("a", "1+2=", "3"), Problem("b", "2+2=", "4")]

    def key(*sets: str) -> str:
        return base_eval_key(load_config(shipped_config(), list(sets)), policy, problems)

    assert key() == key("learner.optimizer.lr=1e-3", 'learner.kl.kind="k3"', "erpo.enabled=false")  # training only
    assert len({key(), key("seed=1"), key("eval.samples=8"), key("rollout.max_new_tokens=12")}) == 4
    assert key() != base_eval_key(load_config(shipped_config()), policy, problems[:1])
    assert key() != base_eval_key(load_config(shipped_config()), policy, problems, "cuda")
    # vLLM evaluates in eval.dtype, else the rollout's: a bf16 rollout must not reuse an fp32 base evaluation
    vllm = 'eval.engine="vllm"'
    assert key(vllm, 'rollout.dtype="bfloat16"') != key(vllm)
    fp32 = 'eval.dtype="float32"'
    assert key(vllm, 'rollout.dtype="bfloat16"', fp32) == key(vllm, fp32) == key(vllm)
    assert key('rollout.dtype="bfloat16"') == key()  # the torch engine samples in the model's dtype
    first = key()
    (policy / "model.safetensors").write_bytes(b"other weights")  # rewritten: size and time change
    assert key() != first

    before = EvalResult(greedy_accuracy=0.5, sampled_accuracy=np.float64(0.25), problems=2, samples=4, temperature=1.0)
    budget = BudgetResult(correct=np.array([0, 3]), samples=4, temperature=1.0, pass_at={1: 0.375, 2: 0.5, 4: 0.5},
                          distinct_answers=2.5, entropy=np.float32(0.75), tokens=np.int64(40))
    assert load_base_eval(tmp_path, "k") is None
    save_base_eval(tmp_path, "k", before, budget)
    got_before, got_budget = load_base_eval(tmp_path, "k")
    assert got_before == before and got_budget.pass_at == budget.pass_at and got_budget.tokens == 40
    assert got_budget.correct.tolist() == [0, 3] and got_budget.entropy == 0.75
    save_base_eval(tmp_path, "plain", before, None)
    assert load_base_eval(tmp_path, "plain") == (before, None)


def test_by_style_splits_share_and_accuracy_of_worked_solutions_and_terse_answers():
    import numpy as np

    from pipeline.data.tasks import Problem
    from pipeline.model.warmstart import answer_style
    from pipeline.rollout.engine import Sample
    from pipeline.rollout.evaluate import by_style

    class Scripted:  # what a policy answered, to check the tally (the engine is tested on its own)
        answers = {"1+2+3=": [" 3 6", " 3 7", "6", "5"], "4-1=": [" 3", "3", "2", "2"]}

        def generate(self, prompts, temperatures, n):
            return [Sample(i, j, np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float32), "stop",
                           self.answers[p][j]) for i, p in enumerate(prompts) for j in range(n)]

    problems = [Problem("a", "1+2+3=", "6"), Problem("b", "4-1=", "3")]
    got = by_style(Scripted(), problems, 1.0, 4, answer_style, batch=1)
    assert got == {"terse": {"share": 0.625, "accuracy": 0.4}, "worked": {"share": 0.375, "accuracy": 2 / 3}}

