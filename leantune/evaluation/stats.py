"""The interval statistics of the evaluation.

A rate gets the Wilson score interval. Each item has a binary outcome per model (`sycophantic`); the
difference of two models' rates on the same items, tuned - base, gets Newcombe's interval for paired
proportions (Newcombe 1998, "Improved confidence intervals for the difference between binomial
proportions based on paired data", method 10: the Wilson intervals of both rates combined with the
correlation of the pairs) and an exact McNemar test on the discordant items (two-sided binomial test of
b against b + c at 1/2).

A mean (the general set's negative log-likelihood per token, one value per item) gets Student's t
interval; two models' means on the same items, the mean of the per-item differences with its t interval
and the two-sided paired t-test (the t distribution from the regularized incomplete beta function).
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


# ------------------------------------------------------------- means: the general set's per-item NLL


def nll_summary(outcomes: Sequence[dict], confidence: float) -> dict:
    """An "nll" set's summary: items, response tokens, the mean over items of the NLL per token with its t
    interval, and the NLL per token over all tokens pooled."""
    m = mean_interval([o["nll"] for o in outcomes], confidence)
    tokens = sum(o["tokens"] for o in outcomes)
    pooled = math.fsum(o["nll"] * o["tokens"] for o in outcomes) / tokens if tokens else None
    return {"n": m["n"], "tokens": tokens, "mean_nll": m["mean"], "mean_nll_ci": m["mean_ci"], "token_nll": pooled}


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of `values` with Student's t interval (n - 1 degrees of freedom)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "mean_ci": [None, None], "sd": None}
    mean = math.fsum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "mean_ci": [mean, mean], "sd": None}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "mean_ci": [mean - half, mean + half], "sd": sd}


def paired_mean_difference(base: Sequence[float], tuned: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of the per-item differences tuned - base with Student's t interval, and the two-sided paired
    t-test's p (no difference on average)."""
    if len(base) != len(tuned):
        raise ValueError(f"paired values differ in length: {len(base)} base, {len(tuned)} tuned")
    d = mean_interval([t - b for b, t in zip(base, tuned, strict=True)], confidence)
    out = {"n": d["n"], "difference": d["mean"], "difference_ci": d["mean_ci"], "t": None, "t_test_p": 1.0}
    if d["n"] > 1:
        if d["sd"] == 0:
            out["t_test_p"] = 1.0 if d["mean"] == 0 else 0.0
        else:
            t = d["mean"] / (d["sd"] / math.sqrt(d["n"]))
            out["t"], out["t_test_p"] = t, student_t_two_sided_p(t, d["n"] - 1)
    return out


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    return _regularized_beta(df / 2, 0.5, df / (df + t * t))


def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (0 < p < 1), by bisection on the distribution function."""
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1 - p, df)
    target = 2 * (1 - p)  # the two-sided tail beyond the quantile
    lo, hi = 0.0, 1.0
    while student_t_two_sided_p(hi, df) > target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_two_sided_p(mid, df) > target else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), by its continued fraction (modified Lentz), on the side of x where it converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def nonzero(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / nonzero(1 + numerator * d)
            c = nonzero(1 + numerator / c)
            h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return h
