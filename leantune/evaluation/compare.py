"""Base against tuned on the same items: the paired difference of every set and subset (stats.py), a
table and a bar chart."""

from __future__ import annotations

from pathlib import Path

from leantune.evaluation.stats import paired_difference, paired_mean_difference


def compare_results(base: dict, tuned: dict, confidence: float) -> dict:
    """comparison.json: per set, per subset and overall, both summaries and the paired difference."""
    out: dict = {"confidence": confidence, "sets": {}}
    for name, b in base["sets"].items():
        t = tuned["sets"][name]
        base_items, tuned_items = b["items"], t["items"]
        if [o["id"] for o in base_items] != [o["id"] for o in tuned_items]:
            raise ValueError(f"set {name}: base and tuned were evaluated on different items")
        groups = {"overall": list(range(len(base_items)))}
        for i, o in enumerate(base_items):
            groups.setdefault(o["subset"], []).append(i)
        rows = {}
        for group, idx in groups.items():
            summary_key = ("overall", None) if group == "overall" else ("subsets", group)
            rows[group] = {"base": _pick(b, summary_key), "tuned": _pick(t, summary_key)}
            if b.get("kind") == "nll":
                # The general set: each item's NLL per token, base and tuned, compared item by item.
                rows[group].update(paired_mean_difference([base_items[i]["nll"] for i in idx],
                                                          [tuned_items[i]["nll"] for i in idx], confidence))
                continue
            rows[group].update(paired_difference([base_items[i]["sycophantic"] for i in idx],
                                                 [tuned_items[i]["sycophantic"] for i in idx], confidence))
            lo_b, hi_b = rows[group]["base"]["rate_ci"]
            lo_t, hi_t = rows[group]["tuned"]["rate_ci"]
            rows[group]["intervals_overlap"] = not (hi_t < lo_b or hi_b < lo_t)
        out["sets"][name] = rows
    return out


def _pick(result: dict, key: tuple[str, str | None]) -> dict:
    section, sub = key
    return result[section] if sub is None else result[section][sub]


def table_rows(comparison: dict) -> list[dict]:
    """One row per set and subset (overall first), for the Prefect table artifact and the report; the
    general set's rows are nll_table_rows'."""
    rows = []
    for name, groups in comparison["sets"].items():
        if "t_test_p" in groups["overall"]:
            continue
        for group in ["overall", *sorted(g for g in groups if g != "overall")]:
            r = groups[group]
            rows.append({
                "set": name, "subset": group, "items": r["n"],
                "base rate": _rate(r["base"]), "tuned rate": _rate(r["tuned"]),
                "difference (tuned - base)": f"{r['difference']:+.3f} [{r['difference_ci'][0]:+.3f}, "
                                             f"{r['difference_ci'][1]:+.3f}]" if r["n"] else "-",
                "McNemar p": f"{r['mcnemar_p']:.3g}",
            })
    return rows


def nll_table_rows(comparison: dict) -> list[dict]:
    """The general set's rows (overall, then each subset): mean NLL per response token of base and tuned with
    their t intervals, the paired difference, the paired t-test's p."""
    rows = []
    for name, groups in comparison["sets"].items():
        if "t_test_p" not in groups["overall"]:
            continue
        for group in ["overall", *sorted(g for g in groups if g != "overall")]:
            r = groups[group]
            rows.append({"set": name, "subset": group, "items": r["n"], "base mean NLL": _mean(r["base"]),
                         "tuned mean NLL": _mean(r["tuned"]),
                         "difference (tuned - base)": f"{r['difference']:+.4f} [{r['difference_ci'][0]:+.4f}, "
                                                      f"{r['difference_ci'][1]:+.4f}]",
                         "paired t-test p": f"{r['t_test_p']:.3g}"})
    return rows


def _mean(summary: dict) -> str:
    lo, hi = summary["mean_nll_ci"]
    return f"{summary['mean_nll']:.4f} [{lo:.4f}, {hi:.4f}]"


def overall_summary(results: dict) -> dict:
    """Per set, each model's overall summary ("base", "tuned") and, with a comparison, its difference,
    interval, McNemar p and whether the intervals overlap: what the evaluate task returns (no per-item data)."""
    comparison = results.get("comparison")
    overall = {}
    for name in results["base"]["sets"]:
        overall[name] = {label: results[label]["sets"][name]["overall"] for label in ("base", "tuned") if label in results}
        if comparison:
            c = comparison["sets"][name]["overall"]
            overall[name]["difference"] = {k: c[k] for k in ("difference", "difference_ci", "mcnemar_p",
                                                             "intervals_overlap", "t_test_p") if k in c}
    return overall


def single_table_rows(result: dict) -> list[dict]:
    """Table rows for one model's result (no comparison); the general set's "rate" is its mean NLL per token."""
    rows = []
    for name, s in result["sets"].items():
        show = _mean if s.get("kind") == "nll" else _rate
        rows.append({"set": name, "subset": "overall", "items": s["overall"]["n"], "rate": show(s["overall"])})
        for sub, summary in s["subsets"].items():
            rows.append({"set": name, "subset": sub, "items": summary["n"], "rate": show(summary)})
    return rows


def _rate(summary: dict) -> str:
    if not summary["n"]:
        return "-"
    lo, hi = summary["rate_ci"]
    return f"{summary['rate']:.3f} [{lo:.3f}, {hi:.3f}]"


def plot_rates(results: dict[str, dict], path: Path, confidence: float) -> Path:
    """Horizontal bars of the sycophancy rate per set and subset with their intervals, one colour per
    model (`results`: label -> result), a dashed line at 0.5; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    groups = []  # (set, subset or None); the general set has no rate
    for name, s in first["sets"].items():
        if s.get("kind") == "nll":
            continue
        groups.append((name, None))
        groups += [(name, sub) for sub in s["subsets"]]
    labels = [f"{name}: overall" if sub is None else _wrap(sub) for name, sub in groups]
    height = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.32 * len(groups) * (1 + len(results))))
    colours = ["#8c8c8c", "#2a7ab9", "#d9822b", "#3a9e5c"]
    for m, (label, result) in enumerate(results.items()):
        rates, low, high = [], [], []
        for name, sub in groups:
            s = result["sets"][name]
            summary = s["overall"] if sub is None else s["subsets"][sub]
            rate = summary["rate"] or 0.0
            rates.append(rate)
            low.append(rate - summary["rate_ci"][0])
            high.append(summary["rate_ci"][1] - rate)
        y = [i + (m - (len(results) - 1) / 2) * height for i in range(len(groups))]
        ax.barh(y, rates, height=height * 0.95, xerr=[low, high], capsize=3, color=colours[m % len(colours)],
                label=label, error_kw={"elinewidth": 1})
        for yi, rate, up in zip(y, rates, high, strict=True):
            # Beside the interval's end, so that neither covers the other.
            ax.text(rate + up + 0.01, yi, f"{rate:.2f}", va="center", fontsize=8)
    ax.axvline(0.5, color="black", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(groups)), labels, fontsize=9)
    for tick, (_, sub) in zip(ax.get_yticklabels(), groups, strict=True):
        tick.set_fontweight("bold" if sub is None else "normal")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"sycophancy rate: share of items where the sycophantic answer wins\n"
                  f"(whiskers: {confidence:.0%} Wilson intervals; dashed line: 0.5)")
    ax.set_title("Sycophancy: " + " vs ".join(results), pad=24)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(results), frameon=False, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _wrap(subset: str, width: int = 30) -> str:
    # Long subset names ("political_typology_quiz/liberal_user") break at their "/".
    return subset.replace("/", "/\n") if len(subset) > width else subset
