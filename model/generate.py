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
its window as one, each prompt length runs as its own batch). Every row samples with its own generator seeded
with ``seed + row index``, so a sample never depends on what else is in the batch.
"""

from __future__ import annotations

import codecs
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from model.decoding import choose_tokens, process_logits
from model.device import Precision
from model.errors import UserError
from model.gpt import GPT, KVCache
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

    @torch.no_grad()
    def next_logits(self) -> torch.Tensor:
        """Float32 logits (B, V) of the next token after everything appended so far."""
        if self.cache is None or self.length - self.window_start > self.block_size:
            self._slide()
        pad = (self.pad - self.window_start).clamp(min=0) if self.padded else None
        with self.precision.autocast():
            if self.cache is None or self.cache.length == 0:
                logits = prefill(self.model, self.tokens[:, self.window_start : self.length], self.cache, pad)
            else:
                logits = decode_step(self.model, self.tokens[:, self.length - 1 : self.length], self.cache, pad)
        logits = logits.float()
        if self.valid_vocab is not None and self.valid_vocab < logits.size(-1):
            logits[:, self.valid_vocab :] = float("-inf")  # ids the tokenizer does not have (vocab padding)
        return logits

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
) -> Iterator[Step]:
    """Yield ``max_new_tokens`` steps (the caller may stop early). Row b samples with a
    generator seeded ``seeds[b]``. Beam search is not a step-wise strategy: see beam_search."""
    if spec.is_beam:
        raise ValueError("decode_steps samples token by token; use beam_search for num_beams > 1")
    if window == "shift" and len({len(p) for p in prompts}) > 1:
        yield from _decode_by_length(model, prompts, spec, max_new_tokens, seeds, valid_vocab)
        return
    context = Context(model, prompts, max_new_tokens, window, valid_vocab)
    device = context.tokens.device
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    seen, counts = _penalty_state(spec, prompts, context)
    for _ in range(max_new_tokens):
        logits = context.next_logits()
        processed = process_logits(logits, spec, seen=seen, counts=counts)
        tokens = choose_tokens(processed, spec, generators)
        yield Step(tokens, logits, processed)
        context.append(tokens)
        _update_penalty_state(seen, counts, tokens)


def _decode_by_length(model: GPT, prompts: Sequence[Sequence[int]], spec: DecodingSpec, max_new_tokens: int,
                      seeds: Sequence[int], valid_vocab: int | None) -> Iterator[Step]:
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
                     window="shift", valid_vocab=valid_vocab)
        for rows in groups
    ]
    row_order = torch.tensor([row for rows in groups for row in rows]).argsort()
    for parts in zip(*batches):
        yield Step(*(torch.cat(tensors)[row_order.to(tensors[0].device)]
                     for tensors in zip(*((p.tokens, p.logits, p.processed) for p in parts))))


def _penalty_state(spec: DecodingSpec, prompts, context: Context):
    """``seen`` marks every token of prompt and output (repetition penalty); ``counts``
    counts generated tokens (frequency and presence penalties). Built only when used."""
    vocab = context.model.config.vocab_size
    device = context.tokens.device
    seen = counts = None
    if spec.needs_seen:
        seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, torch.tensor(prompt, device=device)] = True
    if spec.needs_counts:
        counts = torch.zeros(len(prompts), vocab, device=device)
    return seen, counts


def _update_penalty_state(seen, counts, tokens: torch.Tensor) -> None:
    rows = torch.arange(tokens.size(0), device=tokens.device)
    if seen is not None:
        seen[rows, tokens] = True
    if counts is not None:
        counts[rows, tokens] += 1


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


@dataclass
class TokenDetail:
    """What the model offered at one step, for explain tables and --logprobs files."""

    token: int  # the token chosen
    logprob: float  # its log-probability under the model's raw distribution
    filtered_logprob: float  # ... and under the distribution the strategy sampled from
    top: list[tuple[int, float, float]]  # the most likely tokens: (id, raw logprob, filtered logprob)


@dataclass
class Sample:
    """One generated continuation."""

    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)  # generated ids, the end-of-text token included if it came
    text: str = ""  # their text, cut before a stop string; never holds the end-of-text token
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the model's raw distribution
    finish: str = "length"  # "eot", "stop" or "length"
    details: list[TokenDetail] = field(default_factory=list)  # one per token when asked for (top > 0)


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """The token ids generation starts from: a text prompt's encoding, or token ids as
    given (ids cut from a token stream need not survive a trip through text: a byte-level
    BPE prompt can end inside a character). An empty prompt is the end-of-text token,
    i.e. the beginning of a document."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(token) for token in prompt]
    return ids or [tokenizer.eot_id]


def generate(
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
    on_text: Callable[[int, str], None] | None = None,
    on_done: Callable[[Sample], None] | None = None,
) -> list[Sample]:
    """Generate ``num_samples`` continuations of every prompt (a text or token ids, see
    `encode_prompt`), all in one batch.

    Row order is prompt-major: row = prompt_index * num_samples + sample_index, and each
    row samples with its own generator seeded ``seed + row``: every sample of the call
    has its own random stream (samples of different prompts that shared one would drift
    into the same text once their prompts left the window), and a row draws exactly
    what it would draw alone with that seed. A sample ends at the
    end-of-text token (kept as its last token, never in its text), at a stop string,
    or after ``max_new_tokens``. ``top`` > 0 records the ``top`` most likely tokens of
    every step in ``Sample.details``.
    on_text(row, text) receives printable text as it comes; on_done(sample) each
    sample as it ends.
    """
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")
    if any(s == "" for s in stop):
        raise UserError("a stop string must not be empty")
    rows = len(prompts) * num_samples
    if not 0 <= seed <= MAX_SEED - rows + 1:
        raise UserError(f"the seed must be in [0, {MAX_SEED - rows + 1}] (row r uses seed + r, at most {MAX_SEED}), "
                        f"got {seed}")
    check_batch_fits(model, spec.num_beams if spec.is_beam else rows, max_new_tokens)  # beams: one prompt at a time
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if spec.is_beam:
        if num_samples != 1:
            raise UserError("beam search is deterministic: use num_samples 1")
        return [
            _finish_beam(beam_search(model, ids, spec, max_new_tokens, tokenizer.eot_id, window, tokenizer.vocab_size),
                         index, tokenizer, stop, on_text, on_done)
            for index, ids in enumerate(encoded)
        ]
    indices = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    samples = [Sample(p, s) for p, s in indices]
    streams = [TextStream(tokenizer, stop) for _ in indices]
    live = set(range(rows))
    steps = decode_steps(model, [encoded[p] for p, _ in indices], spec, max_new_tokens,
                         [seed + row for row in range(rows)], window=window, valid_vocab=tokenizer.vocab_size)
    for step in steps:
        raw = F.log_softmax(step.logits, dim=-1)
        chosen = raw.gather(1, step.tokens[:, None]).squeeze(1).tolist()
        details = _token_details(step, raw, top, spec.is_greedy) if top > 0 else None
        for row, token in enumerate(step.tokens.tolist()):
            if row not in live:
                continue
            sample, stream = samples[row], streams[row]
            if details:
                sample.details.append(details[row])
            _take(sample, stream, token, chosen[row], tokenizer.eot_id, on_text, row)
            if sample.finish != "length":
                live.discard(row)
                _close(sample, stream, on_text, on_done, row)
        if not live:
            break
    for row in sorted(live):
        _close(samples[row], streams[row], on_text, on_done, row)
    return samples


def check_batch_fits(model: GPT, rows: int, max_new_tokens: int) -> None:
    """Refuse, before anything is allocated, a batch whose KV cache and token buffer
    alone would not fit in the memory of the model's device (an absurd number of
    samples would otherwise end in an allocator error, or in the machine swapping)."""
    cfg = model.config
    parameter = next(model.parameters())
    cache = 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * parameter.element_size()
    tokens = 8 * (cfg.block_size + min(max_new_tokens, 1024))
    needed, available = rows * (cache + tokens), _device_memory(parameter.device)
    if available is not None and needed > available:
        raise UserError(f"a batch of {rows:,} rows needs about {needed / 2**30:,.1f} GiB for its KV cache and "
                        f"tokens, more than the {available / 2**30:,.1f} GiB of memory of the {parameter.device.type}; "
                        "ask for fewer samples or prompts")


def _device_memory(device: torch.device) -> int | None:
    """Total memory of the device in bytes, or None where it is not known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # not a POSIX system
            return None
    return None


def _token_details(step: Step, raw: torch.Tensor, top: int, greedy: bool) -> list[TokenDetail]:
    tokens = step.tokens[:, None]
    if greedy:  # the argmax is chosen with probability 1: log 1 = 0 for it, log 0 for the rest
        filtered = torch.full_like(raw, -math.inf).scatter_(1, tokens, 0.0)
    else:
        filtered = F.log_softmax(step.processed.float(), dim=-1)
    top_raw, top_ids = raw.topk(min(top, raw.size(-1)), dim=-1)
    top_filtered = filtered.gather(1, top_ids)
    return [
        TokenDetail(token, logprob, filtered_logprob, list(zip(ids, raws, filts)))
        for token, logprob, filtered_logprob, ids, raws, filts in zip(
            step.tokens.tolist(), raw.gather(1, tokens).squeeze(1).tolist(),
            filtered.gather(1, tokens).squeeze(1).tolist(), top_ids.tolist(), top_raw.tolist(), top_filtered.tolist(),
        )
    ]


def _take(sample: Sample, stream: TextStream, token: int, logprob: float | None, eot_id: int, on_text,
          row: int) -> None:
    """Add one token to a sample and pass its printable text on; the end-of-text token or
    a stop string sets how the sample finished."""
    sample.tokens.append(token)
    if logprob is not None:
        sample.logprobs.append(logprob)
    if token == eot_id:
        sample.finish = "eot"
        return
    fragment = stream.feed(token)
    if fragment and on_text:
        on_text(row, fragment)
    if stream.stopped:
        sample.finish = "stop"


def _close(sample: Sample, stream: TextStream, on_text, on_done, row: int) -> None:
    rest = stream.finish()
    if rest and on_text:
        on_text(row, rest)
    sample.text = stream.text
    if on_done:
        on_done(sample)


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
    logits before the log-softmax.
    """
    n = spec.num_beams
    context = Context(model, [list(prompt)] * n, max_new_tokens, window, valid_vocab)
    beams = [Beam([], 0.0 if i == 0 else float("-inf"), []) for i in range(n)]  # start from one beam
    finished: list[Beam] = []
    seen, counts = _penalty_state(spec, [prompt] * n, context)
    for step in range(max_new_tokens):
        logits = context.next_logits()
        raw = F.log_softmax(logits, dim=-1)
        ranked = F.log_softmax(process_logits(logits, spec, seen=seen, counts=counts), dim=-1)
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
        seen = seen.index_select(0, rows) if seen is not None else None
        counts = counts.index_select(0, rows) if counts is not None else None
        tokens = torch.tensor(chosen_tokens, device=logits.device)
        context.append(tokens)
        _update_penalty_state(seen, counts, tokens)
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


def _finish_beam(beam: Beam, prompt_index: int, tokenizer: Tokenizer, stop, on_text, on_done) -> Sample:
    return finished_sample(beam.tokens, tokenizer, stop, prompt_index, logprobs=beam.logprobs, on_text=on_text,
                           on_done=on_done)


def finished_sample(tokens: Sequence[int], tokenizer: Tokenizer, stop: Sequence[str] = (), prompt_index: int = 0,
                    *, logprobs: Sequence[float] | None = None, on_text=None, on_done=None) -> Sample:
    """The sample that ``tokens`` make, ended by the rule every sample of generate follows:
    at the end-of-text token (kept as its last token), at a stop string (the text cut
    before it), or after its last token. ``logprobs``, one per token, are recorded when given."""
    stream = TextStream(tokenizer, stop)
    sample = Sample(prompt_index, 0)
    for token, logprob in zip(tokens, logprobs if logprobs is not None else [None] * len(tokens)):
        _take(sample, stream, int(token), logprob, tokenizer.eot_id, on_text, prompt_index)
        if sample.finish != "length":
            break
    _close(sample, stream, on_text, on_done, prompt_index)
    return sample
