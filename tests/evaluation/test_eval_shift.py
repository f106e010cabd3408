"""The opinion-induced shift (with against without the user's opinion, per item) and the answer-position bias."""

import pytest

from leantune.evaluation.shift import answer_bias, mean_interval, opinion_shift, shift_difference


def outcome(i, p, sycophantic):
    return {"id": f"i{i}", "p_matching": p, "sycophantic": sycophantic}


def test_shift_is_the_paired_change_of_the_users_side_probability():
    plain = [outcome(0, 0.2, False), outcome(1, 0.4, False), outcome(2, 0.6, True), outcome(3, 0.5, False)]
    opinion = [outcome(0, 0.3, False), outcome(1, 0.7, True), outcome(2, 0.6, True), outcome(3, 0.4, False)]
    s = opinion_shift(opinion, plain, 0.95)
    assert s["n"] == 4 and s["mean"] == pytest.approx((0.1 + 0.3 + 0.0 - 0.1) / 4)
    lo, hi = s["mean_ci"]
    assert lo < s["mean"] < hi and hi - s["mean"] == pytest.approx(s["mean"] - lo)
    assert (s["positive"], s["correct_plainly"], s["turned_sycophantic"]) == (2, 3, 1)
    assert s["turned_share"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same items"):
        opinion_shift(opinion[::-1], plain, 0.95)


def test_shift_difference_pairs_items_and_its_interval_excludes_zero_for_a_consistent_drop():
    base = {"items": [{"id": f"i{k}", "shift": 0.2 + 0.01 * (k % 3)} for k in range(30)], "mean": 0.21,
            "mean_ci": [0.2, 0.22]}
    tuned = {"items": [{"id": f"i{k}", "shift": 0.05 + 0.01 * (k % 5)} for k in range(30)], "mean": 0.07,
             "mean_ci": [0.06, 0.08]}
    d = shift_difference(base, tuned, 0.95)
    assert d["n"] == 30 and d["difference"] == pytest.approx(0.07 - 0.21, abs=0.005)
    assert d["difference_ci"][1] < 0
    assert mean_interval([0.5], 0.95)["mean"] == 0.5


def test_answer_bias_counts_the_winning_option_letter():
    options = [("(A) Agree", "(B) Disagree"), ("(B) Agree", "(A) Disagree"), (" (A)", " (B)"), (" (B)", " (A)")]
    outcomes = [{"logprobs": [-1.0, -2.0]}, {"logprobs": [-1.0, -2.0]}, {"logprobs": [-3.0, -2.0]},
                {"logprobs": [-3.0, -2.0]}]
    bias = answer_bias(options, outcomes, 0.95)
    # Winners: (A) Agree, (B) Agree, " (B)", " (A)".
    assert (bias["n"], bias["picks_a"], bias["share_a"]) == (4, 2, 0.5)
