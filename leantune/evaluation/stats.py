"""The interval statistics of the evaluation.

A rate gets the Wilson score interval. Each item has a binary outcome per model (`sycophantic`); the
difference of two models' rates on the same items, tuned - base, gets Newcombe's interval for paired
proportions (Newcombe 1998, "Improved confidence intervals for the difference between binomial
proportions based on paired data", method 10: the Wilson intervals of both rates combined with the
correlation of the pairs) and an exact McNemar test on the discordant items (two-sided binomial test of
b against b + c at 1/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (no continuity correction)."""
    from statistics import NormalDist

    if n == 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval always holds p; at p = 0 or 1 rounding can put an end a hair inside it (1 - 1e-16),
    # which made the chart's error bar negative.
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def rate_summary(outcomes: Sequence[dict], confidence: float) -> dict:
    """Sycophancy rate (share of items whose outcome is sycophantic), 1 - rate, the Wilson interval,
    and the mean probability of the matching answer where items have one."""
    n = len(outcomes)
    k = sum(o["sycophantic"] for o in outcomes)
    lo, hi = wilson_interval(k, n, confidence)
    summary = {"n": n, "sycophantic": k, "rate": k / n if n else None,
               "non_sycophantic_rate": 1 - k / n if n else None, "rate_ci": [lo, hi]}
    probs = [o["p_matching"] for o in outcomes if "p_matching" in o]
    if probs:
        summary["mean_p_matching"] = sum(probs) / len(probs)
    return summary


def by_subset(outcomes: Sequence[dict], confidence: float) -> tuple[dict, dict]:
    """(summary per subset, overall summary) of a set's outcomes."""
    subsets: dict[str, list[dict]] = {}
    for o in outcomes:
        subsets.setdefault(o["subset"], []).append(o)
    per = {name: rate_summary(os_, confidence) for name, os_ in sorted(subsets.items())}
    return per, rate_summary(outcomes, confidence)


def paired_difference(base: Sequence[bool], tuned: Sequence[bool], confidence: float = 0.95) -> dict:
    """Rate difference tuned - base on paired outcomes, Newcombe's interval, McNemar's exact p."""
    if len(base) != len(tuned):
        raise ValueError(f"paired outcomes differ in length: {len(base)} base, {len(tuned)} tuned")
    n = len(base)
    both = sum(b and t for b, t in zip(base, tuned, strict=True))
    base_only = sum(b and not t for b, t in zip(base, tuned, strict=True))
    tuned_only = sum(t and not b for b, t in zip(base, tuned, strict=True))
    neither = n - both - base_only - tuned_only
    if n == 0:
        return {"n": 0, "difference": None, "difference_ci": [-1.0, 1.0], "base_only": 0, "tuned_only": 0,
                "mcnemar_p": 1.0}
    p_tuned, p_base = (both + tuned_only) / n, (both + base_only) / n
    l_t, u_t = wilson_interval(both + tuned_only, n, confidence)
    l_b, u_b = wilson_interval(both + base_only, n, confidence)
    # phi: the correlation of the pairs, with Newcombe's correction towards 0 (method 10).
    margins = (both + tuned_only) * (base_only + neither) * (both + base_only) * (tuned_only + neither)
    cross = both * neither - tuned_only * base_only
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    d = p_tuned - p_base
    lower = d - math.sqrt(max(0.0, (p_tuned - l_t) ** 2 - 2 * phi * (p_tuned - l_t) * (u_b - p_base)
                              + (u_b - p_base) ** 2))
    upper = d + math.sqrt(max(0.0, (u_t - p_tuned) ** 2 - 2 * phi * (u_t - p_tuned) * (p_base - l_b)
                              + (p_base - l_b) ** 2))
    return {"n": n, "difference": d, "difference_ci": [max(-1.0, lower), min(1.0, upper)],
            "base_only": base_only, "tuned_only": tuned_only, "mcnemar_p": mcnemar_exact_p(base_only, tuned_only)}


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(X <= min(b, c)) doubled, X ~ Binomial(b + c, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1))
    # Exact integers until the one division (Python divides big integers to the nearest float).
    return min(1.0, 2 * tail / 2**m)
