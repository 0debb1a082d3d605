"""Speculative decoding: a cheap proposal, checked by the model in one forward pass.

At batch 1 a decode step reads every weight of the model to make one token. Speculative
decoding (Leviathan et al. 2023; Chen et al. 2023) lets a cheap source propose up to
``gamma`` tokens d_1..d_g, then runs the model (the *target*) once over all of them: the
logits after the last accepted token and after each d_i come out of the same pass. The
proposal sources here are a small draft model (same tokenizer) and prompt lookup (the
tokens that followed the latest earlier occurrence of the context's last n tokens).

The acceptance rule keeps the output distribution exactly the target's. With p_i the
distribution the strategy samples from at position i (`sampling_distribution` of
`process_logits`: penalties, temperature, filters), and q_i the proposal's, taken in
order: d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first
rejection the step ends with a token drawn from the residual max(0, p_i - q_i),
normalised; when all g are accepted, a last token is drawn from p_{g+1}. Each step
therefore releases between 1 and g + 1 tokens, the same sequence distribution as one
token at a time from p. Greedy decoding is the special case where p and q are one-hot:
proposals are accepted while the argmax agrees and the target's argmax ends the step,
so the text is plain greedy decoding's. Prompt lookup's proposal is deterministic: q_i
is one-hot at d_i, so d_i is accepted with probability p_i(d_i).

A draft may also stop early on its own confidence (llama.cpp's ``--draft-p-min`` and
transformers' assistant confidence threshold are stops of that kind, read at other points of
the draft's step). Here, before drawing d_i, the draft looks at its own processed
distribution, and when the largest probability there (`draft_confidence`) is below
``p_min`` the step verifies d_1..d_{i-1} and the target draws position i itself (with i = 1
the step is a plain one). The stop stays exact because it is decided before d_i and
position i's acceptance coin are drawn, from what is fixed by then (the tokens before i and
the draft's own state), and whichever way it goes the acceptance rule releases a token from
p_i at position i. Dropping a d_i already drawn because q_i(d_i) is small would not be: the
proposals that survive are then drawn from q_i cut to its likely tokens, not from the q_i
the rule divides by.

Penalties depend on the tokens so far, so p_i and q_i are both computed with the
penalty state that counts d_1..d_{i-1}. A strategy whose state changes with the sampled
token in other ways (a "stateful" sampler such as mirostat) has no fixed p_i to accept
against and is refused, as is beam search.

Rows run one after another inside each step, each with its own contexts (a row's
accepted length differs from the others', and a batched KV cache has one length for all
rows); the speed-up of speculation is at batch 1, where decoding is bound by reading
weights. Each row's randomness comes from its own generator seeded ``seed + row``, so a
row's text never depends on the batch; it differs from plain decoding's text for the
same seed (the draws are used differently), while its distribution is the same.

The model's window works as in plain decoding (model/generate.py): a step verifies only
positions that fit in the current window, so in "exact" mode past the window every step
is a plain one (each position would need its own window), and in "shift" mode the
proposals resume after each restart. The draft always reads its context in "shift" mode:
it only proposes, so what it sees changes the speed, never the output distribution.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from model.decoding import PenaltyState, draw_tokens, sampling_distribution
from model.errors import UserError
from model.generate import (
    Context, Event, RowEnd, SpeculationCounts, Step, _token_details, check_batch_memory, prefill,
)
from model.gpt import GPT
from model.strategy import DecodingSpec
from model.tokenizer import Tokenizer

DEFAULT_GAMMA = 4


def check_p_min(p_min: float, name: str = "the draft's p-min") -> None:
    """The draft's confidence stop is a probability below which it stops: 0 <= p_min < 1
    (0 is off; at 1 it would never propose). ``name``: what the error calls it."""
    if not 0 <= p_min < 1:  # NaN fails too
        raise UserError(f"{name} must be >= 0 and < 1 (0 is off), got {p_min}")


@dataclass(frozen=True)
class Speculation:
    """Where proposals come from, and how many per step.

    draft: a model with the target's tokenizer that proposes by sampling with the
        target's strategy; or None, with ``lookup`` > 0: prompt lookup with n-grams of
        ``lookup`` tokens.
    gamma: proposal tokens per step (>= 1); a step releases at most gamma + 1 tokens.
    p_min: the draft's confidence stop, in [0, 1): the draft proposes no further token once
        its `draft_confidence` is below p_min (0: always gamma tokens). A draft only: prompt
        lookup's proposal is deterministic, so it has no confidence to measure.
    """

    draft: GPT | None = None
    lookup: int = 0
    gamma: int = DEFAULT_GAMMA
    p_min: float = 0.0

    def __post_init__(self) -> None:
        if (self.draft is None) == (self.lookup == 0):
            raise UserError("speculation needs one proposal source: a draft model or prompt lookup (n >= 1)")
        if self.lookup < 0:
            raise UserError(f"prompt lookup's n-gram size must be >= 1, got {self.lookup}")
        if self.gamma < 1:
            raise UserError(f"speculation needs gamma >= 1 proposal tokens per step, got {self.gamma}")
        if self.draft is not None and self.gamma > self.draft.config.block_size // 2:
            # a draft that restarts its window mid-proposal must still hold the last accepted token
            raise UserError(f"gamma {self.gamma} is more than half the draft's context "
                            f"({self.draft.config.block_size} tokens)")
        check_p_min(self.p_min)
        if self.p_min > 0 and self.draft is None:
            raise UserError("p-min stops a draft model's proposal; prompt lookup's is deterministic, "
                            "with no confidence to measure")

    def check(self, model: GPT, tokenizer: Tokenizer, spec: DecodingSpec, window: str, rows: int,
              max_new_tokens: int, longest_prompt: int) -> None:
        """`check_speculation` with this speculation (generate_events calls it)."""
        check_speculation(model, tokenizer, spec, window, self, rows, max_new_tokens, longest_prompt)

    def events(self, model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], spec: DecodingSpec,
               **options) -> Iterator[list[Event]]:
        """`speculative_events` with this speculation (generate_events calls it)."""
        return speculative_events(model, tokenizer, prompts, spec, self, **options)


def speculation_problem(spec: DecodingSpec, window: str) -> str | None:
    """Why ``spec`` cannot be decoded speculatively with this window mode, or None."""
    if spec.is_beam:
        return "beam search keeps several continuations; speculative decoding checks one"
    # Mirostat's mu, XTC's coin and DRY's history depend on the tokens sampled so far in a
    # way the acceptance rule does not replay position by position.
    if spec.is_stateful:
        return f"{spec.label} carries state from token to token, so no proposal can be accepted exactly"
    if window == "none":
        return "speculative decoding rolls back the KV cache, and window none has no cache"
    return None


def check_speculation(model: GPT, tokenizer: Tokenizer, spec: DecodingSpec, window: str,
                      speculation: Speculation, rows: int, max_new_tokens: int, longest_prompt: int) -> None:
    """Refuse, with a UserError, what `speculative_events` cannot do exactly (see
    `speculation_problem`), and a draft too small for the tokenizer or for memory."""
    problem = speculation_problem(spec, window)
    if problem:
        raise UserError(f"cannot speculate: {problem}")
    draft = speculation.draft
    if draft is not None:
        if draft.config.vocab_size < tokenizer.vocab_size:
            raise UserError(f"the draft has {draft.config.vocab_size} token ids, fewer than the tokenizer's "
                            f"{tokenizer.vocab_size}: it is not a model of this tokenizer")
        if next(draft.parameters()).device != next(model.parameters()).device:
            raise UserError("the draft and the target must be on the same device")
        check_batch_memory(draft, rows, max_new_tokens, longest_prompt)


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, draft_name: str) -> None:
    """A draft proposes token ids of the target's vocabulary: its tokenizer must be the same one."""
    if target.state() != draft.state():
        raise UserError(f"the draft {draft_name} has another tokenizer ({draft.name}, {draft.vocab_size:,} tokens) "
                        f"than the model ({target.name}, {target.vocab_size:,} tokens); speculation needs the same")


# ----------------------------------------------------------------------------------------
# The acceptance rule.


def accept(p: torch.Tensor, q: torch.Tensor, proposal: Sequence[int], generator: torch.Generator) -> tuple[int, int]:
    """The acceptance rule of speculative sampling for one row and one step.

    p: (g + 1, V) the target's sampling distributions after the last accepted token and
    after each proposal token; q: (g, V) the proposal's distributions that proposal[i]
    was drawn from (one-hot for a deterministic proposal). Both float64, rows summing to 1.
    Returns (accepted, token): proposal[:accepted] is kept and ``token`` follows it, drawn
    from the normalised residual max(0, p_i - q_i) at the first rejection, or from p_g
    when every proposal is accepted. d_i is accepted when u * q_i(d_i) < p_i(d_i) for a
    fresh u ~ U[0, 1): with probability min(1, p_i(d_i) / q_i(d_i)).
    """
    for i, token in enumerate(proposal):
        u = torch.rand((), dtype=torch.float64, generator=generator, device=p.device)
        if u * q[i, token] < p[i, token]:
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        # Rejection implies p_i(d_i) < q_i(d_i), so the residual has mass unless p and q
        # differ by rounding only; then p_i itself is the distribution left.
        residual = residual if residual.sum() > 0 else p[i]
        return i, _draw(residual / residual.sum(), generator)
    return len(proposal), _draw(p[len(proposal)], generator)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(draw_tokens(probs[None], [generator])[0])


# ----------------------------------------------------------------------------------------
# Proposal sources.


def draft_confidence(processed: torch.Tensor) -> float:
    """max_j softmax(processed)_j for one row of `process_logits` output (1, V): when
    sampling, the largest probability of the distribution the draft draws from; for
    greedy decoding, whose distribution is one-hot and so always sure, the argmax's
    probability at temperature 1 after the penalties. So greedy's stop reads the draft's
    t = 1 softmax, while a sampling strategy with a sharp distribution (t near 0, top-k
    with k = 1) has a confidence near 1 and rarely stops."""
    return float(torch.softmax(processed.to(torch.float64), dim=-1).max())


class DraftProposer:
    """Proposals sampled from a draft model, with the target's strategy and penalties,
    stopped early where the draft's confidence is below ``p_min`` (0: never).

    The draft's context holds the same tokens as the target's; its cache holds all but
    the last of them between steps."""

    def __init__(self, draft: GPT, prompt: Sequence[int], spec: DecodingSpec, max_new_tokens: int, vocab: int,
                 p_min: float = 0.0):
        self.context = Context(draft, [list(prompt)], max_new_tokens, "shift")
        self.spec, self.vocab, self.p_min = spec, vocab, p_min

    def propose(self, g: int, history: torch.Tensor, penalties: PenaltyState,
                generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
        """Up to ``g`` tokens and the (len, V) float64 distributions each was drawn from.

        Before drawing token i the draft reads its distribution there; with confidence
        (`draft_confidence`) below p_min it stops, and the proposal is the i - 1 tokens
        before (none when i = 1). After a stop the draft's cache already holds its whole
        context, so `settle` has no token left to feed it."""
        trial = copy.deepcopy(penalties)  # counts the proposal tokens, position by position
        tokens, dists = [], []
        for _ in range(g):
            processed = trial.process(self.context.next_logits()[:, : self.vocab], self.spec)
            if self.p_min > 0 and draft_confidence(processed) < self.p_min:
                break
            q = sampling_distribution(processed, self.spec, torch.float64)[0]
            token = _draw(q, generator)
            tokens.append(token)
            dists.append(q)
            trial.add(torch.tensor([token], device=q.device))
            self.context.append(torch.tensor([token], device=q.device))
        if not dists:
            return [], torch.zeros(0, self.vocab, dtype=torch.float64, device=history.device)
        return tokens, torch.stack(dists)

    def settle(self, length: int, accepted: int, token: int) -> None:
        """The target kept ``accepted`` proposal tokens after the ``length`` tokens of the
        context, then chose ``token``: the draft's context follows."""
        context = self.context
        _truncate(context, length + accepted)
        if 0 < context.cache.length < context.length - context.window_start:
            # The draft has not read the context's last token (its last proposal, all of them
            # accepted, or the one a plain step followed): feed it, so that the cache lags by
            # one token only. An empty cache is filled by the next proposal's prefill.
            context.next_logits()
        context.append(torch.tensor([token], device=context.tokens.device))


class LookupProposer:
    """Prompt lookup: the proposal is what followed the latest earlier occurrence of the
    context's last ``n`` tokens (the prompt and the text so far), up to g tokens. No
    occurrence, no proposal. Deterministic, so each q_i is one-hot at d_i."""

    def __init__(self, n: int, vocab: int):
        self.n, self.vocab = n, vocab

    def propose(self, g: int, history: torch.Tensor, penalties: PenaltyState,
                generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
        tokens = lookup_continuation(history, self.n, g)
        dists = torch.zeros(len(tokens), self.vocab, dtype=torch.float64, device=history.device)
        dists[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = 1.0
        return tokens, dists

    def settle(self, length: int, accepted: int, token: int) -> None:
        """Nothing to follow: the next lookup reads the target's context."""


def lookup_continuation(history: torch.Tensor, n: int, g: int) -> list[int]:
    """Up to ``g`` tokens that followed the latest occurrence of history's last ``n``
    tokens that starts before them (an occurrence may overlap them: in "aaaa" the last
    two tokens last occurred at index 1, followed by "a"). [] when there is none or the
    history is no longer than n. history: (L,) token ids."""
    if g < 1 or history.numel() <= n:
        return []
    pattern = history[-n:]
    starts = history[:-1].unfold(0, n, 1)  # every n-gram that has a token after it
    found = (starts == pattern).all(dim=1).nonzero()
    if not found.numel():
        return []
    after = int(found[-1]) + n
    return history[after : after + g].tolist()


# ----------------------------------------------------------------------------------------
# The loop.


@dataclass
class RowStep:
    """What one speculative step released for one row."""

    tokens: list[int]  # the accepted proposal tokens, then the target's own
    proposed: int  # proposal tokens the target checked
    logits: torch.Tensor  # (len(tokens), V) the target's raw logits before each released token
    processed: torch.Tensor  # (len(tokens), V) the same after the strategy (what it sampled from)

    @property
    def accepted(self) -> int:
        return len(self.tokens) - 1


class SpeculativeRow:
    """One row's generation: the target's context, the proposal source, the penalty state
    and the row's generator. `step` releases the next tokens."""

    def __init__(self, model: GPT, prompt: Sequence[int], spec: DecodingSpec, speculation: Speculation,
                 seed: int, window: str, max_new_tokens: int, vocab: int):
        self.context = Context(model, [list(prompt)], max_new_tokens, window)
        device = self.context.tokens.device
        self.spec, self.speculation, self.vocab = spec, speculation, vocab
        self.generator = torch.Generator(device=device).manual_seed(int(seed))
        self.penalties = PenaltyState(spec, [prompt], vocab, device)
        self.proposer = (DraftProposer(speculation.draft, prompt, spec, max_new_tokens, vocab, speculation.p_min)
                         if speculation.draft is not None else LookupProposer(speculation.lookup, vocab))
        context = self.context
        if context.length - context.window_start > 1:  # read all but the last token: the first step can speculate
            with torch.no_grad(), context.precision.autocast():
                prefill(model, context.tokens[:, context.window_start : context.length - 1], context.cache, None)

    @torch.no_grad()
    def step(self, budget: int) -> RowStep:
        """Propose, verify in one pass of the target and accept; at most ``budget`` (>= 1) tokens.

        Between steps the target's cache holds every token but the last. A step proposes
        nothing (a plain step) when the window has no room for more positions (in "shift"
        mode the plain step restarts the window), or when the budget is one token."""
        context = self.context
        length = context.length
        room = context.block_size - (length - context.window_start)
        g = min(self.speculation.gamma, budget - 1, room)
        proposal, q = [], None
        if g > 0:
            proposal, q = self.proposer.propose(g, context.tokens[0, :length], self.penalties, self.generator)
        logits = self._verify(proposal) if proposal else context.next_logits()[:, : self.vocab]
        processed = self._process(logits, proposal)
        p = sampling_distribution(processed, self.spec, torch.float64)
        accepted, token = accept(p, q, proposal, self.generator)
        released = proposal[:accepted] + [token]
        _truncate(context, length + accepted)
        context.append(torch.tensor([token], device=context.tokens.device))
        self.proposer.settle(length, accepted, token)
        for kept in released:
            self.penalties.add(torch.tensor([kept], device=context.tokens.device))
        return RowStep(released, len(proposal), logits[: accepted + 1], processed[: accepted + 1])

    def _verify(self, proposal: list[int]) -> torch.Tensor:
        """Float32 logits (g + 1, V) after the context's last token and after each proposal
        token, in one forward pass of the target over those g + 1 tokens (the cache holds
        everything before them)."""
        context = self.context
        start = context.length - 1
        for token in proposal:
            context.append(torch.tensor([token], device=context.tokens.device))
        with context.precision.autocast():
            logits = context.model(context.tokens[:, start : context.length], cache=context.cache)[0][0]
        return logits[:, : self.vocab].float()

    def _process(self, logits: torch.Tensor, proposal: list[int]) -> torch.Tensor:
        """`process_logits` of each position, with the penalty state counting the proposal
        tokens before it (without penalties the positions are independent rows: one call)."""
        if not (self.spec.needs_seen or self.spec.needs_counts):
            return self.penalties.process(logits, self.spec)
        trial = copy.deepcopy(self.penalties) if proposal else self.penalties
        rows = []
        for i in range(logits.size(0)):
            rows.append(trial.process(logits[i : i + 1], self.spec))
            if i < len(proposal):
                trial.add(torch.tensor([proposal[i]], device=logits.device))
        return torch.cat(rows)


def _truncate(context: Context, length: int) -> None:
    """Keep the first ``length`` tokens of a one-row context, and in its cache the keys and
    values of at most those (the target's cache may hold every token; the draft's lags)."""
    context.length = length
    context.cache.rollback(min(context.cache.length, length - context.window_start))


def speculative_events(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], spec: DecodingSpec,
                       speculation: Speculation, *, max_new_tokens: int, seed: int, stop: Sequence[str],
                       window: str, top: int) -> Iterator[list[Event]]:
    """`generate_events`' stream (one row per prompt given, row r seeded ``seed + r``),
    with each step's tokens made speculatively: a row gets one event per released token,
    and its last event carries the row's `SpeculationCounts`. The arguments are checked
    by the caller (`check_speculation`)."""
    ends = [RowEnd(row, tokenizer, stop, max_new_tokens) for row in range(len(prompts))]
    if max_new_tokens == 0:
        yield [replace(end.empty_end(), speculation=SpeculationCounts()) for end in ends]
        return
    rows = [SpeculativeRow(model, prompt, spec, speculation, seed + row, window, max_new_tokens, tokenizer.vocab_size)
            for row, prompt in enumerate(prompts)]
    counts = [SpeculationCounts() for _ in prompts]
    while not all(end.ended for end in ends):
        events = []
        for r, (row, end) in enumerate(zip(rows, ends)):
            if end.ended:
                continue
            step = row.step(end.max_tokens - end.taken)
            counts[r] += SpeculationCounts(step.proposed, step.accepted, 1)
            released = _row_events(end, step, top, spec)
            if end.ended:
                released[-1] = replace(released[-1], speculation=counts[r])
            events += released
        yield events


def _row_events(end: RowEnd, step: RowStep, top: int, spec: DecodingSpec) -> list[Event]:
    """The row's events for a step's tokens, up to where the row ends (end-of-text, a stop string)."""
    raw = F.log_softmax(step.logits, dim=-1)
    tokens = torch.tensor(step.tokens, device=raw.device)
    chosen = raw.gather(1, tokens[:, None]).squeeze(1).tolist()
    details = (_token_details(Step(tokens, step.logits, step.processed), raw, top, spec) if top > 0
               else [None] * len(step.tokens))
    events = []
    for token, logprob, detail in zip(step.tokens, chosen, details):
        events.append(end.take(token, logprob, detail))
        if end.ended:
            break
    return events
