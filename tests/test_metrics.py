"""Tests for model/metrics.py: hand-worked values, a self-BLEU worked step by step, properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import UserError
from model.metrics import (
    bleu,
    distinct_n,
    ends_in_repetition,
    mean,
    perplexity,
    repetition_rate,
    self_bleu,
    zipf_coefficient,
    zipf_coefficient_from_counts,
)

FAST = settings(max_examples=60, deadline=None)
units = st.integers(min_value=0, max_value=4)  # a small alphabet, so repeats actually happen


# ----------------------------------------------------------------------------- mean


def test_mean_by_hand():
    assert mean([1.0, 2.0, 6.0]) == 3.0 and mean(x for x in (0.5, 1.0)) == 0.75
    assert math.isnan(mean([])) and math.isnan(mean([1.0, math.nan]))  # nothing, or an undefined value
    assert mean([1.0, math.nan, 2.0], skip_nan=True) == 1.5  # over the values that are defined
    assert math.isnan(mean([math.nan], skip_nan=True))


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_by_hand():
    # mean log p = (ln 1/2 + ln 1/4) / 2 = -1.5 ln 2, so perplexity = 2 ** 1.5
    assert perplexity([math.log(0.5), math.log(0.25)]) == pytest.approx(2**1.5, rel=1e-12)


def test_perplexity_edge_cases():
    assert math.isnan(perplexity([]))
    assert perplexity([0.0, -math.inf]) == math.inf
    assert perplexity([-1000.0]) == math.inf  # exp(1000) overflows a float: inf, not an exception
    assert perplexity([0.0, 0.0]) == 1.0  # every token certain


@FAST
@given(vocab_size=st.integers(1, 10**6), n_tokens=st.integers(1, 300))
def test_perplexity_of_uniform_guessing_is_vocab_size(vocab_size, n_tokens):
    assert perplexity([math.log(1 / vocab_size)] * n_tokens) == pytest.approx(vocab_size, rel=1e-9)


# ----------------------------------------------------------------------------- distinct-n


def test_distinct_n_by_hand():
    samples = [list("abab"), list("abc")]
    # unigrams: a b a b | a b c -> 7 in all, 3 distinct (a, b, c)
    assert distinct_n(samples, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc -> 5 in all, 3 distinct (ab, ba, bc); no "ba" across the boundary
    assert distinct_n(samples, 2) == pytest.approx(3 / 5)


def test_distinct_n_is_pooled_not_averaged_per_sample():
    # pooled: a a a b -> 2 distinct / 4; the per-sample mean would be (1/2 + 2/2) / 2 = 0.75
    assert distinct_n([["a", "a"], ["a", "b"]], 1) == 0.5


def test_distinct_n_never_crosses_sample_boundaries():
    # Each sample has 2 units: no trigram at all (joined, "a b a" and "b a b" would exist).
    assert math.isnan(distinct_n([["a", "b"], ["a", "b"]], 3))
    assert math.isnan(distinct_n([], 1))
    # Bigrams ab | ab -> 1 distinct / 2; crossing the boundary would add "ba": 2/3.
    assert distinct_n([["a", "b"], ["a", "b"]], 2) == 0.5


def test_distinct_n_rejects_bad_order():
    with pytest.raises(UserError, match="n must be a positive integer, got 0"):
        distinct_n([[1, 2]], 0)


@FAST
@given(samples=st.lists(st.lists(units, max_size=12), max_size=6), n=st.integers(1, 4))
def test_distinct_n_is_a_fraction(samples, n):
    value = distinct_n(samples, n)
    has_ngrams = any(len(sample) >= n for sample in samples)
    assert (0 < value <= 1) if has_ngrams else math.isnan(value)


@FAST
@given(
    unique_units=st.lists(st.integers(), min_size=1, max_size=40, unique=True),
    cut_points=st.lists(st.integers(0, 40), max_size=4),
    n=st.integers(1, 4),
)
def test_distinct_n_is_one_when_no_ngram_repeats(unique_units, cut_points, n):
    # Split a run of all-different units into samples: no n-gram can occur twice.
    bounds = [0, *sorted(min(c, len(unique_units)) for c in cut_points), len(unique_units)]
    samples = [unique_units[a:b] for a, b in zip(bounds, bounds[1:])]
    if any(len(sample) >= n for sample in samples):
        assert distinct_n(samples, n) == 1.0


# ----------------------------------------------------------------------------- BLEU and self-BLEU


def test_self_bleu_three_samples_worked_step_by_step():
    s1, s2, s3 = "a b c d".split(), "a b a b c".split(), "b c d e e e".split()

    # Hypothesis s1 = a b c d (c = 4); references s2, s3.
    #   1-grams a b c d: max ref counts a:2 (s2) b:2 (s2) c:1 d:1 (s3) -> clipped 4 / 4
    #   2-grams ab bc cd: ab in s2, bc in both, cd in s3                -> 3 / 3
    #   3-grams abc bcd: abc in s2, bcd in s3                           -> 2 / 2
    #   4-grams abcd: s2 has abab babc, s3 has bcde cdee deee           -> 0 / 1, smoothed 0.1 / 1
    #   ref lengths 5, 6: closest r = 5 >= c = 4, so BP = exp(1 - 5/4)
    bleu_1 = math.exp(1 - 5 / 4) * (1 * 1 * 1 * 0.1) ** (1 / 4)

    # Hypothesis s2 = a b a b c (c = 5); references s1, s3.
    #   1-grams a:2 b:2 c:1; max ref counts a:1 b:1 c:1                 -> clipped 1+1+1 = 3 / 5
    #   2-grams ab:2 ba:1 bc:1; ab:1 (s1), ba:0, bc:1                    -> 1+0+1 = 2 / 4
    #   3-grams aba bab abc; only abc (s1)                              -> 1 / 3
    #   4-grams abab babc; none                                         -> 0 / 2, smoothed 0.1 / 2
    #   ref lengths 4, 6 are both 1 away: the tie goes to the shorter, r = 4 < c = 5, so BP = 1
    #   (taking r = 6 would give exp(1 - 6/5) instead)
    bleu_2 = 1.0 * (3 / 5 * 2 / 4 * 1 / 3 * 0.05) ** (1 / 4)

    # Hypothesis s3 = b c d e e e (c = 6); references s1, s2.
    #   1-grams b:1 c:1 d:1 e:3; e is in no reference                   -> 1+1+1+0 = 3 / 6
    #   2-grams bc cd de ee:2; bc, cd in s1                             -> 2 / 5
    #   3-grams bcd cde dee eee; bcd in s1                              -> 1 / 4
    #   4-grams bcde cdee deee; none                                    -> 0 / 3, smoothed 0.1 / 3
    #   ref lengths 4, 5: closest r = 5 < c = 6, so BP = 1
    bleu_3 = 1.0 * (3 / 6 * 2 / 5 * 1 / 4 * (0.1 / 3)) ** (1 / 4)

    # The products under the fourth roots are 0.1, 0.005 and 1/600.
    assert bleu_1 == pytest.approx(math.exp(-0.25) * 0.1**0.25, rel=1e-12)
    assert bleu_2 == pytest.approx(0.005**0.25, rel=1e-12)
    assert bleu_3 == pytest.approx((1 / 600) ** 0.25, rel=1e-12)

    assert bleu(s1, [s2, s3]) == pytest.approx(bleu_1, rel=1e-12)
    assert bleu(s2, [s1, s3]) == pytest.approx(bleu_2, rel=1e-12)
    assert bleu(s3, [s1, s2]) == pytest.approx(bleu_3, rel=1e-12)
    assert self_bleu([s1, s2, s3]) == pytest.approx((bleu_1 + bleu_2 + bleu_3) / 3, rel=1e-12)


def test_bleu_edge_cases():
    # No unigram in common: 0 outright, no smoothing.
    assert bleu(list("abcd"), [list("efgh")]) == 0.0
    assert bleu([], [list("abcd")]) == 0.0
    # Hypothesis shorter than 4 units, identical to its reference: p1 = p2 = 1, and p3, p4 are
    # "0 / 1" smoothed to 0.1 each (NLTK's behaviour), so BLEU = (0.1 * 0.1) ** (1/4) = sqrt(0.1).
    assert bleu(list("ab"), [list("ab")]) == pytest.approx(math.sqrt(0.1), rel=1e-12)
    # BLEU-2 of the same pair is 1: max_n changes the orders used.
    assert bleu(list("ab"), [list("ab")], max_n=2) == 1.0
    with pytest.raises(UserError, match="at least one reference"):
        bleu(list("ab"), [])
    with pytest.raises(UserError, match="max_n must be a positive integer"):
        self_bleu([list("ab"), list("ab")], max_n=0)


def test_self_bleu_needs_two_samples():
    assert math.isnan(self_bleu([]))
    assert math.isnan(self_bleu([list("abcd")]))


@FAST
@given(sample=st.lists(units, min_size=4, max_size=20), copies=st.integers(2, 5))
def test_self_bleu_of_identical_samples_is_one(sample, copies):
    assert self_bleu([sample] * copies) == pytest.approx(1.0, rel=1e-12)


@FAST
@given(samples=st.lists(st.lists(units, max_size=10), min_size=2, max_size=5))
def test_self_bleu_is_between_zero_and_one(samples):
    assert 0.0 <= self_bleu(samples) <= 1.0


# ----------------------------------------------------------------------------- Zipf


def test_zipf_by_hand():
    # Counts a:4, b:1 -> points (ln 1, ln 4) and (ln 2, ln 1): slope = (0 - 2 ln 2) / ln 2 = -2.
    assert zipf_coefficient(list("aaaab")) == pytest.approx(2.0, rel=1e-12)
    # Counts a:2, b:1 -> points (0, ln 2) and (ln 2, 0): slope = -ln 2 / ln 2 = -1.
    assert zipf_coefficient(list("aab")) == pytest.approx(1.0, rel=1e-12)


def test_zipf_three_points_by_hand():
    # Counts 4, 2, 1 at ranks 1, 2, 3; x = ln r, y = ln count = (2 ln 2, ln 2, 0).
    # slope = sum((x - mean x)(y - mean y)) / sum((x - mean x)^2), written out:
    x = [0.0, math.log(2), math.log(3)]
    y = [2 * math.log(2), math.log(2), 0.0]
    mx, my = sum(x) / 3, sum(y) / 3
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    assert zipf_coefficient(list("aaaabbc")) == pytest.approx(-slope, rel=1e-12)
    # Roughly: 1/r would be 4, 2, 1.33; this falls faster than 1/r, so s > 1.
    assert 1.2 < -slope < 1.3


def test_zipf_edge_cases():
    assert math.isnan(zipf_coefficient([]))
    assert math.isnan(zipf_coefficient(["a"] * 5))  # one distinct unit: no line
    assert zipf_coefficient("abcd") == 0.0  # all counts equal: flat
    with pytest.raises(UserError, match="positive"):
        zipf_coefficient_from_counts([3, 0])


@FAST
@given(
    k=st.floats(1.0, 1e6),
    s=st.floats(0.0, 3.0),
    n_ranks=st.integers(2, 500),
    seed=st.integers(0, 2**32 - 1),
)
def test_perfectly_zipfian_counts_give_s_back(k, s, n_ranks, seed):
    counts = [k / r**s for r in range(1, n_ranks + 1)]
    np.random.default_rng(seed).shuffle(counts)  # the order of the input does not matter
    assert zipf_coefficient_from_counts(counts) == pytest.approx(s, abs=1e-9)


@FAST
@given(counts=st.lists(st.integers(1, 1000), min_size=2, max_size=60))
def test_zipf_matches_numpy_least_squares(counts):
    ranked = sorted(counts, reverse=True)
    slope, _ = np.polyfit(np.log(np.arange(1, len(ranked) + 1)), np.log(ranked), 1)
    assert zipf_coefficient_from_counts(counts) == pytest.approx(-slope, abs=1e-9)


# ----------------------------------------------------------------------------- repetition


@pytest.mark.parametrize(
    "text, expected",
    [
        ("w x y z a b c a b c", True),  # "a b c" twice at the end
        ("a b c a b c d", False),  # the repeat is not at the end
        ("x a b a b", False),  # "a b" twice: the phrase is shorter than 3
        ("x y z z x y z z", True),  # "x y z z" twice (Holtzman et al.'s script misses it)
        ("a a a a a", False),  # 5 copies of one unit: "a a a" does not fit twice
        ("a a a a a a", True),  # 6 copies = "a a a" twice
        ("a b a b a b", False),  # "b a b" != "a b a"
        ("a b a b a b a b", True),  # "a b a b" twice
        ("a b c", False),
        ("", False),
    ],
)
def test_ends_in_repetition_by_hand(text, expected):
    assert ends_in_repetition(text.split()) is expected


def test_ends_in_repetition_options():
    tokens = "x a b c a b c".split()
    assert not ends_in_repetition(tokens, min_repeats=3)  # only two copies
    assert ends_in_repetition(["x"] + "a b c".split() * 3, min_repeats=3)
    assert not ends_in_repetition(tokens, min_phrase_len=4)  # the loop's phrase has 3 units
    assert ends_in_repetition("x a b a b".split(), min_phrase_len=2)
    with pytest.raises(UserError, match="min_repeats must be at least 2"):
        ends_in_repetition(tokens, min_repeats=1)
    with pytest.raises(UserError, match="min_phrase_len must be a positive integer"):
        ends_in_repetition(tokens, min_phrase_len=0)


@FAST
@given(
    prefix=st.lists(units, max_size=10),
    phrase=st.lists(units, min_size=3, max_size=8),
    copies=st.integers(2, 4),
)
def test_constructed_loop_is_detected(prefix, phrase, copies):
    assert ends_in_repetition(prefix + phrase * copies)


@FAST
@given(tokens=st.lists(st.integers(), max_size=40, unique=True))
def test_no_loop_without_a_repeated_unit(tokens):
    assert not ends_in_repetition(tokens)


def holtzman_flags_repetition(tokens, max_n=90):
    """Holtzman et al.'s rule, written plainly: the phrase length with the most repeats at the
    end (shortest on a tie) is flagged if it repeats twice or more and has 3+ units, or repeats
    more than 50 times."""
    best_len, best_repeats = 0, 0
    for n in range(1, max_n + 1):
        repeats = 1  # copies of the last n units found back to back at the end
        while (repeats + 1) * n <= len(tokens):
            block_start = len(tokens) - (repeats + 1) * n
            if tokens[block_start : block_start + n] != tokens[-n:]:
                break
            repeats += 1
        if repeats > best_repeats:
            best_len, best_repeats = n, repeats
    return best_repeats > 1 and (best_len >= 3 or best_repeats > 50)


@FAST
@given(tokens=st.lists(st.integers(0, 2), max_size=40))
def test_every_loop_holtzman_et_al_flag_is_flagged(tokens):
    if holtzman_flags_repetition(tokens):
        assert ends_in_repetition(tokens)


def test_holtzman_reference_rule_on_known_cases():
    # The plain transcription above agrees with the documented difference and a long short-loop.
    assert not holtzman_flags_repetition("x y z z x y z z".split())
    assert holtzman_flags_repetition("w a b c a b c".split())
    assert holtzman_flags_repetition(["x"] + ["a"] * 51)
    assert not holtzman_flags_repetition(["x"] + ["a"] * 50)


def test_repetition_rate():
    samples = ["a b c a b c".split(), "a b c d".split(), "q r s t q r s t".split(), "".split()]
    # loops: yes, no, yes, no -> 2 / 4
    assert repetition_rate(samples) == 0.5
    assert math.isnan(repetition_rate([]))


# ----------------------------------------------------------------------------- loops in a comparison row


def test_self_bleu_on_tokens_sees_the_loops_that_words_miss():
    """A greedy row: one looping text per prompt standing for 4 identical samples. On words
    a loop of spaces adds no word and a loop of word pieces at most one, so the identical samples score
    far below 1; on tokens they score 1, as identical samples must."""
    from model.compare import format_table, row_metrics, text_units
    from model.generate import Sample

    # Token ids stand for BPE pieces: 7 = " ", 8 = "ab", 9 = "cd", 10 = "ef".
    spaces = Sample(0, 0, tokens=[3, 4, 5] + [7] * 20, text="the dog ran" + " " * 20, finish="length")
    pieces = Sample(1, 0, tokens=[3] + [8, 9, 10] * 6, text="the " + "abcdef" * 6, finish="length")
    units_by_prompt = [[text_units(sample, "words")] * 4 for sample in (spaces, pieces)]
    row = row_metrics(units_by_prompt, [spaces, pieces])
    # BLEU-4 of a text against its copy: precisions 1 up to its length, then NLTK's 0.1 / 1
    # 3 words; 1 word ("the": the cut "abcdef..." is dropped, text_units' rule for a sample cut mid-word)
    words_by_hand = (0.1 ** (1 / 4) + 0.1 ** (3 / 4)) / 2
    assert row["self_bleu"] == pytest.approx(words_by_hand, rel=1e-12)
    assert row["self_bleu_tokens"] == 1.0
    assert row["repetition"] == 0.0 and row["repetition_tokens"] == 1.0
    header, line = format_table([{"strategy": "greedy", **row, "tokens_per_s": math.nan, "seconds": math.nan,
                                  "samples": 2}]).splitlines()
    assert "self-BLEU tok" in header and "1.000" in line.split()


def test_self_bleu_on_tokens_of_sampled_loops_of_spaces():
    """Four sampled samples, each "the" and then spaces (16 to 19 tokens): to words they are
    one word each (BLEU-4 of a single word against copies of it: 0.1^(3/4)); as tokens, each
    is nearly all of the longest one."""
    from model.compare import row_metrics, text_units
    from model.generate import Sample

    samples = [Sample(0, s, tokens=[3] + [7] * (15 + s), text="the" + " " * (15 + s), finish="length")
               for s in range(4)]
    row = row_metrics([[text_units(sample, "words") for sample in samples]], samples)
    assert row["self_bleu"] == pytest.approx(0.1 ** 0.75, rel=1e-12)
    tokens = [sample.tokens for sample in samples]
    assert row["self_bleu_tokens"] == pytest.approx(self_bleu(tokens), rel=1e-12) and row["self_bleu_tokens"] > 0.9
