"""model/sweep.py: sweep grids, the paired bootstrap, Pareto frontiers, matched diversity, best-of-N."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import UserError
from model.sweep import (
    DEFAULT_SWEEP, Totals, bootstrap_indices, expected_best_of_n, family_grid, flatten, human_distance, interval,
    matched_quality, pareto_frontier, parse_sweep, parse_sweep_toml, ratio_of_sums, summarize, sweep_tables,
)

# ----------------------------------------------------------------------------- grids


def test_default_sweep_is_twelve_families_of_six_settings_with_temperature_alone():
    sweep = parse_sweep("default")
    assert list(sweep) == ["temperature", "top-k", "top-p", "min-p", "typical", "eta", "epsilon", "top-n-sigma",
                           "top-h", "mirostat", "xtc", "dry"]
    assert [len(specs) for specs in sweep.values()] == [6] * 12
    assert all(spec.top_k is spec.top_p is spec.min_p is spec.typical_p is None for spec in sweep["temperature"])
    # each family's settings are that family's sampler (its compact name), never plain sampling
    assert all(spec.label.startswith(family + ":") for family, specs in sweep.items() if family != "temperature"
               for spec in specs)
    assert len(flatten(sweep)) == 72 and parse_sweep("") == sweep


def test_compact_sweep_is_the_product_of_the_values_first_knob_slowest():
    sweep = parse_sweep("top-p:p=0.8|0.95,t=0.7|1 ; temperature:t=0.5")
    assert [spec.label for spec in sweep["top-p"]] == [
        "top-p:p=0.8,t=0.7", "top-p:p=0.8", "top-p:p=0.95,t=0.7", "top-p:p=0.95"]
    assert [spec.label for spec in sweep["temperature"]] == ["temperature:t=0.5"]
    default_top_k = family_grid("top-k", DEFAULT_SWEEP["top-k"])
    assert [s.label for s in parse_sweep("top-k")["top-k"]] == [s.label for s in default_top_k]


def test_toml_sweep_reads_like_the_compact_one():
    text = '[top-p]\np = [0.8, 0.95]\nt = [0.7, 1.0]\n\n[temperature]\nt = 0.5\n\n[min-p]\n'
    sweep = parse_sweep_toml(text, "grid.toml")
    compact = parse_sweep("top-p:p=0.8|0.95,t=0.7|1;temperature:t=0.5;min-p")
    assert sweep == compact


def test_a_spec_in_two_families_runs_once():
    sweep = parse_sweep("temperature:t=1|0.7;top-k:k=5")
    sweep["again"] = sweep["temperature"][:1]
    assert [s.label for s in flatten(sweep)] == ["sample", "temperature:t=0.7", "top-k:k=5"]


@pytest.mark.parametrize("text, message", [
    ("top-p;top-p", "sweep family 'top-p' is given twice"),
    ("nucleus:p=0.9", "unknown decoding strategy 'nucleus'"),
    ("mystery", "sweep family 'mystery' has no default grid"),
    ("top-p:p=0.9|x", "p='x' in sweep family 'top-p' is not a number"),
    ("top-p:p=1.5", "top_p=1.5 is out of range"),
    ("top-p:p=0.9|0.9", "has the setting 'top-p:p=0.9' twice"),
    ("top-p:p", "'p' in sweep family 'top-p' is not of the form key=v|v|v"),
    ("top-p:p=0.9,p=0.8", "'p' is given twice in sweep family 'top-p'"),
    ("top-k:q=3", "'q' is not a known key of decoding strategy 'top-k'"),
    (";", "the sweep has no family"),
])
def test_compact_sweep_errors(text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_sweep(text)


@pytest.mark.parametrize("text, message", [
    ("[top-p\n", "sweep file g.toml is not valid TOML"),
    ("", "has no family table"),
    ("p = 3\n", "'p' must be a table of knob values"),
    ("[top-p]\np = ['a']\n", "[top-p] p must be a number or a list of numbers"),
    ("[top-p]\np = []\n", "sweep family 'top-p': p has no values"),
    ("[mystery]\n", "[mystery] is empty and has no default grid"),
])
def test_toml_sweep_errors(text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_sweep_toml(text, "g.toml")


# ----------------------------------------------------------------------------- frontiers


def test_pareto_frontier_of_a_hand_made_point_set():
    # (diversity, quality loss). Worked by hand, most diverse first:
    # 4 (0.9, 3.0) is kept (nothing more diverse); 3 (0.8, 2.0) better quality: kept;
    # 1 (0.8, 2.5) ties 3 on diversity, worse quality: dominated; 5 (0.6, 2.0): no better
    # than 3 and less diverse: dominated; 0 (0.5, 1.0) kept; 2 (0.3, 1.5) dominated by 0;
    # 6 is nan; 7 repeats 0 exactly: only the first of identical points is kept.
    diversity = [0.5, 0.8, 0.3, 0.8, 0.9, 0.6, math.nan, 0.5]
    quality = [1.0, 2.5, 1.5, 2.0, 3.0, 2.0, 0.1, 1.0]
    assert pareto_frontier(diversity, quality) == [0, 3, 4]
    assert pareto_frontier([], []) == []


def dominated(i, points):
    d, q = points[i]
    return any((d2 >= d and q2 <= q and (d2 > d or q2 < q)) or ((d2, q2) == (d, q) and j < i)
               for j, (d2, q2) in enumerate(points) if j != i)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=12))
def test_pareto_frontier_is_the_set_of_undominated_points(raw):
    points = [(d / 6, q / 3) for d, q in raw]  # a coarse grid: ties happen often
    frontier = pareto_frontier([d for d, _ in points], [q for _, q in points])
    assert set(frontier) == {i for i in range(len(points)) if not dominated(i, points)}
    xs, ys = [points[i][0] for i in frontier], [points[i][1] for i in frontier]
    assert all(a < b for a, b in zip(xs, xs[1:])) and all(a < b for a, b in zip(ys, ys[1:]))


def test_matched_quality_interpolates_on_the_frontier_and_never_extrapolates():
    diversity, quality = [0.2, 0.6, 0.5], [1.0, 3.0, 9.0]
    frontier = pareto_frontier(diversity, quality)
    assert frontier == [0, 1]  # (0.5, 9.0) is dominated by (0.6, 3.0)
    # a quarter of the way from 0.2 to 0.6: 1.0 + 0.25 * (3.0 - 1.0)
    assert matched_quality(diversity, quality, frontier, 0.3) == pytest.approx(1.5)
    assert matched_quality(diversity, quality, frontier, 0.6) == pytest.approx(3.0)
    for outside in (0.1, 0.61, math.nan):
        assert math.isnan(matched_quality(diversity, quality, frontier, outside))
    assert math.isnan(matched_quality(diversity, quality, [], 0.3))


# ----------------------------------------------------------------------------- best-of-N


def test_best_of_n_by_hand():
    # scores 3, 1, 2: N=1 the mean 2; N=2 the pairs {3,1} {3,2} {1,2} -> min 1, 2, 1 -> 4/3; N=3 -> 1
    assert expected_best_of_n([3.0, 1.0, 2.0]) == pytest.approx([2.0, 4 / 3, 1.0])
    assert expected_best_of_n([5.0, math.nan]) == [5.0] and expected_best_of_n([]) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=7))
def test_best_of_n_equals_the_mean_over_every_subset(scores):
    expected = [np.mean([min(subset) for subset in itertools.combinations(scores, n)])
                for n in range(1, len(scores) + 1)]
    assert expected_best_of_n(scores) == pytest.approx(expected, abs=1e-9)


def test_human_distance_is_the_relative_gap_on_both_axes():
    # diversity 0.6 against 0.8 (-25%), NLL 1.5 against 2.0 (-25%): hypot(0.25, 0.25)
    assert human_distance(np.array(0.6), np.array(1.5), 0.8, 2.0) == pytest.approx(math.hypot(0.25, 0.25))
    assert human_distance(np.array(0.8), np.array(2.0), 0.8, 2.0) == 0


# ----------------------------------------------------------------------------- the bootstrap


def test_ratio_of_sums_pools_the_prompts_drawn():
    sums, counts = np.array([[2.0, 9.0, 0.0]]), np.array([[1.0, 3.0, 0.0]])
    assert ratio_of_sums(sums, counts)[0] == pytest.approx(11 / 4)
    # draw 0 takes prompts 0, 0, 2: 4 / 2; draw 1 only prompt 2, which has no count: nan
    draws = ratio_of_sums(sums, counts, np.array([[0, 0, 2], [2, 2, 2]]))
    assert draws.shape == (2, 1) and draws[0, 0] == pytest.approx(2.0) and math.isnan(draws[1, 0])


def test_bootstrap_is_paired_across_rows():
    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    sums, counts = np.stack([a, a + 0.5]), np.ones((2, 30))
    draws = ratio_of_sums(sums, counts, bootstrap_indices(30, 200, seed=1))
    # the same prompts in both rows in every draw: the difference never moves
    assert np.allclose(draws[:, 1] - draws[:, 0], 0.5)
    assert interval(draws[:, 0])[1] - interval(draws[:, 0])[0] > 0.2  # while each row alone does


def test_bootstrap_intervals_contain_the_truth_at_their_nominal_rate():
    """A simulated metric: per prompt, a count of tokens and their nats, from a known
    process whose ratio of expectations is 1.5 nats a token. 400 simulated comparisons of
    60 prompts each; the 95% percentile interval should contain 1.5 in about 95% of them
    (with 400 trials, 3 standard errors is 0.033)."""
    rng = np.random.default_rng(2026)
    truth, trials, prompts = 1.5, 400, 60
    hits = 0
    for trial in range(trials):
        counts = rng.integers(20, 200, size=prompts).astype(float)
        per_token = rng.gamma(shape=2.0, scale=truth / 2.0, size=prompts)  # mean 1.5, skewed
        sums = counts * per_token
        low, high = interval(ratio_of_sums(sums, counts, bootstrap_indices(prompts, 400, seed=trial)))
        hits += low <= truth <= high
    assert 0.915 <= hits / trials <= 0.985


def test_interval_skips_nan_draws():
    assert interval(np.array([math.nan, 1.0, 2.0, 3.0]), level=0.5) == pytest.approx((1.5, 2.5))
    assert all(math.isnan(v) for v in interval(np.array([math.nan])))


# ----------------------------------------------------------------------------- the summary


def constant_totals(nll, judge_nll, distinct, stuck=None, prompts=20):
    """Every prompt alike: the estimates equal the given values in every bootstrap draw."""
    ones = [1.0] * prompts
    values = {"nll": ([nll] * prompts, ones), "judge_nll": ([judge_nll] * prompts, ones),
              "distinct_2": ([distinct] * prompts, ones)}
    if stuck is not None:
        values["stuck"] = ([stuck] * prompts, ones)
    return Totals(values)


def test_summary_of_two_families_worked_by_hand():
    sweep = parse_sweep("temperature:t=0.5|1|1.5;top-k:k=5|20")
    # (judge NLL, distinct-2) of each setting; the human text at distinct-2 0.7
    points = {"temperature:t=0.5": (1.0, 0.4), "sample": (2.0, 0.8), "temperature:t=1.5": (4.0, 0.9),
              "top-k:k=5": (1.2, 0.6), "top-k:k=20": (1.5, 0.8)}
    totals = {label: constant_totals(nll=q + 0.1, judge_nll=q, distinct=d, stuck=0.25) for label, (q, d) in
              points.items()}
    human = constant_totals(nll=1.8, judge_nll=1.9, distinct=0.7)
    summary = summarize(sweep, totals, human, judge="judge_nll", draws=50, seed=0)
    temperature, top_k = summary.families
    assert temperature["frontier"] == ["temperature:t=0.5", "sample", "temperature:t=1.5"]
    # at 0.7, three quarters of the way from (0.4, 1.0) to (0.8, 2.0): 1.75
    assert temperature["matched_quality"] == pytest.approx(1.75)
    # top-k: half way from (0.6, 1.2) to (0.8, 1.5): 1.35, lower: top-k wins in every draw
    assert top_k["matched_quality"] == pytest.approx(1.35)
    assert top_k["matched_quality_ci"] == pytest.approx((1.35, 1.35))
    assert (top_k["win_share"], temperature["win_share"]) == (1.0, 0.0)
    by_label = {s["label"]: s for s in summary.settings}
    assert by_label["sample"]["nll_gap"] == pytest.approx(abs(2.1 - 1.8))
    assert by_label["top-k:k=5"]["stuck"] == pytest.approx(0.25)
    distance = math.hypot((0.6 - 0.7) / 0.7, (1.2 - 1.9) / 1.9)
    assert by_label["top-k:k=5"]["human_distance"] == pytest.approx(distance)
    assert top_k["best_of_n"][-1] == pytest.approx(min(distance, math.hypot(0.1 / 0.7, 0.4 / 1.9)))
    text = sweep_tables(summary)
    assert "1.350 [1.350, 1.350]" in text and "temperature:t=0.5 *" in text


def test_a_setting_with_nothing_measured_is_named_not_dropped_silently():
    sweep = parse_sweep("temperature:t=0.5|1")
    totals = {"temperature:t=0.5": constant_totals(nll=0.5, judge_nll=1.0, distinct=math.nan),
              "sample": constant_totals(nll=1.7, judge_nll=1.2, distinct=0.9)}
    summary = summarize(sweep, totals, constant_totals(nll=1.5, judge_nll=1.4, distinct=0.6), judge="judge_nll",
                        draws=10, seed=0)
    assert summary.families[0]["frontier"] == ["sample"]
    assert "with nothing measured (no sample of 2 units or more): temperature:t=0.5" in sweep_tables(summary)
    assert "nothing measured" not in sweep_tables(summarize(sweep, {**totals, "temperature:t=0.5": totals["sample"]},
                                                            constant_totals(nll=1.5, judge_nll=1.4, distinct=0.6),
                                                            judge="judge_nll", draws=10, seed=0))


def test_without_a_judge_quality_is_the_distance_to_the_human_nll():
    sweep = parse_sweep("temperature:t=0.5|1")
    totals = {"temperature:t=0.5": constant_totals(nll=0.5, judge_nll=math.nan, distinct=0.3),
              "sample": constant_totals(nll=1.7, judge_nll=math.nan, distinct=0.9)}
    human = constant_totals(nll=1.5, judge_nll=math.nan, distinct=0.6)
    summary = summarize(sweep, totals, human, judge=None, draws=20, seed=0)
    assert [s["quality"] for s in summary.settings] == pytest.approx([1.0, 0.2])
    # 0.2 beats 1.0 on both axes: the frontier is "sample" alone, which does not span 0.6
    family = summary.families[0]
    assert family["frontier"] == ["sample"] and math.isnan(family["matched_quality"])
    assert family["win_share"] == 0.0 and "—" in sweep_tables(summary)
