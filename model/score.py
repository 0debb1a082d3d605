"""Log-probabilities of given tokens: bits per byte of any text scored in windows of the
model's context, teacher-forced continuations, and the logprobs of an echoed prompt.

A loss in nats per token depends on how much text a token holds (one character, or a
BPE piece of three or four), so a char model's 1.5 and a BPE model's 3.7 say nothing
side by side. Bits per byte divide the information the model needs for the text by
the text's length in UTF-8 bytes, the same for every tokenizer:

    bits per byte = (sum over the text's tokens of -ln p(token)) / (bytes of text) / ln 2

For a char model of ASCII text that is nats per token / ln 2. The end-of-text token
stands for no text: it counts 0 bytes, and its nats count like any other token's
(knowing where a text ends is part of modelling it), as do vocabulary padding ids,
which never occur as targets.

Scoring a text longer than the context runs windows of ``block_size`` tokens. The first
window scores all of its tokens; each later one moves ``stride`` tokens on and scores
only the ``stride`` tokens new to it, so every token is scored once and, past the first
window, with at least ``block_size - stride`` tokens before it. stride = block_size is
fastest (no overlap, but a token at a window's start has no context); a smaller stride
costs block_size / stride times the work for more context (the default, block_size / 2,
twice). The text is preceded by the end-of-text token, as every text but the first
is in training, so its first token is scored too, as the start of a text.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from model.generate import Context
from model.gpt import GPT
from model.tokenizer import Tokenizer


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64: how many UTF-8 bytes of text each token id stands for
    (0 for end-of-text and for padding ids past the tokenizer's vocabulary)."""
    lengths = torch.zeros(vocab_size, dtype=torch.int64)
    for token in range(min(vocab_size, tokenizer.vocab_size)):
        if token != tokenizer.eot_id:
            lengths[token] = len(tokenizer.token_bytes(token))
    return lengths


def bits_per_byte(nats: float, num_bytes: int) -> float:
    """Total nats over a text of ``num_bytes`` UTF-8 bytes, in bits per byte."""
    if num_bytes <= 0:
        raise ValueError("bits per byte need at least one byte of text")
    return nats / num_bytes / math.log(2)


@dataclasses.dataclass
class TextScore:
    """What a model paid for some tokens: their count, their total nats, their bytes."""

    tokens: int = 0
    nats: float = 0.0
    bytes: int = 0

    def __add__(self, other: TextScore) -> TextScore:
        return TextScore(self.tokens + other.tokens, self.nats + other.nats, self.bytes + other.bytes)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nats, self.bytes)


def windows(num_targets: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) of each window over a sequence whose positions
    0 .. num_targets - 1 each predict the next token: the window's inputs are positions
    start .. end - 1 and it scores the predictions of first_scored .. end - 1."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    end = min(block_size, num_targets)
    spans = [(0, end, 0)]
    while end < num_targets:
        new_end = min(end + stride, num_targets)
        spans.append((max(0, new_end - block_size), new_end, end))
        end = new_end
    return spans


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module, tokens: Sequence[int], byte_lengths: torch.Tensor, *, block_size: int,
    stride: int, batch_size: int = 8, device: torch.device | str = "cpu",
) -> Iterator[TextScore]:
    """Score ``tokens`` (the text's ids, end-of-text first as its context) in windows;
    yields the score of each batch of windows as it is done (sum them; len(windows(...))
    tells how many windows there are). The model must be in eval mode."""
    if model.training:
        raise ValueError("score_tokens needs the model in eval mode (dropout would change the scores)")
    ids = torch.as_tensor(tokens, dtype=torch.int64)
    spans = windows(len(ids) - 1, block_size, stride)
    for first in range(0, len(spans), batch_size):
        batch = spans[first : first + batch_size]
        # Every window has the same length except where the text is shorter than one window.
        x = torch.stack([ids[start:end] for start, end, _ in batch]).to(device)
        y = torch.stack([ids[start + 1 : end + 1] for start, end, _ in batch]).to(device)
        logits, _ = model(x)
        nats = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").double()  # (B, T)
        scored = torch.stack([torch.arange(end - start) >= first_scored - start
                              for start, end, first_scored in batch]).to(device)
        yield TextScore(
            tokens=int(scored.sum()), nats=float(nats[scored].sum()),
            bytes=int(byte_lengths.to(device)[y][scored].sum()),
        )


@torch.no_grad()
def forced_logprobs(
    model: GPT, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
    window: str = "exact", valid_vocab: int | None = None,
) -> Iterator[torch.Tensor]:
    """Teacher forcing: yields, for t = 0, 1, ..., the (B, V) log-distribution of the
    model's raw next token after prompt b and continuation[b][:t].

    The rows run as one batch through the token loop's own `Context` (model/generate.py),
    so each distribution is computed with exactly the context a generated token at that
    place would have had (same window mode, same masking of vocabulary padding, a
    context longer than the model's read through the window). A continuation that has
    ended is fed token 0; its row is not meaningful after that. Every prompt needs at
    least one token.
    """
    steps = max((len(c) for c in continuations), default=0)
    if steps == 0:
        return
    context = Context(model, prompts, steps, window, valid_vocab)
    device = context.tokens.device
    for t in range(steps):
        yield F.log_softmax(context.next_logits(), dim=-1)
        context.append(torch.tensor([c[t] if t < len(c) else 0 for c in continuations], device=device))


def score_continuations(
    model: GPT, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
    window: str = "exact", valid_vocab: int | None = None,
) -> list[list[float]]:
    """log p(continuation[t] | prompt, continuation[:t]) under the model's raw distribution,
    for every token of every continuation (`forced_logprobs`): the comparison's human row
    is scored the way a generated sample's tokens are."""
    scores: list[list[float]] = [[] for _ in continuations]
    for t, logprobs in enumerate(forced_logprobs(model, prompts, continuations, window=window,
                                                 valid_vocab=valid_vocab)):
        for row, continuation in enumerate(continuations):
            if t < len(continuation):
                scores[row].append(logprobs[row, continuation[t]].item())
    return scores
