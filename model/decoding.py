"""Decoding steps: how a row of next-token logits becomes the next token.

Each step is one small pure function on a logits tensor of shape (B, V) (the filters
also accept a single row of shape (V,)); `process_logits` applies the steps a
`DecodingSpec` (model/strategy.py) asks for, in one fixed order, and `choose_tokens`
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
  RepetitionPenaltyLogitsProcessor); where they differ (tie order in top-p, the
  float tolerances, p = 1 and mass = 1 allowed) the function's docstring says so.
* Probabilities used to decide what to filter are computed in float64 from the
  logits, so the decision does not drift with float32 rounding of cumulative sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from model.errors import UserError
from model.strategy import (
    DecodingSpec,
    frequency_presence_problem,
    min_p_problem,
    repetition_penalty_problem,
    temperature_problem,
    top_k_problem,
    top_p_problem,
    typical_p_problem,
)

# Probabilities computed from float32 logits are only known to a few float32 ulps (eps =
# 1.19e-7): with logits log([.05, .05, .25, .65]) the top token's probability comes out
# as 0.64999999 even in float64, and p = 0.65 would then keep a second token. So a
# probability mass within this distance below top-p's p or typical's mass counts as
# having reached it: two ulps at 1.0 (2.4e-7) absorbs that rounding and still separates
# p = 0.7 from p = 0.700001. Min-p compares a ratio that can be tiny, so it uses this as
# a relative tolerance: a ratio above min_p * (1 - PROBABILITY_TOLERANCE) reaches min_p.
PROBABILITY_TOLERANCE = 2 * torch.finfo(torch.float32).eps

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

    Exactly the set {i : p_i >= min_p * p_max} (as transformers' MinPLogitsWarper), so the
    most likely token and everything tied with it always survive. It is evaluated as
    exp(logit_i - logit_max) >= min_p in float64, the same ratio p_i / p_max without a
    normalisation that could underflow. A ratio short of min_p by at most
    `PROBABILITY_TOLERANCE` *relative to min_p* counts as reaching it (with logits
    log([.5, .25]) the ratio comes out as 0.4999999991, and min_p = 0.5 must keep the
    second token); relative, so that a min_p of 1e-7 still drops a token at 1e-8, where
    transformers compares without tolerance. min_p = 0 keeps every token, min_p = 1 only
    those tied with the maximum; min_p outside [0, 1] raises UserError.
    """
    _raise_if(min_p_problem(min_p))
    wide = logits.double()
    ratio_to_max = torch.exp(wide - wide.amax(dim=-1, keepdim=True))
    return logits.masked_fill(ratio_to_max < min_p * (1 - PROBABILITY_TOLERANCE), -math.inf)


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


# ----------------------------------------------------------------------------------------
# The pipeline and the token choice.


def process_logits(
    logits: torch.Tensor,
    spec: DecodingSpec,
    *,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply `spec` to next-token logits, in this order:

    1. repetition penalty (needs `seen`, see `apply_repetition_penalty`),
    2. frequency and presence penalties (needs `counts`),
    3. temperature, 4. top-k, 5. top-p, 6. min-p, 7. typical.

    This is the order transformers uses. Each filter sees the distribution left by the
    previous ones, so top-p after top-k measures mass among the k survivors. For greedy
    and beam specs only the penalties apply (temperature and filters are rejected by
    DecodingSpec for them); the argmax or the beam scores are taken from the result.

    softmax(result) is the "probability after filtering" of the explain table. The result
    is a new tensor, float32 for float16/bfloat16 input (the division by a small
    temperature and the penalties could overflow half precision), else the input's dtype.
    Missing `seen` / `counts` for a penalty that is on raises ValueError: silently skipping
    the penalty would decode with a different strategy than the one asked for.
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
    if not spec.is_deterministic:
        out = apply_temperature(out, spec.temperature)
        if spec.top_k is not None:
            out = top_k_filter(out, spec.top_k)
        if spec.top_p is not None:
            out = top_p_filter(out, spec.top_p)
        if spec.min_p is not None:
            out = min_p_filter(out, spec.min_p)
        if spec.typical_p is not None:
            out = typical_filter(out, spec.typical_p)
    return out.clone() if out is logits else out


def choose_tokens(
    logits: torch.Tensor,
    spec: DecodingSpec,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Pick one token per row of `process_logits` output (shape (B, V)); returns a LongTensor (B,).

    Greedy specs take the argmax (ties to the lowest id). Otherwise each row is sampled
    once from softmax(logits). With `generators` (one torch.Generator per row, on the
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
    probs = sampling_distribution(logits, spec)
    if generators is None:
        return torch.multinomial(probs, num_samples=1).squeeze(-1)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"got {len(generators)} generators for {probs.shape[0]} rows; pass one per row")
    return torch.cat(
        [torch.multinomial(row, num_samples=1, generator=generator) for row, generator in zip(probs, generators)]
    )


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
    """What the penalties of a spec need to know of each row, kept up to date step by step.

    ``seen`` (rows x vocab, bool) marks every token of the prompt and of the output (the
    repetition penalty); ``counts`` (rows x vocab) counts generated tokens only (frequency
    and presence penalties). Each is None when the spec does not use it, so a spec
    without penalties costs nothing. Pass them to `process_logits`.
    """

    def __init__(self, spec: DecodingSpec, prompts: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str = "cpu"):
        self.seen = self.counts = None
        if spec.needs_seen:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, torch.as_tensor(list(prompt), dtype=torch.long, device=device)] = True
        if spec.needs_counts:
            self.counts = torch.zeros(len(prompts), vocab_size, device=device)

    def add(self, tokens: torch.Tensor) -> None:
        """Row b generated ``tokens[b]``."""
        rows = torch.arange(tokens.size(0), device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues old row rows[i] (beam search)."""
        if self.seen is not None:
            self.seen = self.seen.index_select(0, rows)
        if self.counts is not None:
            self.counts = self.counts.index_select(0, rows)

    def process(self, logits: torch.Tensor, spec: DecodingSpec) -> torch.Tensor:
        """`process_logits` of ``logits`` with this state."""
        return process_logits(logits, spec, seen=self.seen, counts=self.counts)
