"""Decoding steps: how a row of next-token logits becomes the next token.

Each step is one small pure function on a logits tensor of shape (B, V) (the filters
also accept a single row of shape (V,)); `process_logits` applies the steps a
`DecodingSpec` (model/strategy.py) asks for, in the chain order it names
(`strategy.CHAIN_ORDERS`, defined there once), and `choose_tokens`
picks the token. Generation, the strategy comparison and the "explain the next token"
table all go through these two, so a strategy means the same thing everywhere.

Conventions shared by every function:

* A filtered-out token gets the logit ``-inf`` (probability exactly 0 after softmax);
  a kept token's logit is returned unchanged by the filters.
* No function modifies its input; each returns a new tensor.
* Every row must have at least one finite logit; a row that is all ``-inf`` has no
  probability distribution and sampling from it fails.
* The filters' semantics follow Hugging Face transformers' logits warpers
  (TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper,
  EpsilonLogitsWarper, EtaLogitsWarper, TopHLogitsWarper,
  RepetitionPenaltyLogitsProcessor), and llama.cpp's samplers for what transformers does
  not have (top-n-sigma, XTC, mirostat, DRY); where they differ (tie order in top-p, the
  float tolerances, p = 1 and mass = 1 allowed) the function's docstring says so.
* A stateful sampler's state (mirostat's mu, DRY's token history, XTC's coin) lives in
  `PenaltyState`, one per generation, one entry per row; the functions stay pure.
* Probabilities used to decide what to filter are computed in float64 from the
  logits, so the decision does not drift with float32 rounding of cumulative sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from model.errors import UserError
from model.strategy import (
    CHAIN_ORDERS,
    DecodingSpec,
    cutoff_problem,
    dry_problem,
    frequency_presence_problem,
    is_number,
    min_p_problem,
    repetition_penalty_problem,
    temperature_problem,
    top_k_problem,
    top_h_problem,
    top_p_problem,
    typical_p_problem,
    xtc_problem,
)

# Probabilities computed from float32 logits are only known to a few float32 ulps (eps =
# 1.19e-7): with logits log([.05, .05, .25, .65]) the top token's probability comes out
# as 0.64999999 even in float64, and p = 0.65 would then keep a second token. So a
# probability mass within this distance below top-p's p or typical's mass counts as
# having reached it: two ulps at 1.0 (2.4e-7) absorbs that rounding and still separates
# p = 0.7 from p = 0.700001.
PROBABILITY_TOLERANCE = 2 * torch.finfo(torch.float32).eps

# Min-p compares a ratio p_i / p_max, which float64 computes from the logits to within a
# couple of float64 ulps whichever way it is written (exp of the logit difference, or
# softmax then a division). A ratio short of min_p by at most this much *relative to
# min_p* counts as reaching it, so a min_p set to some token's ratio, computed any of those
# ways, keeps that token; it is far below float32's resolution (6e-8), so it never merges
# two float32 logits that differ by more than 1e-15.
MIN_P_RELATIVE_TOLERANCE = 4 * torch.finfo(torch.float64).eps

# Typical sampling keeps every token as typical as the last one it needs. Two distances to
# the entropy that are equal in exact arithmetic (probabilities [.5, .25, .25]: all three
# tokens are 0.5 bits from the 1.5-bit entropy) come out of float32 logits a few 1e-10
# apart, so distances within this many nats count as tied; no sampling decision can hinge
# on a difference that small.
TYPICAL_TIE_TOLERANCE = 1e-6

def _raise_if(problem: str | None) -> None:
    if problem is not None:
        raise UserError(problem)


def _check_same_shape(name: str, tensor: torch.Tensor, logits: torch.Tensor) -> None:
    # A shape mismatch is a bug in the caller, not a user mistake, hence ValueError.
    if tensor.shape != logits.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected the logits' shape {tuple(logits.shape)}")


# ----------------------------------------------------------------------------------------
# The logits transforms.


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: a LongTensor of shape (B,) (a 0-d tensor for (V,)).

    Ties go to the lowest token id: torch.argmax is documented to return the first of
    several maximal values (torch.argmax and torch.max reference pages), and the tests
    check it on long tied rows.
    """
    return torch.argmax(logits, dim=-1)


def apply_temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """Return ``logits / t``: t < 1 sharpens the distribution, t > 1 flattens it, t = 1 is neutral.

    t = 0 means greedy decoding, the limit t -> 0 of sampling. It is not a division:
    `process_logits` skips temperature and the sampling filters for greedy specs and
    `choose_tokens` takes the argmax, so calling this with t = 0 raises UserError, as does
    a negative, non-finite or smaller than `MIN_TEMPERATURE` value. ``-inf`` stays ``-inf``.
    """
    _raise_if(temperature_problem(t))
    if t == 0:
        raise UserError("temperature 0 means greedy decoding: take greedy_tokens(logits) instead of dividing by 0")
    return logits / t


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row; every other token gets ``-inf``.

    A token tied with the k-th largest logit is kept too (as in transformers), so more
    than k tokens survive when there are ties at the boundary. k >= V keeps every token.
    k must be a whole number >= 1, else UserError.
    """
    _raise_if(top_k_problem(k))
    k = min(k, logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p.

    Tokens are ranked by probability, ties broken by token id (the lower id counts as more
    likely, via a stable sort, so the result does not depend on the device's sort). A token
    is kept when the probability of the tokens ranked before it is still below p, so the
    token whose probability crosses p is kept and the most likely token always is.
    Examples with probabilities [.1, .2, .3, .4]: p = 0.4 keeps 1 token, p = 0.7 keeps 2,
    p = 0.700001 keeps 3.

    Cumulative probabilities are computed in float64 and a total within
    `PROBABILITY_TOLERANCE` (2.4e-7) below p counts as reaching p; see that constant for
    why. transformers compares a float32 cumulative sum without tolerance, so it can keep
    one extra token when the nucleus sums to p exactly. p = 1 keeps every token (also the
    ones of vanishing probability); p outside (0, 1] raises UserError.
    """
    _raise_if(top_p_problem(p))
    if p == 1:
        return logits.clone()
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    sorted_probs = torch.softmax(sorted_logits.double(), dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= p - PROBABILITY_TOLERANCE
    drop_sorted[..., 0] = False  # the most likely token survives even a p below the tolerance
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep the tokens whose probability is at least min_p times the most likely token's.

    The rule, exactly as computed: token i is kept iff r_i >= min_p * (1 - 8.9e-16), where
    r_i = exp(logit_i - logit_max) is evaluated in float64 (the ratio p_i / p_max, without
    a normalisation that could underflow) and 8.9e-16 is `MIN_P_RELATIVE_TOLERANCE`, four
    float64 ulps: so a min_p equal to some token's ratio keeps it however the ratio was
    rounded. This is transformers' MinPLogitsWarper ({i : p_i >= min_p * p_max}, compared
    there in float32 without tolerance) up to that float64 rounding. The logits are taken
    as given: float32 logits of log([.5, .25]) have a ratio of 0.49999999905, so min_p =
    0.5 drops the second token. The most likely token and everything tied with it always
    survive; min_p = 0 keeps every token; min_p = 1 keeps the tokens whose logit is within
    8.9e-16 of the maximum, i.e. those tied with it (distinct float32 logits of size above
    1e-15 are never that close); min_p outside [0, 1] raises UserError.
    """
    _raise_if(min_p_problem(min_p))
    wide = logits.double()
    ratio_to_max = torch.exp(wide - wide.amax(dim=-1, keepdim=True))
    return logits.masked_fill(ratio_to_max < min_p * (1 - MIN_P_RELATIVE_TOLERANCE), -math.inf)


def typical_filter(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022), as transformers' TypicalLogitsWarper.

    A token is typical when its surprise -log p_i is close to the row's entropy
    H = -sum_j p_j log p_j. Tokens are ranked by |-log p_i - H| (most typical first) and the
    smallest prefix of that ranking whose probability reaches `mass` is kept, together with
    every token whose distance to H equals that of the last token kept (ties are kept, as
    in transformers; unlike there, distances within `TYPICAL_TIE_TOLERANCE` count as
    equal). The most likely token can be dropped when it is far less surprising than
    average; at least one token is always kept.

    Probabilities are float64 and reaching `mass` uses `PROBABILITY_TOLERANCE`, as in
    `top_p_filter`. mass = 1 keeps every token (transformers rejects 1); mass outside
    (0, 1] raises UserError.
    """
    _raise_if(typical_p_problem(mass))
    if mass == 1:
        return logits.clone()
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    probs = log_probs.exp()
    # 0 * log 0 is 0 in the entropy; torch would give 0 * -inf = nan.
    entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()  # +inf for tokens already filtered out
    # Equal distances either all fall inside the kept prefix or are all kept as ties, so
    # the order a sort gives them does not change the result; no stable sort is needed.
    sorted_distance, order = torch.sort(distance, dim=-1)
    sorted_probs = probs.gather(-1, order)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    n_kept = (mass_before < mass - PROBABILITY_TOLERANCE).sum(dim=-1, keepdim=True).clamp(min=1)
    last_kept_distance = sorted_distance.gather(-1, n_kept - 1)
    return logits.masked_fill(distance > last_kept_distance + TYPICAL_TIE_TOLERANCE, -math.inf)


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dimension (nats, keepdim), with 0 log 0 = 0."""
    return -torch.where(log_probs > -math.inf, log_probs.exp() * log_probs, 0.0).sum(dim=-1, keepdim=True)


def _drop_below(logits: torch.Tensor, probs: torch.Tensor, cutoff: torch.Tensor | float) -> torch.Tensor:
    """Drop the tokens with probability below ``cutoff``, except those tied with the most
    likely one (the min_tokens_to_keep=1 rule of transformers' warpers)."""
    drop = (probs < cutoff) & (logits < logits.amax(dim=-1, keepdim=True))
    return logits.masked_fill(drop, -math.inf)


def epsilon_filter(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Epsilon sampling (Hewitt et al. 2022, "Truncation sampling as language model
    desmoothing"): drop every token with probability p_i < epsilon; the most likely token
    (and any tied with it) always survives.

    As transformers' EpsilonLogitsWarper with min_tokens_to_keep=1, with probabilities in
    float64 (transformers: the logits' dtype). epsilon must be in (0, 1), else UserError.
    The cutoff is an absolute probability, so its strength depends on the vocabulary: the
    paper's values (3e-4 and up) are for GPT-2's 50,257 tokens, where the uniform
    probability is 2e-5. To cut a comparable share of a V-token vocabulary, scale by the
    uniform probability: epsilon * 50257 / V (3e-4 is about 15 / V, i.e. 0.23 for V = 65;
    useful values for a 65-symbol vocabulary lie around 0.003 to 0.1).
    """
    _raise_if(cutoff_problem("epsilon_cutoff", epsilon))
    return _drop_below(logits, torch.softmax(logits.double(), dim=-1), epsilon)


def eta_filter(logits: torch.Tensor, eta: float) -> torch.Tensor:
    """Eta sampling (Hewitt et al. 2022): drop every token with p_i < min(eta, sqrt(eta) *
    exp(-H)), where H = -sum_j p_j log p_j (nats) is the row's entropy; the most likely token
    (and any tied with it) always survives. A confident row (low H) is cut at eta, a flat
    one at a lower cutoff, so that it keeps more of its tail.

    As transformers' EtaLogitsWarper with min_tokens_to_keep=1 (its `epsilon` argument is
    this eta, the request field eta_cutoff), in float64. eta must be in (0, 1), else
    UserError. Like epsilon_filter's, the cutoff is an absolute probability tuned for a
    50k vocabulary (the paper's 3e-4 to 2e-3); scale it by 50257 / V for V tokens (for 65
    symbols, values around 0.003 to 0.1).
    """
    _raise_if(cutoff_problem("eta_cutoff", eta))
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    cutoff = torch.minimum(torch.tensor(eta, dtype=torch.float64), math.sqrt(eta) * torch.exp(-_entropy(log_probs)))
    return _drop_below(logits, log_probs.exp(), cutoff)


def top_n_sigma_filter(logits: torch.Tensor, n: float) -> torch.Tensor:
    """Top-n-sigma (Tang et al. 2024): keep the tokens whose logit is at least
    max - n * sigma, where sigma is the population standard deviation (divided by the count,
    not count - 1) of the row's finite logits and max their maximum.

    This is llama.cpp's definition (llama_sampler_top_n_sigma; -inf logits, i.e. tokens
    already filtered out, are left out of the mean and sigma), in float64. Dividing every
    logit by a temperature T divides max - logit and sigma alike, so the kept set does not
    depend on the temperature, whichever side of it this filter runs. The most likely
    token always survives (a row with one finite logit has sigma 0). n <= 0 turns the
    filter off, as in llama.cpp (a DecodingSpec takes n > 0 and None for off); n must be a
    finite number, else UserError.
    """
    if not is_number(n) or not math.isfinite(n):
        raise UserError(f"top_n_sigma={n!r} is invalid; it must be a finite number (<= 0: off)")
    if n <= 0:
        return logits.clone()
    wide = logits.double()
    finite = torch.isfinite(wide)
    count = finite.sum(dim=-1, keepdim=True)
    values = torch.where(finite, wide, 0.0)
    mean = values.sum(dim=-1, keepdim=True) / count
    sigma = torch.sqrt(torch.where(finite, (values - mean) ** 2, 0.0).sum(dim=-1, keepdim=True) / count)
    return logits.masked_fill(wide < wide.amax(dim=-1, keepdim=True) - n * sigma, -math.inf)


# transformers' TopHLogitsWarper looks at the 100 most likely tokens only (its top_n).
TOP_H_CANDIDATES = 100


def top_h_filter(logits: torch.Tensor, top_h: float) -> torch.Tensor:
    """Top-H (Potraghloo et al. 2025, "Top-H decoding"), as transformers' TopHLogitsWarper:
    keep the most likely tokens while their entropy stays within top_h times the entropy of
    the whole distribution.

    Precisely: q is the softmax of the `TOP_H_CANDIDATES` (100) largest logits (all of
    them for a smaller vocabulary), ranked by probability; tau = top_h * H(q); a token at
    rank r is kept when the partial entropy -sum_{j <= r} q_j log q_j is <= tau, and the
    most likely token always is. Tokens outside the 100 are always dropped, as in
    transformers. Differences: float64 instead of the logits' dtype; ties in the ranking
    are broken by token id (transformers: by its topk); and top_h = 1 keeps all 100
    candidates, where transformers' float32 partial sums can overshoot the entropy and
    drop some of the least likely (in half of the rows of a 65-token test). top_h must be
    in (0, 1], else UserError.
    """
    _raise_if(top_h_problem(top_h))
    candidates = min(TOP_H_CANDIDATES, logits.shape[-1])
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    if top_h == 1:  # every partial entropy is <= the whole; only rounding could say otherwise
        return logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(
            -1, order[..., candidates:], True), -math.inf)
    log_q = torch.log_softmax(sorted_logits[..., :candidates].double(), dim=-1)
    terms = -torch.where(log_q > -math.inf, log_q.exp() * log_q, 0.0)
    keep_sorted = torch.zeros_like(logits, dtype=torch.bool)
    keep_sorted[..., :candidates] = torch.cumsum(terms, dim=-1) <= top_h * terms.sum(dim=-1, keepdim=True)
    keep_sorted[..., 0] = True
    keep = keep_sorted.scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, -math.inf)


def xtc_filter(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Exclude top choices (XTC, p-e-w's sampler as llama.cpp has it), once its coin has
    come up: when two or more tokens have probability >= threshold, drop all of them except
    the least likely one, so that the text takes a plausible but less obvious turn; a row
    with fewer than two such tokens is left as it is.

    Tokens are ranked by probability (float64), ties broken by token id as in top_p_filter
    (the lower id counts as more likely), so of several tokens tied at the least likely
    rank above the threshold the one with the highest id is kept. Tokens already filtered
    out (probability 0) never count, even at threshold 0. XTC as a sampler removes these
    tokens only with probability xtc_probability per step: `process_logits` applies this
    function to the rows whose coin came up (see `PenaltyState.process`). threshold must
    be in [0, 0.5] (above 0.5 no two tokens can reach it), else UserError.
    """
    _raise_if(xtc_problem("xtc_threshold", threshold))
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    sorted_probs = torch.softmax(sorted_logits.double(), dim=-1)
    above = (sorted_probs >= threshold) & (sorted_probs > 0)  # a prefix of the ranking
    n_above = above.sum(dim=-1, keepdim=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop_sorted = (rank < n_above - 1) & (n_above >= 2)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def mirostat_filter(logits: torch.Tensor, mu: torch.Tensor | float) -> torch.Tensor:
    """Mirostat version 2's cut (Basu et al. 2021, as llama.cpp's mirostat_v2): keep the
    tokens whose surprise -log2 p_i is at most mu (bits), i.e. p_i >= 2^-mu, and always the
    most likely token (with any tied with it; llama.cpp keeps one of the tied).

    ``mu`` is a number or a tensor of one value per row: the sampler's state, which
    starts at 2 * tau and after each token moves by -eta * (surprise - tau), where the
    surprise is measured under the renormalised kept distribution (`PenaltyState.add`).
    """
    log2_probs = torch.log_softmax(logits.double(), dim=-1) / math.log(2)
    mu = torch.as_tensor(mu, dtype=torch.float64, device=logits.device)
    drop = (-log2_probs > mu.reshape(-1, 1) if mu.dim() else -log2_probs > mu)
    drop = drop & (logits < logits.amax(dim=-1, keepdim=True))
    return logits.masked_fill(drop, -math.inf)


# Mirostat version 1 estimates the Zipf exponent from the 100 most likely tokens (llama.cpp's m).
MIROSTAT_V1_CANDIDATES = 100


def mirostat_v1_filter(logits: torch.Tensor, mu: torch.Tensor | float) -> torch.Tensor:
    """Mirostat version 1's cut (Basu et al. 2021, as llama.cpp's mirostat): top-k with a k
    computed from the row, so that the expected surprise is about mu.

    The probabilities p_1 >= p_2 >= ... are taken as Zipf's p_i ~ i^-s; s is estimated by
    least squares from the first m = 100: s_hat = sum_i t_i b_i / sum_i t_i^2 with t_i =
    log((i + 1) / i) and b_i = log(p_i / p_{i+1}); then with e = s_hat - 1 and N tokens,
    k = (e * 2^mu / (1 - N^-e))^(1 / s_hat), truncated to a whole number in [1, N]. As
    llama.cpp, except: N counts the row's tokens of nonzero probability (llama.cpp: the
    vocabulary size) and only pairs with p_{i+1} > 0 enter the estimate, so filtered-out
    or padded tokens do not make it infinite; e = 0 takes the limit k = (2^mu / ln N)^(1/s);
    a flat row (s_hat <= 0) keeps every token. Ties at the k-th logit are kept, as in
    top_k_filter. ``mu`` is a number or one value per row, as in `mirostat_filter`.
    """
    wide = logits.double()
    sorted_logits = torch.sort(wide, dim=-1, descending=True).values
    m = min(MIROSTAT_V1_CANDIDATES, wide.shape[-1])
    log_p = torch.log_softmax(sorted_logits, dim=-1)[..., :m]
    i = torch.arange(1, m, dtype=torch.float64, device=logits.device)
    t = torch.log((i + 1) / i)
    b = log_p[..., :-1] - log_p[..., 1:]
    usable = torch.isfinite(b)
    s_hat = (torch.where(usable, t * b, 0.0).sum(-1) / torch.where(usable, t * t, 0.0).sum(-1).clamp(min=1e-300))
    n = torch.isfinite(wide).sum(-1).double()
    mu = torch.as_tensor(mu, dtype=torch.float64, device=logits.device)
    e = s_hat - 1
    scale = torch.where(e.abs() > 1e-9, e / (1 - n.pow(-e)), 1 / n.log())
    k = (scale * 2.0 ** mu).pow(1 / s_hat)
    k = torch.where((s_hat > 0) & ~k.isnan(), k, n).minimum(n).clamp(min=1).floor().long()
    kth_largest = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))
    return logits.masked_fill(wide < kth_largest, -math.inf)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019) with the sign fix used by transformers.

    For every token marked in `seen` (a bool tensor of the logits' shape; the prompt's
    tokens count), a negative logit is multiplied by `penalty` and any other logit divided
    by it, so penalty > 1 always makes a seen token less likely and 0 < penalty < 1 more
    likely. It applies once per distinct token however often the token occurred, because
    `seen` is a set, not a count. penalty = 1 is neutral; it must be finite and > 0, else
    UserError. Example: logits [2, -2, 1], seen {0, 1}, penalty 2 -> [1, -4, 1].
    """
    _raise_if(repetition_penalty_problem(penalty))
    _check_same_shape("seen", seen, logits)
    if seen.dtype != torch.bool:
        raise ValueError(f"seen must be a bool tensor, got {seen.dtype}")
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalties(
    logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI-style penalties: ``logits - counts * frequency - (counts > 0) * presence``.

    `counts` (the logits' shape, any numeric dtype) holds how often each token was
    *generated* so far; the prompt does not count, and the caller maintains it. The
    frequency penalty grows with every repetition, the presence penalty is paid once.
    Negative values encourage repetition. Both must lie in [-2, 2] (OpenAI's range), else
    UserError; 0 and 0 change nothing. Example: logits [1, 1, 1], counts [0, 1, 3],
    frequency 0.5, presence 0.25 -> [1, 0.25, -0.75].
    """
    _raise_if(frequency_presence_problem("frequency_penalty", frequency))
    _raise_if(frequency_presence_problem("presence_penalty", presence))
    _check_same_shape("counts", counts, logits)
    penalty = counts * frequency + (counts > 0) * presence
    return logits - penalty.to(logits.dtype)


def sequence_breaker_ids(breakers: Sequence[str], token_bytes: Sequence[bytes]) -> frozenset[int]:
    """The ids of the tokens that are DRY sequence breakers: those whose bytes contain one
    of the ``breakers`` (UTF-8). ``token_bytes[i]`` is token i's bytes. A breaker that no
    single token contains (one split over several tokens) is not recognised; llama.cpp
    also matches those token sequences."""
    encoded = [breaker.encode("utf-8") for breaker in breakers]
    return frozenset(i for i, data in enumerate(token_bytes) if any(b in data for b in encoded))


def _z_function(sequence: Sequence[int]) -> list[int]:
    """z[k] = length of the longest common prefix of ``sequence`` and ``sequence[k:]`` (z[0] = 0),
    in linear time (Gusfield's Z-algorithm)."""
    n = len(sequence)
    z = [0] * n
    left = right = 0  # sequence[left:right] matches a prefix, right as far as any match reached
    for k in range(1, n):
        length = min(right - k, z[k - left]) if k < right else 0
        while k + length < n and sequence[length] == sequence[k + length]:
            length += 1
        z[k] = length
        if k + length > right:
            left, right = k, k + length
    return z


def dry_repeat_lengths(history: Sequence[int], allowed_length: int, breaker_ids: frozenset[int] = frozenset(),
                       last_n: int = -1) -> dict[int, int]:
    """For each token t that would continue a repetition: the length of the longest one.

    ``history`` is the row's tokens so far (prompt included), of which the last ``last_n``
    count (-1: all). Token t at position j + 1 of the history follows the n tokens
    history[j - n + 1 : j + 1]; when those equal the last n tokens of the history, emitting
    t again would repeat them and t: it continues a repetition of length n. The result maps
    t to the largest such n over all its positions, for n >= allowed_length. The matched
    tail never reaches back past the most recent sequence breaker (n is capped at the
    number of tokens after it), and nothing is returned when that cap or the history is
    shorter than allowed_length (llama.cpp: "if (last_n_repeat <= allowed_length) return").
    """
    window = list(history if last_n == -1 else history[-last_n:])
    size = len(window)
    if size <= allowed_length:
        return {}
    since_breaker = next((i for i, token in enumerate(reversed(window)) if token in breaker_ids), size)
    if since_breaker < allowed_length:
        return {}
    # With the history reversed, z[k] is how far the tokens before position size - k
    # (reading backwards) agree with the end of the history.
    z = _z_function(window[::-1])
    lengths: dict[int, int] = {}
    for k in range(1, size):
        n = min(z[k], since_breaker)
        if n >= allowed_length:
            token = window[size - k]
            lengths[token] = max(lengths.get(token, 0), n)
    return lengths


# llama.cpp caps DRY's exponent so that base ** exponent stays a finite float32.
_FLOAT32_MAX_LOG = math.log(torch.finfo(torch.float32).max)


def apply_dry_penalty(logits: torch.Tensor, histories: Sequence[Sequence[int]], multiplier: float,
                      base: float = 1.75, allowed_length: int = 2, last_n: int = -1,
                      breaker_ids: frozenset[int] = frozenset()) -> torch.Tensor:
    """DRY, "don't repeat yourself" (p-e-w, 2024, as llama.cpp's dry sampler): a token that
    would continue a repetition of n >= allowed_length tokens (see `dry_repeat_lengths`,
    on row b's ``histories[b]``) loses multiplier * base ** (n - allowed_length) from its
    logit, so a long verbatim loop becomes ever less likely while short common phrases
    are left alone. A sequence breaker token is never penalised itself.

    llama.cpp's defaults: multiplier 0.8 is its suggested setting (0, off, is its default),
    base 1.75, allowed_length 2, last_n -1 (its whole context; the token loop keeps the
    model's block_size tokens), breakers "\\n", ":", '"', "*". As there, the exponent is
    capped at ln(float32 max) / ln(base) when base > 1.000001. The values must satisfy
    `DecodingSpec`'s DRY ranges, else UserError.

    Example with allowed_length 2: history a b c c b c y a b c. After "a b c" at the start
    came c, so c would continue a 3-token repetition; "b c" was followed by y (2 tokens),
    "c" by b (1 token, under the allowed length). c loses multiplier * 1.75, y multiplier.
    """
    for name, value in (("dry_multiplier", multiplier), ("dry_base", base), ("dry_allowed_length", allowed_length),
                        ("dry_penalty_last_n", last_n)):
        _raise_if(dry_problem(name, value))
    if len(histories) != (logits.shape[0] if logits.dim() == 2 else 1):
        raise ValueError(f"got {len(histories)} histories for {logits.shape[0]} rows; pass one per row")
    max_exponent = int(_FLOAT32_MAX_LOG / math.log(base)) if base > 1.000001 else None
    penalty = torch.zeros(logits.shape, dtype=torch.float64)
    rows = penalty if logits.dim() == 2 else penalty[None]
    for row, history in enumerate(histories):
        for token, n in dry_repeat_lengths(history, allowed_length, breaker_ids, last_n).items():
            if token not in breaker_ids:
                exponent = n - allowed_length if max_exponent is None else min(n - allowed_length, max_exponent)
                rows[row, token] = multiplier * base ** exponent
    return logits - penalty.to(device=logits.device, dtype=logits.dtype)


# ----------------------------------------------------------------------------------------
# The pipeline and the token choice.


def process_logits(
    logits: torch.Tensor,
    spec: DecodingSpec,
    *,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    histories: Sequence[Sequence[int]] | None = None,
    breaker_ids: frozenset[int] = frozenset(),
    xtc_coins: torch.Tensor | None = None,
    mirostat_mu: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply `spec` to next-token logits, in this order:

    1. repetition penalty (needs `seen`, see `apply_repetition_penalty`),
    2. frequency and presence penalties (needs `counts`),
    3. DRY (needs each row's token history, `histories`, and the sequence breakers),
    4. the sampling chain in the spec's order (`strategy.CHAIN_ORDERS`; by default
       temperature, top-n-sigma, top-h, top-k, top-p, min-p, typical, epsilon, eta,
       XTC on the rows whose coin in `xtc_coins` (bool, one per row) came up;
       ``order=temperature-last`` moves temperature to the end),
    5. mirostat's cut at `mirostat_mu` (one value per row, bits; None: its start, 2 tau).

    This is transformers' order for what transformers has, and llama.cpp's places for
    top-n-sigma, XTC and mirostat. Each step sees the distribution left by the previous
    ones, so top-p after top-k measures mass among the k survivors. For greedy and beam
    specs only the penalties apply (temperature and the sampling steps are rejected by
    DecodingSpec for them); the argmax or the beam scores are taken from the result.

    softmax(result) is the "probability after filtering" of the explain table. The result
    is a new tensor, float32 for float16/bfloat16 input (the division by a small
    temperature and the penalties could overflow half precision), else the input's dtype.
    A missing input for a step that is on (`seen`, `counts`, `histories`, `xtc_coins`)
    raises ValueError: silently skipping it would decode with a different strategy than
    the one asked for. `PenaltyState` keeps these inputs for a generation.
    """
    out = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if spec.needs_seen:
        if seen is None:
            raise ValueError(f"process_logits needs `seen` for repetition_penalty={spec.repetition_penalty}")
        out = apply_repetition_penalty(out, seen, spec.repetition_penalty)
    if spec.needs_counts:
        if counts is None:
            raise ValueError("process_logits needs `counts` for the frequency/presence penalties")
        out = apply_frequency_presence_penalties(out, counts, spec.frequency_penalty, spec.presence_penalty)
    if spec.uses_dry:
        if histories is None:
            raise ValueError(f"process_logits needs `histories` for dry_multiplier={spec.dry_multiplier}")
        out = apply_dry_penalty(out, histories, spec.dry_multiplier, spec.dry_base, spec.dry_allowed_length,
                                spec.dry_penalty_last_n, breaker_ids)
    if spec.is_deterministic:
        return out.clone() if out is logits else out
    if spec.uses_xtc and xtc_coins is None:
        raise ValueError(f"process_logits needs `xtc_coins` for xtc_probability={spec.xtc_probability}")
    for step in CHAIN_ORDERS[spec.order]:
        out = _chain_step(out, spec, step, xtc_coins)
    if spec.mirostat:
        mu = 2 * spec.mirostat_tau if mirostat_mu is None else mirostat_mu
        out = (mirostat_filter if spec.mirostat == 2 else mirostat_v1_filter)(out, mu)
    return out.clone() if out is logits else out


def _chain_step(logits: torch.Tensor, spec: DecodingSpec, step: str, xtc_coins: torch.Tensor | None) -> torch.Tensor:
    """One step of the sampling chain (a name of `strategy.SAMPLING_CHAIN`); a step that is off
    returns ``logits`` itself."""
    if step == "temperature":
        return apply_temperature(logits, spec.temperature) if spec.temperature != 1 else logits
    if step == "xtc":
        if not spec.uses_xtc:
            return logits
        coins = xtc_coins.to(logits.device).reshape(-1, 1) if logits.dim() == 2 else xtc_coins.reshape(())
        return torch.where(coins, xtc_filter(logits, spec.xtc_threshold), logits)
    value = getattr(spec, step)
    return logits if value is None else _FILTER_FUNCTIONS[step](logits, value)


_FILTER_FUNCTIONS = {
    "top_n_sigma": top_n_sigma_filter, "top_h": top_h_filter, "top_k": top_k_filter, "top_p": top_p_filter,
    "min_p": min_p_filter, "typical_p": typical_filter, "epsilon_cutoff": epsilon_filter, "eta_cutoff": eta_filter,
}


def choose_tokens(
    logits: torch.Tensor,
    spec: DecodingSpec,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Pick one token per row of `process_logits` output (shape (B, V)); returns a LongTensor (B,).

    Greedy specs take the argmax (ties to the lowest id). Otherwise each row is sampled
    once from softmax(logits) (`draw_tokens`). With `generators` (one torch.Generator per row, on the
    logits' device) row b draws only from generators[b], so its token depends on its own
    logits and seed and never on the other rows of the batch; without them the global
    RNG is used. Beam specs raise ValueError: the generation loop chooses beams.
    """
    if spec.is_beam:
        raise ValueError("beam search chooses tokens in the generation loop, not in choose_tokens")
    if logits.dim() != 2:
        raise ValueError(f"choose_tokens expects logits of shape (B, V), got {tuple(logits.shape)}")
    if spec.is_greedy:
        return greedy_tokens(logits)
    return draw_tokens(sampling_distribution(logits, spec), generators)


def draw_tokens(probs: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """One token id per row of ``probs`` (B, V; each row's probabilities sum to 1 up to
    rounding), drawn by inverse transform sampling: with one uniform u per row, the first
    token whose cumulative probability (float64) exceeds u times the row's total. Row b's
    u comes from generators[b] (one per row, on the probabilities' device), else from the
    global RNG. A token of probability 0 is never drawn. Exact up to float64 rounding, and
    one random number a row, where torch.multinomial draws one per token (bench/README.md:
    the bandwidth floor)."""
    if generators is not None and len(generators) != probs.shape[0]:
        raise ValueError(f"got {len(generators)} generators for {probs.shape[0]} rows; pass one per row")
    cumulative = torch.cumsum(probs.double(), dim=-1)
    if generators is None:
        u = torch.rand(probs.shape[0], dtype=torch.float64, device=probs.device)
    else:
        u = torch.stack([torch.rand((), dtype=torch.float64, device=probs.device, generator=g) for g in generators])
    total = cumulative[:, -1]
    # strictly below the total, so that the token found always has probability > 0
    targets = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, targets[:, None], right=True).squeeze(-1)


def sampling_distribution(processed: torch.Tensor, spec: DecodingSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The probabilities (same shape, ``dtype``) that the next token is drawn from, given the
    output of `process_logits`: softmax(processed) when sampling; for greedy decoding 1 at
    the argmax (ties to the lowest id, as `greedy_tokens`) and 0 elsewhere. This is what
    `choose_tokens` samples from, what the explain table calls "after filtering" and what
    the server's distribution view shows as kept. Beam search has no such distribution
    (its beams are chosen by total score): ValueError."""
    if spec.is_beam:
        raise ValueError("beam search has no next-token distribution of its own")
    if spec.is_greedy:
        return torch.zeros_like(processed, dtype=dtype).scatter_(-1, greedy_tokens(processed).unsqueeze(-1), 1.0)
    return torch.softmax(processed.to(dtype), dim=-1)


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``logits`` (..., V) with the ids at and past ``vocab_size`` set to -inf: a model whose
    embedding is padded (GPT-2's 50,257 tokens in 50,304 rows) must never choose, or
    spread probability over, an id that its tokenizer does not have. A new tensor."""
    if vocab_size >= logits.size(-1):
        return logits.clone()
    return torch.cat([logits[..., :vocab_size], torch.full_like(logits[..., vocab_size:], -math.inf)], dim=-1)


class PenaltyState:
    """Everything a spec needs to know of each row beyond its logits, kept up to date step
    by step: one state per generation (a request), created at its start and carried
    across its steps, one entry per row.

    ``seen`` (rows x vocab, bool) marks every token of the prompt and of the output (the
    repetition penalty); ``counts`` (rows x vocab) counts generated tokens only (frequency
    and presence penalties); ``histories`` holds each row's last ``context_size`` tokens,
    prompt included (DRY; all of them when context_size is None), with ``breaker_ids``
    its sequence breakers (`sequence_breaker_ids`); ``mu`` (rows, float64) is mirostat's
    target cut, starting at 2 * tau. Each is None when the spec does not use it, so a spec
    without them costs nothing. `process` applies the spec with this state; `add` moves
    it past the chosen tokens.
    """

    def __init__(self, spec: DecodingSpec, prompts: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str = "cpu", *, breaker_ids: frozenset[int] = frozenset(),
                 context_size: int | None = None):
        self.spec = spec
        self.breaker_ids = breaker_ids
        self.context_size = context_size
        self.seen = self.counts = self.histories = self.mu = None
        if spec.needs_seen:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, torch.as_tensor(list(prompt), dtype=torch.long, device=device)] = True
        if spec.needs_counts:
            self.counts = torch.zeros(len(prompts), vocab_size, device=device)
        if spec.uses_dry:
            self.histories = [self._cut(list(prompt)) for prompt in prompts]
        if spec.mirostat:
            self.mu = torch.full((len(prompts),), 2.0 * spec.mirostat_tau, dtype=torch.float64, device=device)

    def _cut(self, history: list[int]) -> list[int]:
        return history if self.context_size is None else history[-self.context_size:]

    def add(self, tokens: torch.Tensor, processed: torch.Tensor | None = None) -> None:
        """Row b generated ``tokens[b]``, drawn from softmax(``processed``) (the `process`
        output of this step, which mirostat needs: it moves each row's mu by -eta *
        (surprise - tau), the surprise -log2 of the token's probability under the kept,
        renormalised distribution, as llama.cpp does)."""
        rows = torch.arange(tokens.size(0), device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1
        if self.histories is not None:
            self.histories = [self._cut(history + [token]) for history, token in zip(self.histories, tokens.tolist())]
        if self.mu is not None:
            if processed is None:
                raise ValueError("mirostat updates its state from the distribution the tokens were drawn from: "
                                 "pass `processed`")
            log_probs = torch.log_softmax(processed.double(), dim=-1)[rows, tokens]
            surprise = -log_probs.to(self.mu.device) / math.log(2)
            self.mu = self.mu - self.spec.mirostat_eta * (surprise - self.spec.mirostat_tau)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues old row rows[i] (beam search)."""
        if self.seen is not None:
            self.seen = self.seen.index_select(0, rows)
        if self.counts is not None:
            self.counts = self.counts.index_select(0, rows)
        if self.histories is not None:
            self.histories = [list(self.histories[row]) for row in rows.tolist()]
        if self.mu is not None:
            self.mu = self.mu.index_select(0, rows.to(self.mu.device))

    def process(self, logits: torch.Tensor, spec: DecodingSpec,
                generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """`process_logits` of ``logits`` with this state. With XTC on, each row first
        draws its coin, uniform in [0, 1) from its own generator (generators[b], as the
        token's draw that follows: reproducible by seed, independent of the batch), and
        XTC acts when it is below xtc_probability; so call this once per step. Without
        generators (the distribution view: a step that is not drawn) XTC is shown as when
        its coin comes up, i.e. with its top choices removed."""
        coins = None
        if spec.uses_xtc and not spec.is_deterministic:
            if generators is None:
                coins = torch.ones(logits.shape[0], dtype=torch.bool)
            else:
                if len(generators) != logits.shape[0]:
                    raise ValueError(f"got {len(generators)} generators for {logits.shape[0]} rows; pass one per row")
                draws = [torch.rand((), generator=g, device=g.device).item() for g in generators]
                coins = torch.tensor(draws) < spec.xtc_probability
        return process_logits(logits, spec, seen=self.seen, counts=self.counts, histories=self.histories,
                              breaker_ids=self.breaker_ids, xtc_coins=coins, mirostat_mu=self.mu)
