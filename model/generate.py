"""The token loop: context -> logits -> decoding strategy -> next token -> append -> repeat.

The prompt goes through the model once (``prefill``); each later step (``decode_step``)
feeds only the new token, whose keys and values are appended to a preallocated KV
cache, so a step costs O(context) instead of re-running the whole context.

A model with learned absolute positions sees at most ``block_size`` tokens. Past that,
the reference behaviour (``window="none"``, no cache) crops the context to its last
``block_size`` tokens at every step. With a cache there are two modes:

* ``"exact"``: same tokens as the reference. Once the context is longer than the
  window, every cached key would change position each step, so the whole window is run
  again each step (as slow as no cache, but only past the window).
* ``"shift"``: fast. Whenever the window is full and one more token must go in, the
  context restarts from the most recent ``block_size // 2`` tokens, which are prefilled
  once; the following steps use the cache again. The model then sees between half a
  window and a full window of context, never less.

Several prompts of different lengths run as one batch: rows are left-padded, padding
is masked out of attention and each row's positions count from its own first token,
so a row computes what it would alone (in ``"shift"`` mode, where a batch restarts
its window as one, each prompt length runs as its own batch). Every row samples with
its own generator seeded with ``seed + row index``, so a sample never depends on what
else is in the batch.

This is the only place the loop runs. `generate_events` yields each step's `Event`s
(a row's token, the text it makes printable, its logprob, the candidates when asked,
and on its last event how it ended, by the one rule of `RowEnd`); the CLI printer, the
comparison and the server read that stream, and `generate` collects it into `Sample`s.
A prompt longer than the context is read like any context that outgrew it: through the
window.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from model.decoding import (
    PenaltyState, choose_tokens, mask_vocab_padding, sampling_distribution, sequence_breaker_ids,
)
from model.device import Precision
from model.errors import UserError
from model.gpt import GPT, KVCache
from model.memory import device_memory
from model.strategy import DecodingSpec
from model.tokenizer import Tokenizer

WINDOW_MODES = ("exact", "shift", "none")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def prefill(model: GPT, window: torch.Tensor, cache: KVCache | None, pad: torch.Tensor | None) -> torch.Tensor:
    """Run a window of tokens (B, T) through the model in one pass: the phase that
    reads a prompt, or restarts a window. An (empty) cache is filled with the keys and
    values of all T positions. Returns the logits (B, V) of the token after the window;
    the LM head runs on the last position only, as no other position's logits are needed."""
    if cache is not None and cache.length:
        raise ValueError("prefill starts from an empty cache")
    return model(window, cache=cache, pad=pad, last_only=True)[0][:, -1]


def decode_step(model: GPT, token: torch.Tensor, cache: KVCache, pad: torch.Tensor | None) -> torch.Tensor:
    """Feed one new token per row (B, 1) after the cached positions: the phase that makes
    each generated token. Attention reads the cached keys and values, the cache grows by
    one position, and the step costs O(context). Returns the next token's logits (B, V)."""
    if token.size(1) != 1:
        raise ValueError(f"a decode step feeds one token per row, got {token.size(1)}")
    return model(token, cache=cache, pad=pad, last_only=True)[0][:, -1]


class Context:
    """The tokens of a batch so far, and the model state (KV cache) that goes with them.

    Rows are left-padded to a common length; ``pad[b]`` counts row b's padding.
    ``window_start`` is the index in ``tokens`` of the first token the model sees.
    The model is only read, never changed.
    """

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, window: str,
                 valid_vocab: int | None = None):
        if window not in WINDOW_MODES:
            raise UserError(f"window must be one of {', '.join(WINDOW_MODES)}, got {window!r}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (use the end-of-text token for 'nothing')")
        self.model = model
        self.window = window
        self.block_size = model.config.block_size
        self.valid_vocab = valid_vocab
        device = next(model.parameters()).device
        longest = max(len(p) for p in prompts)
        # room for the prompt and the first steps; append doubles it as needed (a huge
        # max_new_tokens costs nothing until the tokens come)
        self.tokens = torch.zeros(len(prompts), longest + min(max_new_tokens, 1024), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            self.tokens[row, longest - len(prompt) : longest] = torch.tensor(prompt, device=device)
        self.pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        self.padded = bool(self.pad.any())
        self.length = longest
        self.window_start = max(0, longest - self.block_size)
        self.precision = Precision.for_device(device)
        self.cache = None
        if window != "none":
            self.cache = KVCache(model.config, len(prompts), self.block_size, device, self._cache_dtype(model))

    def _cache_dtype(self, model: GPT) -> torch.dtype:
        """What attention's keys and values come out as: the autocast type, else the weights' type."""
        if self.precision.dtype != torch.float32:
            return self.precision.dtype
        return next(model.parameters()).dtype

    @torch.inference_mode()  # no autograd bookkeeping at all: per-operator overhead is most of a small step
    def next_logits(self) -> torch.Tensor:
        """Float32 logits (B, V) of the next token after everything appended so far. They
        are inference tensors: read them, or copy them to change them in place."""
        if self.cache is None or self.length - self.window_start > self.block_size:
            self._slide()
        pad = (self.pad - self.window_start).clamp(min=0) if self.padded else None
        with self.precision.autocast():
            if self.cache is None or self.cache.length == 0:
                logits = prefill(self.model, self.tokens[:, self.window_start : self.length], self.cache, pad)
            else:
                logits = decode_step(self.model, self.tokens[:, self.length - 1 : self.length], self.cache, pad)
        logits = logits.float()
        return logits if self.valid_vocab is None else mask_vocab_padding(logits, self.valid_vocab)

    def _slide(self) -> None:
        """Move the window forward so it holds at most block_size tokens, per the mode."""
        keep = self.block_size // 2 if self.window == "shift" else self.block_size
        self.window_start = max(0, self.length - max(keep, 1)) if self.length > self.block_size else 0
        if self.cache is not None:
            self.cache.reset()

    def append(self, tokens: torch.Tensor) -> None:
        if self.length == self.tokens.size(1):
            self.tokens = torch.cat([self.tokens, torch.zeros_like(self.tokens)], dim=1)
        self.tokens[:, self.length] = tokens
        self.length += 1

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues old row rows[i] (beam search)."""
        self.tokens = self.tokens.index_select(0, rows)
        self.pad = self.pad.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows)


@dataclass
class Step:
    """One decoding step for the whole batch."""

    tokens: torch.Tensor  # (B,) the chosen tokens
    logits: torch.Tensor  # (B, V) the model's raw logits
    processed: torch.Tensor  # (B, V) after the strategy's penalties, temperature and filters


def decode_steps(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    spec: DecodingSpec,
    max_new_tokens: int,
    seeds: Sequence[int],
    *,
    window: str = "exact",
    valid_vocab: int | None = None,
    breaker_ids: frozenset[int] = frozenset(),
) -> Iterator[Step]:
    """Yield ``max_new_tokens`` steps (the caller may stop early). Row b samples with a
    generator seeded ``seeds[b]``; the strategy's per-row state (`PenaltyState`: penalties,
    DRY's history with its sequence breakers ``breaker_ids``, mirostat's mu, XTC's coins)
    starts with the prompts and follows each row's tokens. Beam search is not a step-wise
    strategy: see beam_search."""
    if spec.is_beam:
        raise ValueError("decode_steps samples token by token; use beam_search for num_beams > 1")
    if window == "shift" and len({len(p) for p in prompts}) > 1:
        yield from _decode_by_length(model, prompts, spec, max_new_tokens, seeds, valid_vocab, breaker_ids)
        return
    context = Context(model, prompts, max_new_tokens, window, valid_vocab)
    device = context.tokens.device
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    penalties = PenaltyState(spec, prompts, model.config.vocab_size, device, breaker_ids=breaker_ids,
                             context_size=context.block_size)
    for _ in range(max_new_tokens):
        logits = context.next_logits()
        processed = penalties.process(logits, spec, generators)
        tokens = choose_tokens(processed, spec, generators)
        yield Step(tokens, logits, processed)
        context.append(tokens)
        penalties.add(tokens, processed)


def _decode_by_length(model: GPT, prompts: Sequence[Sequence[int]], spec: DecodingSpec, max_new_tokens: int,
                      seeds: Sequence[int], valid_vocab: int | None, breaker_ids: frozenset[int]) -> Iterator[Step]:
    """decode_steps in "shift" mode for prompts of different lengths. A batch shares one
    window, which restarts when its longest row fills it, so a shorter row would restart
    at other steps than alone. Rows of each prompt length therefore run as their own
    batch; the batches advance together and each step is put back in row order."""
    by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(row)
    groups = list(by_length.values())
    batches = [
        decode_steps(model, [prompts[r] for r in rows], spec, max_new_tokens, [seeds[r] for r in rows],
                     window="shift", valid_vocab=valid_vocab, breaker_ids=breaker_ids)
        for rows in groups
    ]
    row_order = torch.tensor([row for rows in groups for row in rows]).argsort()
    for parts in zip(*batches):
        yield Step(*(torch.cat(tensors)[row_order.to(tensors[0].device)]
                     for tensors in zip(*((p.tokens, p.logits, p.processed) for p in parts))))


class TextStream:
    """Turns a row's tokens into text that is safe to print as it comes.

    Bytes of a character split across byte-level tokens are held back until the
    character is complete, and so is any tail of the text that could still grow into a
    stop string, so a stop string (never printed) is never half-shown.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (up to the stop string, once one is found)
        self.emitted = 0  # characters of text already handed out
        self.stopped = False

    def feed(self, token: int) -> str:
        """Add a token; return the newly printable text ("" once a stop string was found)."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(self.tokenizer.token_bytes(token))
        # One token can complete several stop strings: the text ends before the earliest.
        found = [self.text.find(stop, max(0, self.emitted - len(stop) + 1)) for stop in self.stop]
        found = [at for at in found if at != -1]
        if found:
            self.text, self.stopped = self.text[: min(found)], True
        return self._emit(len(self.text) if self.stopped else len(self.text) - self._held_back())

    def finish(self) -> str:
        """The sample ended: flush what was held back (an incomplete character becomes U+FFFD)."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        fragment = self.text[self.emitted : end]
        self.emitted = end
        return fragment


@dataclass(frozen=True)
class TokenDetail:
    """What the model offered at one step, for explain tables and logprobs."""

    token: int  # the token chosen
    logprob: float  # its log-probability under the model's raw distribution
    filtered_logprob: float  # ... and under the distribution the strategy sampled from (-inf: not kept)
    top: list[tuple[int, float, float]]  # the most likely tokens: (id, raw logprob, filtered logprob)


@dataclass(frozen=True)
class SpeculationCounts:
    """How one row's speculative decoding went: the proposal tokens the target checked,
    those the acceptance rule kept, and the target's passes (one a step; a plain step
    counts, with nothing proposed)."""

    proposed: int = 0
    accepted: int = 0
    passes: int = 0

    def __add__(self, other: SpeculationCounts) -> SpeculationCounts:
        return SpeculationCounts(self.proposed + other.proposed, self.accepted + other.accepted,
                                 self.passes + other.passes)

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed; 0 when nothing was proposed."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a target pass released: the accepted ones and its own (0 without passes)."""
        return (self.accepted + self.passes) / self.passes if self.passes else 0.0

    def summary(self) -> str:
        """One line, as sample.py generate prints it after a speculative generation."""
        return (f"speculative decoding: {self.accepted:,} of {self.proposed:,} proposed tokens accepted "
                f"({self.acceptance_rate:.1%}), {self.tokens_per_pass:.2f} tokens per target pass "
                f"({self.passes:,} passes)")


@dataclass(frozen=True)
class Event:
    """One token released for one row of a generation, or the end of a row.

    A step of the token loop releases a list of events. Usually that is one per live
    row; a row may get several in one step (beam search releases a prompt's whole beam
    at once; a speculative step would release every token it accepts), each with its own
    logprob. A row's last event carries ``finish``.
    """

    row: int  # prompt-major: prompt_index * num_samples + sample_index
    token: int | None  # None only on the end of a row that got no token (max_new_tokens 0)
    text: str  # newly printable text (held back while it could be part of a stop string or a character)
    logprob: float | None  # log p(token) under the model's raw distribution (None: not known, or no token)
    offset: int  # characters of the row's text before this token's text (at most the final text's length)
    detail: TokenDetail | None = None  # the top candidates, when asked for (top > 0)
    finish: str | None = None  # on the row's last event: "eot", "stop" or "length"
    speculation: SpeculationCounts | None = None  # on a speculative row's last event: how it went


@dataclass
class Sample:
    """One generated continuation, collected from its events (`add`)."""

    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)  # generated ids, the end-of-text token included if it came
    text: str = ""  # their text, cut before a stop string; never holds the end-of-text token
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the model's raw distribution
    finish: str = "length"  # "eot", "stop" or "length"
    details: list[TokenDetail] = field(default_factory=list)  # one per token when asked for (top > 0)
    speculation: SpeculationCounts | None = None  # decoded speculatively: its proposals and passes

    def add(self, event: Event) -> None:
        if event.token is not None:
            self.tokens.append(event.token)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        if event.detail is not None:
            self.details.append(event.detail)
        self.text += event.text
        if event.finish is not None:
            self.finish = event.finish
        if event.speculation is not None:
            self.speculation = event.speculation


class RowEnd:
    """The rule by which every sample ends, for one row: at the end-of-text token (kept as
    its last token, never in its text), at a stop string (its text cut before it), or
    after ``max_tokens`` tokens. `take` turns each token into the row's `Event`."""

    def __init__(self, row: int, tokenizer: Tokenizer, stop: Sequence[str], max_tokens: int):
        self.row, self.eot_id, self.max_tokens = row, tokenizer.eot_id, max_tokens
        self.stream = TextStream(tokenizer, stop)
        self.taken = 0
        self.ended = max_tokens == 0

    def take(self, token: int, logprob: float | None = None, detail: TokenDetail | None = None) -> Event:
        if self.ended:
            raise ValueError(f"row {self.row} has ended; it takes no more tokens")
        offset = len(self.stream.text)
        self.taken += 1
        finish = None
        if token == self.eot_id:
            text, finish = self.stream.finish(), "eot"
        else:
            text = self.stream.feed(token)
            if self.stream.stopped:  # the text was cut before the stop string, maybe before this token
                finish, offset = "stop", min(offset, len(self.stream.text))
            elif self.taken == self.max_tokens:
                text, finish = text + self.stream.finish(), "length"
        self.ended = finish is not None
        return Event(self.row, token, text, logprob, offset, detail, finish)

    def empty_end(self) -> Event:
        """The end of a row that may take no token at all (max_tokens 0)."""
        return Event(self.row, None, "", None, 0, None, "length")


def replay(tokenizer: Tokenizer, tokens: Sequence[int], stop: Sequence[str] = (), *,
           logprobs: Sequence[float] | None = None, prompt_index: int = 0) -> Sample:
    """The sample that ``tokens`` make under the rule every generated sample follows
    (`RowEnd`): cut at the end-of-text token, at a stop string, or after the last token.
    The comparison's human row and beam search's result are made this way. ``logprobs``,
    one per token, are recorded when given."""
    sample = Sample(prompt_index, 0)
    for event in _replay_events(0, tokenizer, tokens, stop, logprobs):
        sample.add(event)
    return sample


def _replay_events(row: int, tokenizer: Tokenizer, tokens: Sequence[int], stop: Sequence[str],
                   logprobs: Sequence[float] | None) -> list[Event]:
    end = RowEnd(row, tokenizer, stop, len(tokens))
    if not tokens:
        return [end.empty_end()]
    events = []
    for token, logprob in zip(tokens, logprobs if logprobs is not None else [None] * len(tokens)):
        events.append(end.take(int(token), logprob))
        if end.ended:
            break
    return events


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int], name: str = "prompt") -> list[int]:
    """The token ids generation starts from: a text prompt's encoding, or token ids as
    given (ids cut from a token stream need not survive a trip through text: a byte-level
    BPE prompt can end inside a character). An empty prompt is the end-of-text token,
    i.e. the beginning of a document.

    The rules every caller shares (sample.py, compare, the server): a text with
    characters the tokenizer cannot encode and an id outside the vocabulary are each a
    UserError naming ``name``. A prompt longer than the model's context is not refused:
    like any long context, it is read through the window (see the module docstring and
    `long_prompt_note`).
    """
    if isinstance(prompt, str):
        tokenizer.check_encodable(prompt, name)
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(token) for token in prompt]
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise UserError(f"{name} has token id {bad[0]}, outside this model's vocabulary "
                            f"[0, {tokenizer.vocab_size})")
    return ids or [tokenizer.eot_id]


def long_prompt_note(ids: Sequence[int], block_size: int, name: str = "prompt") -> str | None:
    """The one line that says what the model sees of a prompt longer than its context
    (None for a prompt that fits): its last ``block_size`` tokens, as for any context
    that outgrows the window."""
    if len(ids) <= block_size:
        return None
    return f"{name} is {len(ids):,} tokens, longer than this model's context: it sees the last {block_size:,}"


def generate_events(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    spec: DecodingSpec,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    seed: int = 0,
    stop: Sequence[str] = (),
    window: str = "exact",
    top: int = 0,
    speculate: model.speculative.Speculation | None = None,  # not imported: that module builds on this one
) -> Iterator[list[Event]]:
    """The token loop as a stream: the events of each step (see `Event`), until every row
    has ended. The arguments are checked before this returns; stop iterating (or close
    the iterator) at any time to stop generating.

    ``num_samples`` continuations of every prompt (a text or token ids, see
    `encode_prompt`) run as one batch. Row order is prompt-major: row = prompt_index *
    num_samples + sample_index, and each row samples with its own generator seeded
    ``seed + row``: every sample of the call has its own random stream (samples of
    different prompts that shared one would drift into the same text once their prompts
    left the window), and a row draws exactly what it would draw alone with that seed.
    A row ends by the rule of `RowEnd`. ``top`` > 0 adds the ``top`` most likely tokens
    of every step to its events (``detail``). Beam search runs prompt by prompt and
    releases each prompt's best beam in one step once it is found. ``speculate`` makes
    the tokens speculatively (model/speculative.py): the same distribution, several
    tokens per row and step.
    """
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")
    if any(s == "" for s in stop):
        raise UserError("a stop string must not be empty")
    if window not in WINDOW_MODES:
        raise UserError(f"window must be one of {', '.join(WINDOW_MODES)}, got {window!r}")
    if not prompts:
        raise UserError("there is no prompt to continue (an empty prompt, '', starts a new document)")
    if spec.is_beam and num_samples != 1:
        raise UserError("beam search is deterministic: use num_samples 1")
    if spec.is_beam and top:
        raise UserError("per-token details follow one token at a time; beam search has none")
    rows = len(prompts) * num_samples
    if not 0 <= seed <= MAX_SEED - rows + 1:
        raise UserError(f"the seed must be in [0, {MAX_SEED - rows + 1}] (row r uses seed + r, at most {MAX_SEED}), "
                        f"got {seed}")
    names = ["prompt" if len(prompts) == 1 else f"prompt {i + 1}" for i in range(len(prompts))]
    encoded = [encode_prompt(tokenizer, p, name) for p, name in zip(prompts, names)]
    longest = max(len(ids) for ids in encoded)
    check_batch_memory(model, spec.num_beams if spec.is_beam else rows, max_new_tokens, longest)  # beams: per prompt
    if speculate is not None:
        speculate.check(model, tokenizer, spec, window, rows, max_new_tokens, longest)
        return speculate.events(model, tokenizer, [encoded[r // num_samples] for r in range(rows)], spec,
                                max_new_tokens=max_new_tokens, seed=seed, stop=stop, window=window, top=top)
    if spec.is_beam:
        return _beam_events(model, tokenizer, encoded, spec, max_new_tokens, stop, window)
    return _sampled_events(model, tokenizer, [encoded[r // num_samples] for r in range(rows)], spec,
                           max_new_tokens, seed, stop, window, top)


def _sampled_events(model: GPT, tokenizer: Tokenizer, rows: list[list[int]], spec: DecodingSpec,
                    max_new_tokens: int, seed: int, stop: Sequence[str], window: str,
                    top: int) -> Iterator[list[Event]]:
    ends = [RowEnd(row, tokenizer, stop, max_new_tokens) for row in range(len(rows))]
    if max_new_tokens == 0:
        yield [end.empty_end() for end in ends]
        return
    steps = decode_steps(model, rows, spec, max_new_tokens, [seed + row for row in range(len(rows))],
                         window=window, valid_vocab=tokenizer.vocab_size, breaker_ids=dry_breakers(tokenizer, spec))
    for step in steps:
        raw = F.log_softmax(step.logits, dim=-1)
        chosen = raw.gather(1, step.tokens[:, None]).squeeze(1).tolist()
        details = _token_details(step, raw, top, spec) if top > 0 else [None] * len(rows)
        yield [end.take(token, chosen[row], details[row])
               for row, (end, token) in enumerate(zip(ends, step.tokens.tolist())) if not end.ended]
        if all(end.ended for end in ends):
            return


def _beam_events(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], spec: DecodingSpec,
                 max_new_tokens: int, stop: Sequence[str], window: str) -> Iterator[list[Event]]:
    for row, ids in enumerate(prompts):
        beam = beam_search(model, ids, spec, max_new_tokens, tokenizer.eot_id, window, tokenizer.vocab_size,
                           dry_breakers(tokenizer, spec))
        yield _replay_events(row, tokenizer, beam.tokens, stop, beam.logprobs)


def dry_breakers(tokenizer: Tokenizer, spec: DecodingSpec) -> frozenset[int]:
    """The tokens of ``tokenizer`` that are sequence breakers of the spec's DRY penalty
    (none when DRY is off): `decoding.sequence_breaker_ids`."""
    if not spec.uses_dry:
        return frozenset()
    token_bytes = [tokenizer.token_bytes(token) for token in range(tokenizer.vocab_size)]
    return sequence_breaker_ids(spec.dry_sequence_breakers, token_bytes)


def new_samples(num_prompts: int, num_samples: int) -> list[Sample]:
    """Empty samples in row order, for collecting the events of `generate_events`."""
    return [Sample(p, s) for p in range(num_prompts) for s in range(num_samples)]


def generate(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]], spec: DecodingSpec, *,
             num_samples: int = 1, **options) -> list[Sample]:
    """Every sample of `generate_events` (the same arguments: max_new_tokens, seed, stop,
    window, top, speculate), collected, in row order."""
    events = generate_events(model, tokenizer, prompts, spec, num_samples=num_samples, **options)
    samples = new_samples(len(prompts), num_samples)  # after the checks: num_samples may be absurd
    for step in events:
        for event in step:
            samples[event.row].add(event)
    return samples


def check_batch_memory(model: GPT, rows: int, max_new_tokens: int, longest_prompt: int = 0) -> None:
    """Refuse, before anything is allocated, a batch whose KV cache and token buffer
    alone would not fit in the memory of the model's device (an absurd number of
    samples would otherwise end in an allocator error, or in the machine swapping).
    The token buffer holds the longest prompt, which may be longer than the context."""
    cfg = model.config
    parameter = next(model.parameters())
    cache = 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * parameter.element_size()
    tokens = 8 * (max(cfg.block_size, longest_prompt) + min(max_new_tokens, 1024))
    needed, available = rows * (cache + tokens), device_memory(parameter.device)
    if available is not None and needed > available:
        raise UserError(f"a batch of {rows:,} rows needs about {needed / 2**30:,.1f} GiB for its KV cache and "
                        f"tokens, more than the {available / 2**30:,.1f} GiB of memory of the {parameter.device.type}; "
                        "ask for fewer samples or prompts")


def _token_details(step: Step, raw: torch.Tensor, top: int, spec: DecodingSpec) -> list[TokenDetail]:
    tokens = step.tokens[:, None]
    filtered = sampling_distribution(step.processed, spec, torch.float64).log()
    top_raw, top_ids = raw.topk(min(top, raw.size(-1)), dim=-1)
    top_filtered = filtered.gather(1, top_ids)
    return [
        TokenDetail(token, logprob, filtered_logprob, list(zip(ids, raws, filts)))
        for token, logprob, filtered_logprob, ids, raws, filts in zip(
            step.tokens.tolist(), raw.gather(1, tokens).squeeze(1).tolist(), filtered.gather(1, tokens).squeeze(1).tolist(),
            top_ids.tolist(), top_raw.tolist(), top_filtered.tolist(),
        )
    ]


@dataclass
class Beam:
    tokens: list[int]
    score: float  # sum of the (penalised) log-probabilities that ranked the beam
    logprobs: list[float]  # raw model log-probabilities of its tokens
    ended: bool = False  # reached the end-of-text token


@torch.no_grad()
def beam_search(
    model: GPT,
    prompt: Sequence[int],
    spec: DecodingSpec,
    max_new_tokens: int,
    eot_id: int | None,
    window: str = "exact",
    valid_vocab: int | None = None,
    breaker_ids: frozenset[int] = frozenset(),
) -> Beam:
    """Deterministic beam search with ``spec.num_beams`` beams.

    Each step extends every live beam by every token and keeps the ``num_beams`` best by
    total log-probability (ties to the lower beam, then the lower token id). A beam that
    picks the end-of-text token is set aside as finished. The result is the beam with
    the best score divided by its length, where the end-of-text token's log-probability
    counts in the score but the token does not count in the length. This differs from
    transformers (length_penalty=1.0), which counts the end token in the length, so the
    two can rank finished beams differently and pick different texts when beams end. The search stops after ``max_new_tokens`` steps, or once
    ``num_beams`` beams have finished and no live beam can still beat the worst of them
    (a bound, not a guess: see _search_is_over). Penalties in ``spec`` apply to the
    logits before the log-softmax (DRY with ``breaker_ids`` as its sequence breakers).
    """
    n = spec.num_beams
    context = Context(model, [list(prompt)] * n, max_new_tokens, window, valid_vocab)
    beams = [Beam([], 0.0 if i == 0 else float("-inf"), []) for i in range(n)]  # start from one beam
    finished: list[Beam] = []
    penalties = PenaltyState(spec, [prompt] * n, model.config.vocab_size, context.tokens.device,
                             breaker_ids=breaker_ids, context_size=context.block_size)
    for step in range(max_new_tokens):
        logits = context.next_logits()
        raw = F.log_softmax(logits, dim=-1)
        ranked = F.log_softmax(penalties.process(logits, spec), dim=-1)
        totals = torch.tensor([b.score for b in beams], device=logits.device)[:, None] + ranked  # (n, V)
        order = torch.sort(totals.flatten(), descending=True, stable=True).indices[: 2 * n].tolist()
        chosen_rows, chosen_tokens, next_beams = [], [], []
        for flat in order:
            row, token = divmod(flat, totals.size(1))
            parent = beams[row]
            if parent.score == float("-inf"):
                continue
            beam = Beam(parent.tokens + [token], totals[row, token].item(), parent.logprobs + [raw[row, token].item()])
            if token == eot_id:
                beam.ended = True
                finished.append(beam)
                continue
            next_beams.append(beam)
            chosen_rows.append(row)
            chosen_tokens.append(token)
            if len(next_beams) == n:
                break
        finished = sorted(finished, key=_normalised, reverse=True)[:n]
        if not next_beams or _search_is_over(finished, next_beams, n, max_new_tokens):
            break
        rows = torch.tensor(chosen_rows, device=logits.device)
        context.reorder(rows)
        penalties.reorder(rows)
        tokens = torch.tensor(chosen_tokens, device=logits.device)
        context.append(tokens)
        penalties.add(tokens)
        beams = next_beams
    candidates = finished + [b for b in beams if b.score > float("-inf")]
    return max(candidates, key=_normalised)


def _normalised(beam: Beam) -> float:
    """Score per generated token, the end-of-text token not counted."""
    return beam.score / max(len(beam.tokens) - beam.ended, 1)


def _search_is_over(finished: list[Beam], live: list[Beam], n: int, max_new_tokens: int) -> bool:
    """Done when n beams have finished and no live beam can end above the worst of them.
    A live beam's score (a sum of log-probabilities, <= 0) only falls as it grows, and
    its length is at most max_new_tokens, so it can end at best at score / max_new_tokens.
    (Dividing by the current length instead, a common shortcut, is not a bound: -10
    over 5 tokens is -2, and one more token of log-probability -0.1 makes it -1.68.)"""
    if len(finished) < n:
        return False
    best_live = max(b.score for b in live) / max_new_tokens
    return best_live <= _normalised(finished[-1])
