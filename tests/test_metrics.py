"""pass@k against brute-force enumeration; maj@k and diversity@k on hand-checked cases."""
import itertools
import math

import pytest

from tpt_jax.stages.metrics import default_ks, diversity_at_k, maj_at_k, mean_pass_at_k, pass_at_k, summarize


def _brute_pass_at_k(n, c, k):
    """Share of all k-subsets of n samples (first c correct) holding a correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            want = _brute_pass_at_k(n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_large_n_is_stable():
    assert pass_at_k(100, 1, 1) == pytest.approx(0.01)
    assert pass_at_k(1000, 3, 100) == pytest.approx(1 - math.comb(997, 100) / math.comb(1000, 100))


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_mean_pass_at_k_skips_questions_with_too_few_samples():
    assert mean_pass_at_k([(4, 2), (2, 2), (4, 0)], 4) == (pytest.approx(0.5), 2)
    assert mean_pass_at_k([(1, 1)], 2) == (None, 0)


def test_maj_at_k():
    # groups of 3: [a a b] -> a (right); [b b a] -> b (wrong)
    votes = [("a", True), ("a", True), ("b", False), ("b", False), ("b", False), ("a", True)]
    assert maj_at_k(votes, 3) == 0.5
    assert maj_at_k(votes, 1) == 0.5
    assert maj_at_k(votes, 6) == 0.5  # 3-3 tie between right and wrong: half credit
    assert maj_at_k(votes, 7) is None
    # no answer does not vote: [None None a] -> a wins
    assert maj_at_k([(None, False), (None, False), ("a", True)], 3) == 1.0
    assert maj_at_k([(None, False)] * 3, 3) == 0.0


def test_diversity_at_k():
    sols = ["s1", "s1", None, "s2", "s3", "s3"]
    assert diversity_at_k(sols, 3) == pytest.approx((1 + 2) / 2)
    assert diversity_at_k(sols, 6) == 3
    assert diversity_at_k(sols, 1) == pytest.approx(5 / 6)
    assert diversity_at_k(sols, 7) is None


def test_summarize():
    per_q = {"q1": [("=", True, 1), ("5", False, None), ("=", True, 2), ("=", True, 1)],
             "q2": [("7", False, None), (None, False, None)]}
    out = summarize(per_q, [1, 2, 4])
    assert out["pass@k"]["1"] == pytest.approx((3 / 4 + 0) / 2)
    assert out["pass@k"]["4"] == 1.0 and out["questions@k"]["4"] == 1
    assert out["diversity@k"]["4"] == 2
    assert out["maj@k"]["2"] == pytest.approx((0.5 + 1) / 2 / 2)  # q1: [tie, right]; q2: 0
    assert out["accuracy"] == pytest.approx(3 / 6) and out["coverage"] == 0.5


def test_default_ks():
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(20) == [1, 2, 4, 8, 16, 20]
    assert default_ks(0) == []
