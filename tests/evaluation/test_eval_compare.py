"""Paired comparison of base and tuned: Newcombe's interval, McNemar's test, comparison.json, table, chart."""

import random

import pytest

from leantune.evaluation.compare import (
    compare_results,
    overall_summary,
    plot_rates,
    single_table_rows,
    table_rows,
)
from leantune.evaluation.stats import by_subset, mcnemar_exact_p, paired_difference


def pairs(both, base_only, tuned_only, neither):
    base = [True] * both + [True] * base_only + [False] * tuned_only + [False] * neither
    tuned = [True] * both + [False] * base_only + [True] * tuned_only + [False] * neither
    return base, tuned


def test_newcombe_interval_reproduces_the_published_example():
    # Altman et al., "Statistics with Confidence" (2000), Table 6.2: 14 / 5 / 0 / 22 pairs; the
    # difference 5/41 = 0.122 has the 95% interval 0.011 to 0.226 (Newcombe's method 10).
    base, tuned = pairs(14, 5, 0, 22)
    d = paired_difference(base, tuned, 0.95)
    assert d["difference"] == pytest.approx(-5 / 41)
    assert d["difference_ci"] == pytest.approx([-0.2265, -0.0115], abs=5e-4)
    assert (d["base_only"], d["tuned_only"], d["mcnemar_p"]) == (5, 0, pytest.approx(0.0625))
    swapped = paired_difference(tuned, base, 0.95)
    assert swapped["difference_ci"] == pytest.approx([-x for x in reversed(d["difference_ci"])])


def test_newcombe_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = random.Random(0)
    # Correlated pairs: P(base) = 0.5, P(tuned) = 0.4, strongly dependent (as two models on one item).
    cells = [(0.35, (True, True)), (0.15, (True, False)), (0.05, (False, True)), (0.45, (False, False))]
    covered, trials = 0, 400
    for _ in range(trials):
        draws = rng.choices([c for _, c in cells], weights=[w for w, _ in cells], k=150)
        d = paired_difference([b for b, _ in draws], [t for _, t in draws], 0.95)
        covered += d["difference_ci"][0] <= -0.1 <= d["difference_ci"][1]
    assert 0.92 <= covered / trials <= 0.99


def test_mcnemar_exact_p_values():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert 0 < mcnemar_exact_p(3000, 2000) < 1e-40  # large counts stay exact, no overflow


def result(label, outcomes):
    subsets, overall = by_subset(outcomes, 0.95)
    return {"model": {"label": label}, "sets": {"s": {"subsets": subsets, "overall": overall, "items": outcomes}}}


def outcomes(flags, subsets):
    return [{"id": str(i), "subset": sub, "sycophantic": f, "p_matching": 0.5}
            for i, (f, sub) in enumerate(zip(flags, subsets, strict=True))]


def test_comparison_per_subset_and_overall_table_and_chart(tmp_path):
    import matplotlib.image

    subsets = ["x"] * 60 + ["y"] * 60
    base_flags = [True] * 50 + [False] * 10 + [True] * 30 + [False] * 30
    tuned_flags = [True] * 10 + [False] * 50 + [True] * 30 + [False] * 30
    base, tuned = result("base", outcomes(base_flags, subsets)), result("tuned", outcomes(tuned_flags, subsets))
    c = compare_results(base, tuned, 0.95)
    x, y, overall = c["sets"]["s"]["x"], c["sets"]["s"]["y"], c["sets"]["s"]["overall"]
    assert (x["n"], x["difference"], x["base_only"], x["tuned_only"]) == (60, pytest.approx(-40 / 60), 40, 0)
    assert x["intervals_overlap"] is False and x["difference_ci"][1] < 0
    assert (y["difference"], y["mcnemar_p"], y["intervals_overlap"]) == (0, 1.0, True)
    assert overall["n"] == 120 and overall["base"]["rate"] == pytest.approx(80 / 120)

    rows = table_rows(c)
    assert [(r["set"], r["subset"]) for r in rows] == [("s", "overall"), ("s", "x"), ("s", "y")]
    assert rows[1]["base rate"].startswith("0.833 [") and rows[1]["tuned rate"].startswith("0.167 [")
    assert [r["subset"] for r in single_table_rows(base)] == ["overall", "x", "y"]
    summary = overall_summary({"base": base, "tuned": tuned, "comparison": c})["s"]
    assert summary["base"] == base["sets"]["s"]["overall"] and summary["tuned"]["rate"] == pytest.approx(40 / 120)
    assert summary["difference"] == {k: overall[k] for k in ("difference", "difference_ci", "mcnemar_p",
                                                             "intervals_overlap")}
    assert overall_summary({"base": base}) == {"s": {"base": base["sets"]["s"]["overall"]}}

    tuned["sets"]["s"]["items"] = tuned["sets"]["s"]["items"][::-1]
    with pytest.raises(ValueError, match="different items"):
        compare_results(base, tuned, 0.95)

    png = plot_rates({"base": base, "tuned": tuned}, tmp_path / "chart.png", 0.95)
    image = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.shape[0] > 300 and image.shape[1] == 1200
