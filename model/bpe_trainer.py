"""Training a byte-level BPE: the ranks that `model.tokenizer.BPETokenizer` runs.

A trained BPE is stored the way tiktoken stores its own: ``ranks: dict[bytes, int]``,
the 256 single bytes (rank = byte value), then each learned token in the order learned.
tiktoken encodes a pre-tokenised piece by looking it up whole (a piece that is a token
becomes that token), else by repeatedly merging the adjacent pair whose concatenated
bytes have the lowest rank, leftmost first. So tiktoken names a merge by the bytes it
makes, not by the pair that made them, and train_bpe counts pairs by their bytes too.

train_bpe applies merges one rank at a time: merge, left to right, every adjacent pair
that spells token 256, then 257, and so on. With learned ranks this is exactly what
tiktoken does, on any text:

1. Within a piece, merges never cross a boundary that the final tokens respect, so the
   tokens covering a span depend only on the span's bytes. Hence a token learned from
   neighbours P, Q is encoded, with the earlier ranks only, as exactly P, Q.
2. So no merge can make two neighbours spell an earlier token T: before that, T's span
   would have been encoded as P, Q and merged into T. The ranks tiktoken merges within
   a piece only go up, which is rank-at-a-time order, and a piece that is a token as a
   whole is built by the merges as well.
3. So a new token's bytes are never in the vocabulary already (neighbours spelling a
   token would have been merged): tiktoken's rule that token bytes are unique holds and
   no merge ever has to be skipped. And tiktoken encodes the training text exactly as
   the trainer counted it.

Rank files made another way (by hand, or by a trainer that names merges by pairs) may
lack property 1; then tiktoken and the rank-at-a-time reading can disagree
(tests/test_tokenizer.py shows such a file).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise

import regex
from tqdm import tqdm

from model.errors import UserError

# GPT-2's pre-tokenisation: contractions, an optional space plus a run of letters, of
# digits or of other symbols, and whitespace (a space before a word stays with the word).
# GPT-2 published it as
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# This form splits every text identically (tests/test_tokenizer.py checks it) and is
# faster: possessive quantifiers (++) never backtrack. It is also the form tiktoken's
# gpt2 encoding uses.
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
_SPLIT = regex.compile(GPT2_SPLIT_PATTERN)

# 256 single bytes + end-of-text + at least one learned merge.
BPE_MIN_VOCAB_SIZE = 258

def count_pieces(chunks: Iterable[str]) -> Counter[str]:
    """How often each GPT2_SPLIT_PATTERN piece occurs in the concatenated chunks.

    The chunks are read one at a time; memory grows with the distinct pieces. The
    result is the same as splitting the whole text at once: the last two pieces of a
    chunk may continue into the next one (a word cut in half, or "'l" + "l..." that is
    the contraction "'ll"), so they are split again together with the next chunk.
    """
    counts: Counter[str] = Counter()
    tail = ""
    for chunk in chunks:
        pieces = _SPLIT.findall(tail + chunk)
        tail = "".join(pieces[-2:])
        counts.update(pieces[:-2])
    counts.update(_SPLIT.findall(tail))
    return counts


def train_bpe(chunks: Iterable[str], vocab_size: int, *, progress: bool = False) -> dict[bytes, int]:
    """Learn byte-level BPE ranks from text chunks (read once).

    The text is split into pieces by GPT2_SPLIT_PATTERN and each distinct piece is kept
    once with its count. Starting from the 256 single bytes, each step adds one token:
    the concatenation of the adjacent token pair that occurs most often, counting each
    occurrence inside a piece as many times as the piece occurs. Ties go to the pair
    whose concatenated bytes sort first. Every adjacent pair that spells the new token
    is then merged (left to right within a piece), which gives each piece the tokens
    tiktoken will give it (module docstring), and the next counts see those.

    Training stops after ``vocab_size - 257`` merges (256 bytes and end-of-text take the
    other ids), or earlier, with fewer tokens, when no pair occurs at least twice: a pair
    seen once would only memorise the corpus. Returns ranks for BPETokenizer: the bytes
    at ranks 0..255, then the learned tokens in the order they were learned.

    Speed: pair counts are updated incrementally, only for the pieces that contain the
    merged pair (an index maps each pair to those pieces), and the most frequent pair
    comes from a max-heap whose outdated entries are skipped when popped.
    """
    if vocab_size < BPE_MIN_VOCAB_SIZE:
        raise UserError(
            f"BPE vocab_size must be at least {BPE_MIN_VOCAB_SIZE} "
            f"(256 bytes + end-of-text + 1 merge), got {vocab_size}"
        )
    trainer = _BPETrainer(count_pieces(chunks))
    n_merges = vocab_size - 257
    with tqdm(total=n_merges, desc="training BPE", unit="merge", disable=not progress) as bar:
        for _ in range(n_merges):
            if not trainer.merge_most_frequent():
                break
            bar.update()
    return {token: rank for rank, token in enumerate(trainer.token_bytes)}


class _BPETrainer:
    """The state of BPE training: the distinct pieces, their current tokens, pair counts.

    A "pair" is keyed by the concatenated bytes of two adjacent tokens, because that is
    what identifies a merge for tiktoken.
    """

    def __init__(self, piece_counts: Counter[str]):
        self.token_bytes = [bytes([b]) for b in range(256)]  # index = token id = rank
        self.vocabulary = set(self.token_bytes)
        self.piece_weight = list(piece_counts.values())
        # A byte's token id is its value, so a piece starts as the list of its bytes.
        self.piece_tokens = [list(piece.encode("utf-8")) for piece in piece_counts]
        self.pair_count: dict[bytes, int] = Counter()
        self.pieces_with: dict[bytes, set[int]] = {}  # pair -> pieces that had it (a superset)
        for i, tokens in enumerate(self.piece_tokens):
            self._add_pairs(i, self._pairs(tokens))
        self.heap = [(-count, pair) for pair, count in self.pair_count.items()]
        heapq.heapify(self.heap)

    def _pairs(self, tokens: list[int]) -> list[bytes]:
        token_bytes = self.token_bytes
        return [token_bytes[a] + token_bytes[b] for a, b in pairwise(tokens)]

    def _add_pairs(self, piece: int, pairs: list[bytes]) -> None:
        weight = self.piece_weight[piece]
        for pair in pairs:
            self.pair_count[pair] += weight
            self.pieces_with.setdefault(pair, set()).add(piece)

    def _remove_pairs(self, piece: int, pairs: list[bytes]) -> None:
        weight = self.piece_weight[piece]
        for pair in pairs:
            self.pair_count[pair] -= weight

    def _pop_most_frequent(self) -> tuple[bytes, int] | None:
        """The most frequent pair and its count; None when there are no pairs left.

        Heap entries are (-count, pair) so the smallest entry is the most frequent pair
        and, among equal counts, the one with the smallest bytes. An entry is outdated
        when the pair's count changed after it was pushed; each change pushed a fresh one.
        """
        while self.heap:
            negative_count, pair = heapq.heappop(self.heap)
            if self.pair_count.get(pair) == -negative_count:
                return pair, -negative_count
        return None

    def merge_most_frequent(self) -> bool:
        """Learn one token; False (and nothing learned) when no pair occurs twice."""
        best = self._pop_most_frequent()
        if best is None or best[1] < 2:
            return False
        new_bytes = best[0]
        assert new_bytes not in self.vocabulary, "a learned token is always new (module docstring)"
        new_id = len(self.token_bytes)
        self.token_bytes.append(new_bytes)
        self.vocabulary.add(new_bytes)

        changed: set[bytes] = set()
        for piece in self.pieces_with.pop(new_bytes):
            old = self.piece_tokens[piece]
            new = self._merge(old, new_bytes, new_id)
            if new is old:
                continue  # the index is a superset: this piece lost the pair earlier
            self.piece_tokens[piece] = new
            old_pairs, new_pairs = self._pairs(old), self._pairs(new)
            self._remove_pairs(piece, old_pairs)
            self._add_pairs(piece, new_pairs)
            changed.update(old_pairs)
            changed.update(new_pairs)
        for pair in changed:
            count = self.pair_count[pair]
            if count > 0:
                heapq.heappush(self.heap, (-count, pair))
            else:
                del self.pair_count[pair]
                self.pieces_with.pop(pair, None)
        return True

    def _merge(self, tokens: list[int], new_bytes: bytes, new_id: int) -> list[int]:
        """``tokens`` with every adjacent pair that spells ``new_bytes`` replaced by
        ``new_id``, left to right ("aaa" with "aa" gives "aa", "a"), as tiktoken does; the
        same list object when there is none."""
        token_bytes = self.token_bytes
        merged: list[int] = []
        i = 0
        while i < len(tokens):
            if i + 1 < len(tokens) and token_bytes[tokens[i]] + token_bytes[tokens[i + 1]] == new_bytes:
                merged.append(new_id)
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        return tokens if len(merged) == len(tokens) else merged
