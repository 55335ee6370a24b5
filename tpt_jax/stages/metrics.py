"""Data and evaluation metrics over n samples per question: pass@k (= coverage@k), maj@k,
diversity@k. Shared by Prune (data quality stats) and Eval (model quality).

pass@k uses the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), which is the
probability that k of the n samples, drawn without replacement, contain a correct one. Computed
as a product so large n (RFT samples 100 per question) never builds huge binomials.
maj@k and diversity@k are averaged over the disjoint groups of k consecutive samples
(n // k groups), which is unbiased for exchangeable samples and linear in n.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Mapping, Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that a random k-subset of n samples (c correct) holds a correct one."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> tuple[Optional[float], int]:
    """Mean pass@k over questions given (n, c) per question; questions with n < k are left out.
    Returns (mean or None, number of questions counted)."""
    vals = [pass_at_k(n, c, k) for n, c in counts if n >= k]
    return (sum(vals) / len(vals) if vals else None), len(vals)


def default_ks(max_n: int) -> list[int]:
    """1, 2, 4, ... up to the largest number of samples per question, and that number."""
    ks, k = [], 1
    while k <= max_n:
        ks.append(k)
        k *= 2
    if max_n and ks[-1] != max_n:
        ks.append(max_n)
    return ks


def _groups(items: Sequence, k: int) -> list[Sequence]:
    return [items[i:i + k] for i in range(0, len(items) - k + 1, k)]


def maj_at_k(votes: Sequence[tuple[Optional[Hashable], bool]], k: int) -> Optional[float]:
    """Majority-vote accuracy with k samples for one question.

    `votes`: (answer key or None for no answer, is that answer correct) in sample order. Within
    each group of k the most frequent key wins; a tie between a correct and wrong key scores the
    chance a random tie-break picks the correct one. None if fewer than k samples."""
    groups = len(votes) // k
    if not groups:
        return None
    if k == 1:
        return sum(1 for key, ok in votes[:groups] if ok and key is not None) / groups
    total = 0.0
    for start in range(0, groups * k, k):
        counts: dict = {}
        right = set()
        for key, ok in votes[start:start + k]:
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
                if ok:
                    right.add(key)
        if not right:
            continue  # nothing correct in this group: the vote cannot be right
        top = max(counts.values())
        winners = [key for key, v in counts.items() if v == top]
        total += sum(1 for key in winners if key in right) / len(winners)
    return total / groups


def diversity_at_k(solutions: Sequence[Optional[Hashable]], k: int) -> Optional[float]:
    """Mean number of distinct correct solutions among k samples for one question.

    `solutions`: per sample in order, a key of the solution text when correct, else None."""
    groups = _groups(solutions, k)
    if not groups:
        return None
    return sum(len({s for s in g if s is not None}) for g in groups) / len(groups)


def _mean(values: Iterable[Optional[float]]) -> tuple[Optional[float], int]:
    vals = [v for v in values if v is not None]
    return (sum(vals) / len(vals) if vals else None), len(vals)


def summarize(per_question: Mapping[str, Sequence[tuple[Optional[Hashable], bool,
                                                         Optional[Hashable]]]],
              ks: Sequence[int]) -> dict:
    """pass@k, maj@k and diversity@k for each k over questions.

    `per_question[qid]`: per sample in sample order, (answer key, correct, solution key if
    correct else None). Each metric at k averages over questions with at least k samples and
    reports that count as `questions@k`. The evaluation module calls this with the same layout."""
    out: dict = {"pass@k": {}, "maj@k": {}, "diversity@k": {}, "questions@k": {}}
    lists = list(per_question.values())
    votes = [[(a, ok) for a, ok, _ in s] for s in lists]
    sols = [[sol for _, _, sol in s] for s in lists]
    counts = [(len(s), sum(1 for _, ok in s if ok)) for s in votes]
    for k in ks:
        key = str(k)
        out["pass@k"][key], out["questions@k"][key] = mean_pass_at_k(counts, k)
        out["maj@k"][key] = _mean(maj_at_k(v, k) for v in votes)[0]
        out["diversity@k"][key] = _mean(diversity_at_k(s, k) for s in sols)[0]
    n = sum(c[0] for c in counts)
    out["coverage@k"] = out["pass@k"]  # the compute-optimal paper's name for the same number
    out["accuracy"] = sum(c[1] for c in counts) / n if n else None
    out["coverage"] = (sum(1 for c in counts if c[1]) / len(counts)) if counts else None
    return out
