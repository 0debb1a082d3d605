"""Tests for model/decoding.py (the spec language has its own: test_strategy.py).

Truth comes from three places: examples worked by hand (arithmetic in the comments),
plain-Python reference computations written here (float64 via the math module), and
hypothesis properties on random logits.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from model.decoding import (
    PenaltyState,
    mask_vocab_padding,
    sampling_distribution,
    PROBABILITY_TOLERANCE,
    TYPICAL_TIE_TOLERANCE,
    apply_frequency_presence_penalties,
    apply_repetition_penalty,
    apply_temperature,
    choose_tokens,
    draw_tokens,
    epsilon_filter,
    eta_filter,
    greedy_tokens,
    min_p_filter,
    process_logits,
    top_h_filter,
    top_k_filter,
    top_n_sigma_filter,
    top_p_filter,
    typical_filter,
    xtc_filter,
)
from model.errors import UserError
from model.strategy import MIN_TEMPERATURE, DecodingSpec, parse_strategy

INF = math.inf
FAST = settings(max_examples=60, deadline=None)


# ----------------------------------------------------------------------------------------
# Helpers: random logits and plain-Python references.


@st.composite
def logits_batches(draw, max_vocab: int = 24, allow_neg_inf: bool = True, min_vocab: int = 1) -> torch.Tensor:
    """(B, V) float32 logits in [-20, 20], often with ties, sometimes with -inf entries,
    always with at least one finite logit per row."""
    batch = draw(st.integers(1, 3))
    vocab = draw(st.integers(min_vocab, max_vocab))
    value = st.one_of(st.floats(-20, 20, width=32), st.sampled_from([-1.0, 0.0, 2.5]))
    rows = []
    for _ in range(batch):
        row = draw(st.lists(value, min_size=vocab, max_size=vocab))
        if allow_neg_inf:
            hidden = draw(st.lists(st.booleans(), min_size=vocab, max_size=vocab))
            hidden[draw(st.integers(0, vocab - 1))] = False  # keep one finite logit
            row = [-INF if h else x for x, h in zip(row, hidden)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def probabilities(row: list[float]) -> list[float]:
    """softmax of one row in float64, written out."""
    top = max(row)
    weights = [math.exp(x - top) for x in row]  # exp(-inf) = 0
    total = math.fsum(weights)
    return [w / total for w in weights]


def kept(row_out: torch.Tensor) -> set[int]:
    """Token ids a filter left finite."""
    return {i for i, x in enumerate(row_out.tolist()) if x != -INF}


def assert_is_filtering(out: torch.Tensor, logits: torch.Tensor) -> None:
    """out keeps some of each row's logits unchanged and sets the rest to -inf, and
    softmax(out) is a probability distribution."""
    assert out.shape == logits.shape and out.dtype == logits.dtype
    assert torch.all((out == logits) | (out == -INF))
    assert torch.isfinite(out).any(dim=-1).all(), "every row keeps at least one token"
    probs = torch.softmax(out.double(), dim=-1)
    assert torch.all(probs >= 0)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(out.shape[0], dtype=torch.float64))


# ----------------------------------------------------------------------------------------
# Properties shared by every filter.

FILTERS = {
    "top_k": (top_k_filter, st.integers(1, 30)),
    "top_p": (top_p_filter, st.floats(1e-9, 1.0)),
    "min_p": (min_p_filter, st.floats(0.0, 1.0)),
    "typical": (typical_filter, st.floats(1e-9, 1.0)),
    "epsilon": (epsilon_filter, st.floats(1e-9, 0.999)),
    "eta": (eta_filter, st.floats(1e-9, 0.999)),
    "top_n_sigma": (top_n_sigma_filter, st.floats(1e-3, 5.0)),
    "top_h": (top_h_filter, st.floats(1e-9, 1.0)),
    "xtc": (xtc_filter, st.floats(0.0, 0.5)),
}


@pytest.mark.parametrize("name", FILTERS)
@FAST
@given(data=st.data())
def test_filter_output_is_a_distribution_and_input_is_untouched(name, data):
    filter_fn, parameter = FILTERS[name]
    logits = data.draw(logits_batches())
    before = logits.clone()
    out = filter_fn(logits, data.draw(parameter))
    assert_is_filtering(out, logits)
    assert torch.equal(logits, before)


@FAST
@given(logits=logits_batches(), seen_bits=st.data())
def test_neutral_settings_change_nothing(logits, seen_bits):
    vocab = logits.shape[-1]
    seen = torch.tensor(seen_bits.draw(st.lists(st.booleans(), min_size=logits.numel(), max_size=logits.numel())))
    counts = torch.tensor(seen_bits.draw(st.lists(st.integers(0, 5), min_size=logits.numel(), max_size=logits.numel())))
    seen, counts = seen.view_as(logits), counts.view_as(logits)
    neutral = [
        top_k_filter(logits, vocab),
        top_k_filter(logits, vocab + 7),
        top_p_filter(logits, 1.0),
        min_p_filter(logits, 0.0),
        typical_filter(logits, 1.0),
        apply_temperature(logits, 1.0),
        apply_repetition_penalty(logits, seen, 1.0),
        apply_frequency_presence_penalties(logits, counts, 0.0, 0.0),
        process_logits(logits, DecodingSpec(), seen=seen, counts=counts),
    ]
    for out in neutral:
        assert torch.equal(out, logits)
        assert out is not logits


def test_functions_accept_a_single_row():
    row = torch.tensor([0.3, -1.0, 2.0, 2.0, -INF])
    for out_1d, out_2d in [
        (top_k_filter(row, 2), top_k_filter(row[None], 2)),
        (top_p_filter(row, 0.5), top_p_filter(row[None], 0.5)),
        (min_p_filter(row, 0.3), min_p_filter(row[None], 0.3)),
        (typical_filter(row, 0.5), typical_filter(row[None], 0.5)),
        (apply_temperature(row, 0.5), apply_temperature(row[None], 0.5)),
    ]:
        assert torch.equal(out_1d, out_2d[0])
    assert greedy_tokens(row).item() == 2


# ----------------------------------------------------------------------------------------
# greedy and temperature


@FAST
@given(logits=logits_batches())
def test_greedy_is_the_first_maximum(logits):
    for row, token in zip(logits.tolist(), greedy_tokens(logits).tolist()):
        assert token == row.index(max(row))  # list.index finds the lowest id


def test_greedy_worked_examples():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [-INF, -INF, 2.0, -INF]])
    assert greedy_tokens(logits).tolist() == [1, 2]  # 3 at ids 1 and 2: the lower id wins
    # Long rows, where a parallel reduction could in principle return a later tie.
    assert greedy_tokens(torch.zeros(3, 50_000)).tolist() == [0, 0, 0]
    tail_tie = torch.zeros(50_000)
    tail_tie[[40_000, 49_999]] = 1.0
    assert greedy_tokens(tail_tie).item() == 40_000


def test_temperature_worked_examples():
    logits = torch.tensor([2.0, -4.0, 0.0, -INF])
    assert apply_temperature(logits, 2.0).tolist() == [1.0, -2.0, 0.0, -INF]  # 2/2, -4/2, 0/2
    assert apply_temperature(logits, 0.5).tolist() == [4.0, -8.0, 0.0, -INF]  # 2/0.5, -4/0.5


@pytest.mark.parametrize("t", [-1.0, math.nan, math.inf, MIN_TEMPERATURE / 10])
def test_temperature_rejects_bad_values(t):
    with pytest.raises(UserError, match="temperature"):
        apply_temperature(torch.zeros(3), t)


def test_temperature_zero_points_to_greedy():
    with pytest.raises(UserError, match="greedy"):
        apply_temperature(torch.zeros(3), 0.0)


@FAST
@given(logits=logits_batches(allow_neg_inf=False, min_vocab=2, max_vocab=50), seed=st.integers(0, 2**32))
def test_tiny_temperature_samples_the_argmax(logits, seed):
    top2 = logits.topk(2, dim=-1).values
    # With a top-2 gap >= 0.01, t = 1e-4 puts every other token below e^-100 of the best.
    assume(bool(((top2[:, 0] - top2[:, 1]) >= 0.01).all()))
    spec = DecodingSpec(temperature=1e-4)
    generators = [torch.Generator().manual_seed(seed + b) for b in range(logits.shape[0])]
    tokens = choose_tokens(process_logits(logits, spec), spec, generators)
    assert torch.equal(tokens, logits.argmax(dim=-1))


# ----------------------------------------------------------------------------------------
# top-k


@FAST
@given(logits=logits_batches(), k=st.integers(1, 30))
def test_top_k_keeps_everything_tied_with_the_kth_largest(logits, k):
    out = top_k_filter(logits, k)
    for row, row_out in zip(logits.tolist(), out):
        kth_largest = sorted(row, reverse=True)[min(k, len(row)) - 1]
        expected = [x if x >= kth_largest else -INF for x in row]
        assert row_out.tolist() == expected


@FAST
@given(
    values=st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=30, unique=True),
    k=st.integers(1, 30),
)
def test_top_k_without_ties_keeps_exactly_k(values, k):
    out = top_k_filter(torch.tensor([values]), k)
    assert len(kept(out[0])) == min(k, len(values))


def test_top_k_worked_examples():
    distinct = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(top_k_filter(distinct, 2)) == {1, 3}  # 5 and 4 are the two largest
    tied = torch.tensor([1.0, 5.0, 3.0, 5.0, 2.0])
    assert kept(top_k_filter(tied, 1)) == {1, 3}  # the largest, 5, occurs twice: both kept
    assert kept(top_k_filter(tied, 3)) == {1, 3, 2}  # sorted: 5, 5, 3 -> 3rd largest is 3
    assert kept(top_k_filter(tied, 99)) == {0, 1, 2, 3, 4}  # k >= V keeps all
    with pytest.raises(UserError, match="top_k"):
        top_k_filter(tied, 0)
    with pytest.raises(UserError, match="top_k"):
        top_k_filter(tied, 2.0)


# ----------------------------------------------------------------------------------------
# top-p


def test_top_p_worked_examples():
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()  # probabilities .1 .2 .3 .4
    # Most likely first: .4 (id 3), .3 (id 2), .2 (id 1), .1 (id 0); running mass .4 .7 .9 1.
    assert kept(top_p_filter(logits, 0.4)) == {3}  # .4 reaches 0.4 with one token
    assert kept(top_p_filter(logits, 0.7)) == {3, 2}  # .4 + .3 = .7 reaches 0.7
    assert kept(top_p_filter(logits, 0.700001)) == {3, 2, 1}  # .7 < .700001: id 1 crosses it
    assert kept(top_p_filter(logits, 0.41)) == {3, 2}  # .4 < .41: id 2 crosses it
    assert kept(top_p_filter(logits, 1e-12)) == {3}  # the most likely token always stays
    # Rounding: with logits log([.05, .05, .25, .65]) in float32 the top token's float64
    # probability comes out as 0.64999999; it must still count as reaching p = 0.65.
    assert kept(top_p_filter(torch.tensor([0.05, 0.05, 0.25, 0.65]).log(), 0.65)) == {3}
    # A float32 running sum gives .5 + .4 = 0.89999998 < .9 and would keep a third token.
    assert kept(top_p_filter(torch.tensor([0.5, 0.4, 0.1]).log(), 0.9)) == {0, 1}


def test_top_p_mass_stays_exact_over_a_large_vocabulary():
    # 30000 equal tokens, 1/30000 each: the nucleus for p = .5 is exactly the 15000 lowest
    # ids (mass before id 15000 is 15000/30000 = .5). A float32 running sum drifts by far
    # more than the tolerance over 15000 additions.
    for p, n in [(0.5, 15_000), (0.3, 9_000), (0.9, 27_000)]:
        assert kept(top_p_filter(torch.zeros(30_000), p)) == set(range(n))


def test_top_p_breaks_ties_by_token_id():
    uniform = torch.zeros(4)  # .25 each
    assert kept(top_p_filter(uniform, 0.5)) == {0, 1}  # .25 + .25 reaches .5: lowest ids first
    assert kept(top_p_filter(uniform, 0.6)) == {0, 1, 2}  # .5 < .6: id 2 crosses it
    two_levels = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    # e / (2e + 3) = 0.3222 for ids 1 and 3, 1 / (2e + 3) = 0.1185 for ids 0, 2, 4.
    # p = 0.7: .3222 + .3222 = .6444 < .7, so the next tie group's lowest id, 0, crosses it.
    assert kept(top_p_filter(two_levels, 0.7)) == {1, 3, 0}


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, math.nan])
def test_top_p_rejects_bad_values(p):
    with pytest.raises(UserError, match="top_p"):
        top_p_filter(torch.zeros(3), p)


@FAST
@given(logits=logits_batches(), p=st.floats(1e-3, 0.999))
def test_top_p_keeps_the_smallest_nucleus_reaching_p(logits, p):
    out = top_p_filter(logits, p)
    for row, row_out in zip(logits.tolist(), out):
        probs = probabilities(row)
        ranking = sorted(range(len(row)), key=lambda i: (-row[i], i))  # likely first, ties by id
        nucleus = kept(row_out)
        assert nucleus == set(ranking[: len(nucleus)]), "the kept tokens are the most likely ones"
        least_likely_kept = ranking[len(nucleus) - 1]
        mass = math.fsum(probs[i] for i in nucleus)
        slack = 1e-9  # float64 summation order differs between torch and math.fsum
        assert mass >= p - PROBABILITY_TOLERANCE - slack
        assert mass - probs[least_likely_kept] < p - PROBABILITY_TOLERANCE + slack


# ----------------------------------------------------------------------------------------
# min-p


def test_min_p_worked_examples():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert kept(min_p_filter(logits, 0.2)) == {0, 1, 2}  # threshold .2 * .5 = .1: drops .05
    assert kept(min_p_filter(logits, 0.5)) == {0, 1}  # threshold .25: drops .15 and .05
    assert kept(min_p_filter(logits, 1.0)) == {0}  # only the maximum
    assert kept(min_p_filter(torch.tensor([0.4, 0.4, 0.2]).log(), 1.0)) == {0, 1}  # ties with the max
    # exactly on the threshold is kept: .25 >= .5 * .5, .1 >= .25 * .4 (float64 logits: the
    # ratios come out within float64 rounding of .5 and .25)
    wide = torch.tensor([0.5, 0.25, 0.1, 0.15], dtype=torch.float64).log()
    assert kept(min_p_filter(wide, 0.5)) == {0, 1}
    assert kept(min_p_filter(torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64).log(), 0.25)) == {0, 1, 2, 3}
    # float32 logits are taken as given: log(.25) - log(.5) rounds to a ratio of 0.49999999905
    assert kept(min_p_filter(torch.tensor([0.5, 0.25]).log(), 0.5)) == {0}
    with pytest.raises(UserError, match="min_p"):
        min_p_filter(logits, 1.1)
    with pytest.raises(UserError, match="min_p"):
        min_p_filter(logits, -0.1)


def test_min_p_tiny_values_still_filter():
    # ratios to the most likely token: 1, 8e-7, 1e-7, 1e-9
    logits = torch.tensor([0.0, math.log(8e-7), math.log(1e-7), math.log(1e-9)], dtype=torch.float64)
    assert kept(min_p_filter(logits, 1e-6)) == {0}  # 8e-7 is 20% short of 1e-6
    assert kept(min_p_filter(logits, 2e-7)) == {0, 1}
    assert kept(min_p_filter(logits, 1e-8)) == {0, 1, 2}
    assert kept(min_p_filter(logits, 8e-7 * (1 + 1e-7))) == {0}  # 1e-7 short: not a float64 rounding


def test_min_p_boundary_follows_the_documented_rule_exactly():
    """min_p = 1 keeps only the ties with the maximum, and a min_p set exactly to a token's
    p_i / p_max (computed as an independent check would: a float64 softmax, then a
    division) keeps exactly the tokens at least as likely as that token, on 600 draws
    with a float32 neighbour one ulp below a logit (the old 2.4e-7 tolerance kept it)."""
    assert kept(min_p_filter(torch.tensor([0.0, -1e-7]), 1.0)) == {0}
    assert kept(min_p_filter(torch.tensor([0.0, -1e-7, 0.0]), 1.0)) == {0, 2}
    assert kept(min_p_filter(torch.tensor([3.0, 3.0 - 1e-6, -INF]), 1.0)) == {0}
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(600, 12, generator=generator) * 3
    rows[:, 1] = torch.nextafter(rows[:, 0], torch.tensor(-INF))  # token 1: one float32 ulp below token 0
    picks = torch.randint(0, 12, (600,), generator=generator).tolist()
    for row, pick in zip(rows, picks):
        values = row.tolist()
        probs = probabilities(values)
        min_p = probs[pick] / max(probs)
        assert kept(min_p_filter(row, min_p)) == {j for j, x in enumerate(values) if x >= values[pick]}
        assert kept(min_p_filter(row, 1.0)) == {j for j, x in enumerate(values) if x == max(values)}


@FAST
@given(logits=logits_batches(), min_p=st.floats(0.0, 1.0))
def test_min_p_keeps_exactly_the_tokens_above_the_scaled_threshold(logits, min_p):
    out = min_p_filter(logits, min_p)
    for row, row_out in zip(logits.tolist(), out):
        probs = probabilities(row)
        threshold = min_p * max(probs)
        # Skip draws within float64 rounding of the boundary (the rule's 8.9e-16 tolerance).
        assume(all(abs(q - threshold) > 1e-12 * max(probs) for q in probs))
        expected = [x if q >= threshold else -INF for x, q in zip(row, probs)]
        assert row_out.tolist() == expected


# ----------------------------------------------------------------------------------------
# typical


def test_typical_worked_examples():
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    # In bits: surprise -log2 p = 1, 2, 3, 3; entropy H = .5*1 + .25*2 + 2 * .125*3 = 1.75.
    # |surprise - H| = .75, .25, 1.25, 1.25, so the typical order is id 1 (p .25), id 0
    # (p .5), then ids 2 and 3 tied (p .125 each); running mass .25, .75, .875, 1.
    # (Nats scale every distance by ln 2, which keeps the order.)
    assert kept(typical_filter(logits, 0.2)) == {1}  # .25 reaches .2: the argmax, id 0, is dropped
    assert kept(typical_filter(logits, 0.5)) == {1, 0}  # .25 < .5, .75 reaches it
    assert kept(typical_filter(logits, 0.75)) == {1, 0}  # .75 reaches .75 exactly (tolerance)
    assert kept(typical_filter(logits, 0.8)) == {1, 0, 2, 3}  # id 2 crosses .8; id 3 is tied with it
    with pytest.raises(UserError, match="typical_p"):
        typical_filter(logits, 0.0)
    # [.5, .25, .25]: surprise 1, 2, 2 bits; H = .5*1 + 2 * .25*2 = 1.5; every distance is .5.
    # All three tokens are tied, so any mass keeps all of them (float32 logits make the
    # distances differ by ~7e-10 nats, within the tie tolerance).
    for mass in (0.1, 0.5, 0.9):
        assert kept(typical_filter(torch.tensor([0.5, 0.25, 0.25]).log(), mass)) == {0, 1, 2}


def typical_reference(row: list[float], mass: float) -> set[int]:
    """Locally typical sampling written out from its definition."""
    probs = probabilities(row)
    entropy = -math.fsum(q * math.log(q) for q in probs if q > 0)
    distance = [abs(-math.log(q) - entropy) if q > 0 else INF for q in probs]
    total = 0.0
    for last in sorted(range(len(row)), key=lambda i: distance[i]):
        total += probs[last]
        if total >= mass - PROBABILITY_TOLERANCE:
            break
    return {i for i in range(len(row)) if distance[i] <= distance[last] + TYPICAL_TIE_TOLERANCE and probs[i] > 0}


@FAST
@given(logits=logits_batches(), mass=st.floats(1e-3, 0.999))
def test_typical_matches_the_reference(logits, mass):
    out = typical_filter(logits, mass)
    for row, row_out in zip(logits.tolist(), out):
        probs = probabilities(row)
        entropy = -math.fsum(q * math.log(q) for q in probs if q > 0)
        distances = sorted({abs(-math.log(q) - entropy) for q in probs if q > 0})
        # Skip draws where rounding could reorder two nearly equal distances or decide
        # whether a running total reaches the mass.
        assume(all(b - a > 2 * TYPICAL_TIE_TOLERANCE for a, b in zip(distances, distances[1:])))
        running, order = 0.0, sorted(probs, key=lambda q: abs(-math.log(q) - entropy) if q > 0 else INF)
        for q in order:
            running += q
            assume(abs(running - (mass - PROBABILITY_TOLERANCE)) > 1e-9)
        assert kept(row_out) == typical_reference(row, mass)


# ----------------------------------------------------------------------------------------
# penalties


def test_repetition_penalty_worked_examples():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    # Seen positive logit divided by 2: 2 -> 1; seen negative multiplied: -2 -> -4; unseen unchanged.
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    # penalty 0.5 rewards instead: 2 / .5 = 4, -2 * .5 = -1.
    assert apply_repetition_penalty(logits, seen, 0.5).tolist() == [[4.0, -1.0, 1.0]]
    with pytest.raises(UserError, match="repetition_penalty"):
        apply_repetition_penalty(logits, seen, 0.0)
    with pytest.raises(ValueError, match="bool"):
        apply_repetition_penalty(logits, seen.long(), 2.0)


def test_frequency_presence_worked_example():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[0, 1, 3, 0]])
    out = apply_frequency_presence_penalties(logits, counts, frequency=0.5, presence=0.25)
    # id 1: 1 - 1*.5 - .25 = .25; id 2: 1 - 3*.5 - .25 = -.75; ids 0 and 3 were never generated.
    assert out.tolist() == [[1.0, 0.25, -0.75, 1.0]]
    with pytest.raises(UserError, match="frequency_penalty"):
        apply_frequency_presence_penalties(logits, counts, 2.5, 0.0)
    with pytest.raises(ValueError, match="shape"):
        apply_frequency_presence_penalties(logits, counts[:, :2], 0.5, 0.0)


@FAST
@given(logits=logits_batches(), penalty=st.floats(1.01, 10.0), data=st.data())
def test_repetition_penalty_above_one_never_raises_a_seen_token(logits, penalty, data):
    seen = torch.tensor(data.draw(st.lists(st.booleans(), min_size=logits.numel(), max_size=logits.numel())))
    seen = seen.view_as(logits)
    out = apply_repetition_penalty(logits, seen, penalty)
    assert torch.equal(out[~seen], logits[~seen])
    assert torch.all(out[seen] <= logits[seen])


# ----------------------------------------------------------------------------------------
# process_logits


def test_penalties_come_before_temperature():
    logits = torch.tensor([[1.0, 1.0]])
    counts = torch.tensor([[1, 0]])
    spec = DecodingSpec(temperature=0.5, frequency_penalty=1.0)
    # Penalty first: [1 - 1, 1] / 0.5 = [0, 2]. (Temperature first would give [2 - 1, 2] = [1, 2].)
    assert process_logits(logits, spec, counts=counts).tolist() == [[0.0, 2.0]]


def test_top_k_comes_before_top_p():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # top-k 2 leaves .4, .3, renormalised to 4/7 = .571 and 3/7 = .429; .571 alone reaches
    # p = .5. (top-p first would keep .4 + .3, and top-k 2 would then keep both.)
    assert kept(process_logits(logits, DecodingSpec(top_k=2, top_p=0.5))[0]) == {0}


def test_top_p_comes_before_min_p():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # top-p .75: running mass before each token 0, .4, .7, .9 -> keeps ids 0, 1, 2.
    # min-p .45: threshold .45 * .4 = .18 -> .2 survives, so ids 0, 1, 2.
    # (min-p first keeps .4 .3 .2, renormalised .444 .333 .222; mass before id 2 is .777 >= .75,
    # so top-p would then keep only ids 0 and 1.)
    assert kept(process_logits(logits, DecodingSpec(top_p=0.75, min_p=0.45))[0]) == {0, 1, 2}


def test_min_p_comes_before_typical():
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    # min-p .3: threshold .15 drops the two .125s; renormalised [2/3, 1/3].
    # Entropy of that: (2/3) ln 1.5 + (1/3) ln 3 = .2703 + .3662 = .6365 nats; surprises
    # ln 1.5 = .4055 and ln 3 = 1.0986, distances .2310 and .4621: id 0 first, and its 2/3
    # reaches mass .5 alone. (typical .5 first keeps ids 1 and 0, as in the typical worked
    # example, and min-p .3 would then keep both: 1/3 >= .3 * 2/3.)
    assert kept(process_logits(logits, DecodingSpec(min_p=0.3, typical_p=0.5))[0]) == {0}


def test_every_step_at_once_by_hand():
    spec = DecodingSpec(repetition_penalty=2, frequency_penalty=0.5, presence_penalty=0.5, temperature=0.5,
                        top_k=3, top_p=0.95, min_p=0.1, typical_p=0.9)
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0, -1.0]])
    seen = torch.tensor([[True, False, False, False, False]])
    counts = torch.tensor([[0, 0, 1, 0, 0]])
    # repetition (id 0 seen): 2 / 2 -> [1, 1, 0, 0, -1]; frequency + presence (id 2 generated
    # once): 0 - .5 - .5 -> [1, 1, -1, 0, -1]; temperature .5 -> [2, 2, -2, 0, -2].
    # top-k 3: the 3rd largest is 0 -> ids 0, 1, 3, probabilities e^2, e^2, 1 over 15.78 =
    # .4683, .4683, .0634. top-p .95: mass before id 3 is .9366 < .95, all three stay.
    # min-p .1: id 3's ratio e^-2 = .135 >= .1, stays. typical .9: entropy
    # 2 * .4683 * .7586 + .0634 * 2.758 = .885 nats; surprises .7586 (ids 0, 1) and 2.758
    # (id 3) -> ids 0, 1 are the most typical and their mass .9366 reaches .9: id 3 goes.
    out = process_logits(logits, spec, seen=seen, counts=counts)
    assert out.tolist() == [[2.0, 2.0, -INF, -INF, -INF]]
    # Leave out the last step and id 3 stays: the typical step ran, after the others.
    without_typical = dataclasses.replace(spec, typical_p=None)
    assert process_logits(logits, without_typical, seen=seen, counts=counts).tolist() == [[2.0, 2.0, -INF, 0.0, -INF]]


def test_greedy_pipeline_applies_only_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, False, False]])
    spec = parse_strategy("greedy:rep=2")
    out = process_logits(logits, spec, seen=seen)
    assert out.tolist() == [[1.0, -2.0, 1.0]]  # 2 / 2 = 1; nothing else changes
    assert choose_tokens(out, spec, None).tolist() == [0]  # ids 0 and 2 tie at 1: lowest id


def test_missing_penalty_inputs_are_an_error():
    logits = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="seen"):
        process_logits(logits, DecodingSpec(repetition_penalty=1.2))
    with pytest.raises(ValueError, match="counts"):
        process_logits(logits, DecodingSpec(presence_penalty=0.5))


def test_pipeline_is_robust_to_extreme_rows():
    spec = parse_strategy("sample:t=0.7,top-k=2,top-p=0.5,min-p=0.1,typical=0.5,rep=1.3,pres=0.5")
    one_finite = torch.tensor([[-INF, 3.0, -INF, -INF]])
    huge = torch.tensor([[1e30, -1e30, 9e29, 0.0]])
    for logits in (one_finite, huge):
        seen = torch.ones_like(logits, dtype=torch.bool)
        counts = torch.ones_like(logits, dtype=torch.long)
        out = process_logits(logits, spec, seen=seen, counts=counts)
        probs = torch.softmax(out, dim=-1)
        assert not torch.isnan(out).any() and not torch.isnan(probs).any()
        assert torch.allclose(probs.sum(dim=-1), torch.ones(1))
        generator = torch.Generator().manual_seed(0)
        assert choose_tokens(out, spec, [generator]).item() == logits.argmax().item()
    # A tiny temperature on large logits stays finite for the kept token.
    out = process_logits(torch.tensor([[50.0, -50.0, 49.0]]), DecodingSpec(temperature=MIN_TEMPERATURE))
    assert torch.isfinite(out).all() and torch.softmax(out, dim=-1)[0, 0] == 1.0


def test_half_precision_logits_are_processed_in_float32():
    logits = torch.tensor([[30.0, 10.0, -20.0, 5.0]], dtype=torch.float16)
    spec = DecodingSpec(temperature=1e-4, top_k=3)
    out = process_logits(logits, spec)
    # 30 / 1e-4 = 300000 overflows float16 (max 65504) but not float32.
    assert out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([300_000.0, 100_000.0, -INF, 50_000.0])
    assert logits.dtype == torch.float16  # input untouched


# ----------------------------------------------------------------------------------------
# choose_tokens


def near_uniform_logits(batch: int, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    """Many nearly equally likely tokens, so any dependence on other rows would show."""
    return 0.1 * torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_rows_sample_independently_of_the_batch():
    spec = DecodingSpec()
    logits = near_uniform_logits(4)
    seeds = [11, 22, 33, 44]
    batch_gens, alone_gens = generators_for(seeds), generators_for(seeds)
    for _ in range(5):  # several steps: each generator advances only with its own row
        together = choose_tokens(logits, spec, batch_gens)
        alone = [choose_tokens(logits[b : b + 1], spec, [alone_gens[b]]).item() for b in range(4)]
        assert together.tolist() == alone
    # Reordering the batch (rows with their generators) permutes the tokens and nothing else.
    permutation = [2, 0, 3, 1]
    reordered = choose_tokens(logits[permutation], spec, generators_for([seeds[i] for i in permutation]))
    first = choose_tokens(logits, spec, generators_for(seeds))
    assert reordered.tolist() == first[permutation].tolist()
    # Changing another row's logits does not change row 0's token.
    changed = logits.clone()
    changed[1:] = torch.randn(3, 1000)
    assert choose_tokens(changed, spec, generators_for(seeds))[0] == first[0]


def test_same_seed_same_tokens_different_seed_different_tokens():
    spec = DecodingSpec(top_p=0.9)
    logits = process_logits(near_uniform_logits(2), spec)

    def draw(seeds: list[int]) -> list[list[int]]:
        gens = generators_for(seeds)
        return [choose_tokens(logits, spec, gens).tolist() for _ in range(20)]

    assert draw([5, 6]) == draw([5, 6])
    # ~900 tokens per row: 20 equal draws by chance has probability about 900^-20.
    assert draw([5, 6]) != draw([7, 8])


def test_sampling_follows_the_softmax():
    spec = DecodingSpec()
    probs = [0.1, 0.2, 0.3, 0.4]
    logits = torch.tensor(probs).log().expand(8000, 4)
    torch_generator_state = torch.get_rng_state()
    torch.manual_seed(1234)
    tokens = choose_tokens(logits, spec, None)
    torch.set_rng_state(torch_generator_state)
    frequencies = torch.bincount(tokens, minlength=4).double() / 8000
    # Standard error sqrt(.4 * .6 / 8000) = .0055; 0.025 is about 4.5 of them.
    assert torch.allclose(frequencies, torch.tensor(probs, dtype=torch.float64), atol=0.025)


def test_choose_tokens_rejects_misuse():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="generators"):
        choose_tokens(logits, DecodingSpec(), generators_for([1]))
    with pytest.raises(ValueError, match="beam"):
        choose_tokens(logits, DecodingSpec(num_beams=3), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_on_ties():
    logits = torch.randint(0, 3, (4, 50_000)).float()
    cuda = logits.cuda()
    assert torch.equal(greedy_tokens(cuda).cpu(), greedy_tokens(logits))
    assert torch.equal(top_p_filter(cuda, 0.3).cpu(), top_p_filter(logits, 0.3))
    assert torch.equal(typical_filter(cuda, 0.3).cpu(), typical_filter(logits, 0.3))

    def cuda_generator(seed: int) -> torch.Generator:
        return torch.Generator(device="cuda").manual_seed(seed)

    together = choose_tokens(cuda, DecodingSpec(), [cuda_generator(b) for b in range(4)])
    alone = [choose_tokens(cuda[b : b + 1], DecodingSpec(), [cuda_generator(b)]).item() for b in range(4)]
    assert together.tolist() == alone


# ----------------------------------------------------------------------------------------
# What the strategy samples from, the vocabulary mask, the penalty state.


def inverse_transform(probs: list[float], u: float) -> int:
    """The token that inverse transform sampling picks for the uniform u, in plain Python:
    the first whose running total (float64, in order) exceeds u times the whole total."""
    total = 0.0
    for p in probs:
        total += p
    running = 0.0
    for token, p in enumerate(probs):
        running += p
        if running > u * total:
            return token
    return max(token for token, p in enumerate(probs) if p > 0)


def test_draw_tokens_follows_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = [int(draw_tokens(probs, [generator])[0]) for _ in range(6000)]
    counts = [draws.count(token) for token in range(5)]
    assert counts[1] == counts[4] == 0
    expected = [6000 * p for p in (0.5, 0.3, 0.2)]
    chi2 = sum((c - e) ** 2 / e for c, e in zip([counts[0], counts[2], counts[3]], expected))
    assert chi2 < 13.82  # chi-squared, 2 degrees of freedom, p = 0.001
    # rows draw from their own generators only: the same seed, the same token, whatever the batch
    batch = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    seeded = draw_tokens(batch, [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    assert seeded[0] == draw_tokens(batch[:1], [torch.Generator().manual_seed(7)])[0] and seeded[1] == 4
    with pytest.raises(ValueError, match="one per row"):
        draw_tokens(batch, [generator])


@FAST
@given(logits=logits_batches(), k=st.integers(1, 5))
def test_sampling_distribution_is_what_choose_tokens_draws_from(logits, k):
    greedy = sampling_distribution(logits, DecodingSpec(temperature=0), torch.float64)
    assert torch.equal(greedy.argmax(dim=-1), greedy_tokens(logits))  # one-hot at the first maximum
    assert torch.equal(greedy.sum(dim=-1), torch.ones(logits.size(0), dtype=torch.float64))
    assert set(greedy.unique().tolist()) <= {0.0, 1.0}
    spec = DecodingSpec(top_k=k)
    processed = process_logits(logits, spec)
    sampled = sampling_distribution(processed, spec, torch.float64)
    for row_out, row_probs in zip(processed, sampled):
        expected = probabilities(row_out.tolist())
        assert row_probs.tolist() == pytest.approx(expected, abs=1e-12)
    # choose_tokens draws from it: the same generator draws the same token from it by hand
    drawn = choose_tokens(processed, spec, [torch.Generator().manual_seed(b) for b in range(logits.size(0))])
    by_hand = [inverse_transform(sampling_distribution(processed[b : b + 1], spec)[0].tolist(),
                                 torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(b)).item())
               for b in range(logits.size(0))]
    assert drawn.tolist() == by_hand
    with pytest.raises(ValueError, match="beam"):
        sampling_distribution(logits, DecodingSpec(num_beams=2))


def test_vocab_padding_gets_no_probability_and_the_input_is_untouched():
    logits = torch.tensor([[1.0, 2.0, 3.0, 9.0, 9.0]])
    masked = mask_vocab_padding(logits, 3)
    assert masked.tolist() == [[1.0, 2.0, 3.0, -INF, -INF]]
    assert logits[0, 3] == 9.0
    assert mask_vocab_padding(logits, 5).tolist() == logits.tolist()
    assert mask_vocab_padding(logits, 5) is not logits


def test_penalty_state_sees_the_prompt_and_counts_only_generated_tokens():
    spec = DecodingSpec(repetition_penalty=2.0, frequency_penalty=0.5)
    state = PenaltyState(spec, [[0, 0, 2], [1]], vocab_size=4)
    assert state.seen.tolist() == [[True, False, True, False], [False, True, False, False]]
    assert state.counts.tolist() == [[0.0] * 4, [0.0] * 4]
    state.add(torch.tensor([3, 1]))
    state.add(torch.tensor([3, 2]))
    assert state.seen.tolist() == [[True, False, True, True], [False, True, True, False]]
    assert state.counts.tolist() == [[0, 0, 0, 2], [0, 1, 1, 0]]
    # logits [2, 2, 2, 2]: seen tokens halved, then 0.5 per generated occurrence
    processed = state.process(torch.full((2, 4), 2.0), spec)
    assert processed.tolist() == [[1.0, 2.0, 1.0, 0.0], [2.0, 0.5, 0.5, 2.0]]
    state.reorder(torch.tensor([1, 1]))
    assert state.counts.tolist() == [[0, 1, 1, 0], [0, 1, 1, 0]]
    plain = PenaltyState(DecodingSpec(), [[0]], vocab_size=4)
    assert plain.seen is None and plain.counts is None

