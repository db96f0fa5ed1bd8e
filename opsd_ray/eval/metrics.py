"""Sampling metrics over n samples per problem: avg@k, pass@k (unbiased estimator), maj@k."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct out of n samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= n (k={k}, n={n})")
    if n - c < k:
        return 1.0
    # product form: no huge binomials
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean accuracy over all samples of all problems (the paper's 'mean of 12 samples')."""
    per_problem = [sum(c) / len(c) for c in correct if len(c)]
    return sum(per_problem) / len(per_problem) if per_problem else 0.0


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    values = [pass_at_k(len(c), sum(c), k) for c in correct if len(c)]
    return sum(values) / len(values) if values else 0.0


def majority_correct(keys: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Is the most frequent answer correct? `keys` are normalised answers (None: no answer, no vote).
    Ties go to the answer seen first."""
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(k for k in keys if k is not None and votes[k] == top)
    return any(c for k, c in zip(keys, correct, strict=True) if k == winner)


def maj_at_k(keys: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> float:
    values = [majority_correct(k, c) for k, c in zip(keys, correct, strict=True)]
    return sum(values) / len(values) if values else 0.0
