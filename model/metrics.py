"""What `sample.py compare` reports for each decoding strategy.

The metrics follow Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration" (perplexity, self-BLEU, Zipf coefficient, repetition), plus
distinct-n (Li et al. 2016). Each one is a small pure function.

Units. Every function except `perplexity` works on sequences of hashable *units*:
token ids, words, characters, ... The caller chooses the unit, and the numbers
depend on it (distinct-1 over characters is not distinct-1 over words), so a
comparison table should say which unit it used. Pass only the generated
continuation: no prompt, and no trailing end-of-text token.

Undefined values are `nan`, never a made-up 0: the perplexity of no tokens,
distinct-n with no n-grams, self-BLEU of fewer than two samples, the Zipf fit of
fewer than two distinct units, the share of an empty set. `nan` shows up as such in
a table instead of looking like a real (and extreme) measurement.

Direction: higher distinct-n, lower self-BLEU, lower Zipf coefficient and a lower
repetition rate mean more diverse text; perplexity near that of human text is the
target, not the lowest value (greedy and beam search score lowest of all).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import TypeVar

from model.errors import UserError

T = TypeVar("T", bound=Hashable)

# NLTK's SmoothingFunction().method1 default, used by Texygen's and Holtzman et al.'s
# self-BLEU scripts; keeping it makes our numbers comparable with theirs.
BLEU_EPSILON = 0.1


def mean(values: Iterable[float], *, skip_nan: bool = False) -> float:
    """Arithmetic mean; nan for no values. A nan among the values makes the mean nan, unless
    ``skip_nan``: then it is the mean of the values that are not nan (averaging a metric
    over groups of which some had nothing to measure)."""
    values = [v for v in values if not (skip_nan and math.isnan(v))]
    return math.fsum(values) / len(values) if values else math.nan


def _ngrams(units: Sequence[T], n: int) -> list[tuple[T, ...]]:
    """The len(units) - n + 1 contiguous n-grams of `units`, as tuples (none if too short)."""
    units = tuple(units)
    return [units[i : i + n] for i in range(len(units) - n + 1)]


def _all_but(items: list, i: int) -> list:
    """`items` without its i-th element."""
    return items[:i] + items[i + 1 :]


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{name} must be a positive integer, got {value}")


# ----------------------------------------------------------------------------- likelihood


def perplexity(token_logprobs: Sequence[float]) -> float:
    """exp(-mean(token_logprobs)): the perplexity of the tokens whose log-probabilities are given.

    `token_logprobs` are natural-log probabilities, one per token, pooled over all
    samples (a corpus-level perplexity, not a mean of per-sample perplexities).
    For a comparison of decoding strategies they should come from the model's own,
    unmodified distribution (as in Holtzman et al.), not from the truncated or
    temperature-scaled one a strategy sampled from, which would flatter top-k and
    friends. Returns nan for no tokens and inf when the mean is -inf or so negative
    that the exponential overflows.
    """
    if len(token_logprobs) == 0:
        return math.nan
    mean_nll = -math.fsum(token_logprobs) / len(token_logprobs)
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


# ----------------------------------------------------------------------------- diversity


def distinct_n(samples: Sequence[Sequence[T]], n: int) -> float:
    """Distinct-n: the number of distinct n-grams divided by the number of n-grams.

    Pooled ("corpus-level") definition: the n-grams of all samples are counted
    together, each n-gram type once in the numerator, every occurrence in the
    denominator. This is not the mean of per-sample ratios: [[a, a], [a, b]] has
    distinct-1 = 2/4 = 0.5 here, while averaging per sample would give 0.75. An
    n-gram never crosses a sample boundary, so a sample shorter than n contributes
    nothing. Result in (0, 1]; nan when no sample has n units (no n-grams at all).

    Note: Holtzman et al.'s script counts n-gram types that occur exactly once,
    not all distinct types; this is the usual definition of Li et al. 2016.
    """
    _check_positive("distinct-n order n", n)
    all_ngrams = [gram for sample in samples for gram in _ngrams(sample, n)]
    if not all_ngrams:
        return math.nan
    return len(set(all_ngrams)) / len(all_ngrams)


def _ngram_counts(units: Sequence[T], max_n: int) -> list[Counter[tuple[T, ...]]]:
    """Counters of the 1-grams, 2-grams, ..., max_n-grams of `units` (index 0 holds 1-grams)."""
    return [Counter(_ngrams(units, n)) for n in range(1, max_n + 1)]


def _bleu_from_counts(
    hyp_counts: list[Counter],
    hyp_len: int,
    refs_counts: list[list[Counter]],
    ref_lens: list[int],
) -> float:
    """BLEU of one hypothesis from precomputed n-gram counts; see `bleu` for the definition."""
    log_precisions = []
    for n, hyp_ngrams in enumerate(hyp_counts):
        # Clipping: an n-gram is credited at most as often as it occurs in any single reference.
        matches = sum(
            min(count, max(ref[n][gram] for ref in refs_counts))
            for gram, count in hyp_ngrams.items()
        )
        # At least 1, so a hypothesis shorter than n gets precision 0/1 (as NLTK does).
        total = max(1, sum(hyp_ngrams.values()))
        if n == 0 and matches == 0:
            return 0.0  # no unigram in common: BLEU is 0, and no smoothing applies
        log_precisions.append(math.log((matches or BLEU_EPSILON) / total))

    # Closest reference length; on a tie the shorter one (NLTK and the BLEU paper).
    closest_ref_len = min(ref_lens, key=lambda ref_len: (abs(ref_len - hyp_len), ref_len))
    if hyp_len > closest_ref_len:
        brevity_penalty = 1.0
    else:  # hyp_len > 0 here: an empty hypothesis has no unigram match and returned above
        brevity_penalty = math.exp(1 - closest_ref_len / hyp_len)
    return brevity_penalty * math.exp(math.fsum(log_precisions) / len(log_precisions))


def bleu(hypothesis: Sequence[T], references: Sequence[Sequence[T]], max_n: int = 4) -> float:
    """Sentence BLEU-`max_n` of `hypothesis` against several `references`, in [0, 1].

    BLEU = BP * exp(sum_{n=1..max_n} log(p_n) / max_n), with uniform weights, where

    - p_n, the clipped n-gram precision: each hypothesis n-gram counts as matched at
      most as many times as it occurs in the single reference that has it most often;
      p_n = matched / max(1, number of hypothesis n-grams).
    - smoothing for p_n = 0 (NLTK's SmoothingFunction().method1, the choice of Texygen
      and of Holtzman et al.'s self-BLEU script): the 0 matches become 0.1, so
      p_n = 0.1 / max(1, number of hypothesis n-grams). One exception, also as in NLTK:
      when not even one unigram matches, BLEU is 0. A hypothesis shorter than n has
      "0/1" n-grams of that order, so it scores below 1 even against itself.
    - BP, the brevity penalty: 1 if the hypothesis is longer than r, else exp(1 - r/c),
      c the hypothesis length and r the reference length closest to c (the shorter
      on a tie).

    This matches nltk.translate.bleu_score.sentence_bleu(references, hypothesis,
    smoothing_function=SmoothingFunction().method1) with uniform weights.
    An empty hypothesis scores 0. `references` must not be empty.
    """
    _check_positive("BLEU max n-gram order max_n", max_n)
    if len(references) == 0:
        raise UserError("BLEU needs at least one reference")
    return _bleu_from_counts(
        _ngram_counts(hypothesis, max_n),
        len(hypothesis),
        [_ngram_counts(ref, max_n) for ref in references],
        [len(ref) for ref in references],
    )


def self_bleu(samples: Sequence[Sequence[T]], max_n: int = 4) -> float:
    """Self-BLEU (Zhu et al. 2018, Texygen): how much the samples resemble one another.

    The mean over samples i of bleu(samples[i], all the other samples, max_n): see
    `bleu` for the exact BLEU (clipped counts over multiple references, uniform
    weights, closest-length brevity penalty, NLTK method1 smoothing). In [0, 1];
    lower = more diverse; identical samples of at least `max_n` units score 1.
    Returns nan for fewer than 2 samples. Cost is quadratic in the number of
    samples, so compute it per prompt (samples of one prompt against each other),
    as model/compare.py does. Unlike Holtzman et al., who scored a random subset of 1000
    hypotheses, every sample is scored.
    """
    _check_positive("self-BLEU max n-gram order max_n", max_n)
    if len(samples) < 2:
        return math.nan
    # Count each sample's n-grams once; they serve as hypothesis once and as reference m-1 times.
    counts = [_ngram_counts(sample, max_n) for sample in samples]
    lengths = [len(sample) for sample in samples]
    return mean(
        _bleu_from_counts(counts[i], lengths[i], _all_but(counts, i), _all_but(lengths, i))
        for i in range(len(samples))
    )


def zipf_coefficient_from_counts(counts: Iterable[float]) -> float:
    """The Zipf exponent s fitted to a list of frequencies (any order; each > 0).

    The counts are sorted in decreasing order and given ranks 1, 2, ...; s is minus
    the slope of the ordinary least-squares line of log(count) against log(rank), so
    counts exactly proportional to 1/rank^s give s back. Ties keep their positions in
    the sorted list, so the result does not depend on the input order. Returns nan
    for fewer than 2 counts to fit.
    """
    ranked = sorted(counts, reverse=True)
    if len(ranked) < 2:
        return math.nan
    if ranked[-1] <= 0:
        raise UserError(f"Zipf counts must be positive, got {ranked[-1]}")
    xs = [math.log(rank) for rank in range(1, len(ranked) + 1)]
    ys = [math.log(count) for count in ranked]
    x_mean, y_mean = mean(xs), mean(ys)
    covariance = math.fsum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys))
    variance = math.fsum((x - x_mean) ** 2 for x in xs)
    return -covariance / variance


def zipf_coefficient(units: Iterable[Hashable]) -> float:
    """The Zipf exponent s of the unit frequencies in `units` (all samples concatenated).

    Counts how often each distinct unit occurs and fits log(count) = c - s*log(rank)
    by least squares over all distinct units, rank 1 the most frequent; see
    `zipf_coefficient_from_counts`. Every distinct unit is fitted (Holtzman et al.'s
    script fitted the top 5000 ranks: the same whenever there are at most 5000
    distinct units). Natural English
    words give s near 1; a larger s means frequency concentrated on fewer units.
    Returns nan for fewer than 2 distinct units.
    """
    return zipf_coefficient_from_counts(Counter(units).values())


# ----------------------------------------------------------------------------- repetition


def ends_in_repetition(
    tokens: Sequence[Hashable], min_phrase_len: int = 3, min_repeats: int = 2
) -> bool:
    """Whether the sequence ends in a repeating loop.

    Exact rule: True iff for some phrase length L >= `min_phrase_len`, the last
    min_repeats * L units are one L-unit phrase written `min_repeats` times back to
    back (with the defaults: the sequence ends with some phrase of 3 or more units,
    twice in a row). A loop of a shorter phrase therefore counts once it spans that
    many copies of a long enough phrase: with the defaults, 6 copies of one unit
    ("the the the | the the the") or 4 of a two-unit phrase. There is no upper limit
    on L. Pass the generated units only, without a final end-of-text token.

    Holtzman et al.'s script (metrics/repetition.py in ari-holtzman/degen) drops a
    final end-of-text token, finds, for each phrase length 1..90, how many times the
    final phrase repeats at the end, keeps the single length with the most repeats
    (the shortest on a tie), and flags the sample if that phrase repeats at least
    twice and either has 3+ tokens or repeats more than 50 times. Every sequence it
    flags is flagged here too; we differ where its choice of a single length hides a
    loop: "x y z z x y z z" ends in a 4-unit phrase repeated twice, but the 1-unit
    "z z" repeats as often, wins the tie and fails the length test. We also count
    short-phrase loops well before 51 copies, and longer phrases than 90 units.
    With character units, choose a larger `min_phrase_len` ("......" is a loop by
    the defaults).
    """
    _check_positive("min_phrase_len", min_phrase_len)
    if min_repeats < 2:
        raise UserError(f"min_repeats must be at least 2 (a loop repeats), got {min_repeats}")
    tokens = list(tokens)
    for phrase_len in range(min_phrase_len, len(tokens) // min_repeats + 1):
        tail = tokens[-phrase_len * min_repeats :]
        # The tail is one phrase repeated iff shifting it by one phrase length changes nothing.
        if tail[phrase_len:] == tail[:-phrase_len]:
            return True
    return False


def repetition_rate(
    samples: Sequence[Sequence[Hashable]], min_phrase_len: int = 3, min_repeats: int = 2
) -> float:
    """The share of samples for which `ends_in_repetition` holds, in [0, 1]; nan for no samples."""
    return mean(float(ends_in_repetition(sample, min_phrase_len, min_repeats)) for sample in samples)
