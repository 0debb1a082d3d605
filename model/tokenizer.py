"""Tokenizers: text <-> token ids.

Four kinds, one interface (:class:`Tokenizer`):

    char              one token per distinct character of the training corpus
    bpe               byte-level BPE trained here (model/bpe_trainer.py), run by tiktoken
    gpt2:<folder>     GPT-2's byte-level BPE read from a Hugging Face folder's vocab.json
                      and merges.txt (:class:`GPT2Tokenizer`), run by tiktoken
    tiktoken:<name>   a named tiktoken encoding (gpt2, cl100k_base, ...)

Every tokenizer has one extra token, end-of-text (``eot_id``), that the data pipeline
puts between documents. ``encode`` of plain text never produces it: the characters
"<|endoftext|>" inside a text are ordinary text. ``decode(eot_id)`` gives EOT_TEXT.

A tokenizer's ``state()`` is a small dict of strings that goes into checkpoints and
meta.json; :func:`tokenizer_from_state` rebuilds the same tokenizer from it, so a
checkpoint samples on its own.

A trained BPE's ranks are learned by model/bpe_trainer.py (whose docstring says why
tiktoken encodes any text exactly as the trainer counted it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken.load

from model.bpe_trainer import BPE_MIN_VOCAB_SIZE, GPT2_SPLIT_PATTERN, train_bpe
from model.errors import UserError

EOT_TEXT = "<|endoftext|>"

# How many unknown characters an error message shows before "and N more".
_MAX_CHARS_SHOWN = 10


_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def _visible_chars(text: str) -> str:
    return "".join(_VISIBLE.get(c) or (f"\u27e8U+{ord(c):04X}\u27e9" if ord(c) < 32 or ord(c) == 127 else c)
                   for c in text)


class Tokenizer(ABC):
    """Maps text to token ids and back.

    Attributes:
        name: "char", "bpe" or "tiktoken:<encoding name>".
        vocab_size: number of token ids, end-of-text included; ids are in range(vocab_size).
        eot_id: the end-of-text token's id.
    """

    name: str
    vocab_size: int
    eot_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; never contains eot_id (a literal EOT_TEXT is plain text)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (plain ints); eot_id gives EOT_TEXT, invalid UTF-8 gives U+FFFD."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for (for eot_id, EOT_TEXT's bytes).

        A byte-level token can hold part of a character; a streaming printer joins the
        bytes of successive tokens and prints only complete characters.
        """

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Plain data (str/int/list/dict) from which tokenizer_from_state rebuilds this tokenizer."""

    def token_text(self, token_id: int) -> str:
        """A token as OpenAI's logprobs name it: its text, or ``bytes:\\xe2\\x80`` when its
        bytes are not whole UTF-8 characters (a character split across byte-level tokens).
        The end-of-text token is EOT_TEXT. Used by --logprobs files and the API alike."""
        data = self.token_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def display(self, token_id: int) -> str:
        """A token made visible, for the explain table and the explorer page: spaces as ␣,
        newlines as ↵, tabs as ⇥, carriage returns as ␍, other control characters as
        ⟨U+XXXX⟩, bytes that are only part of a character as ⟨hex bytes⟩, end-of-text as
        ⟨end of text⟩."""
        if token_id == self.eot_id:
            return "\u27e8end of text\u27e9"
        data, shown = self.token_bytes(token_id), ""
        while data:
            try:
                return shown + _visible_chars(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                shown += _visible_chars(data[: e.start].decode("utf-8"))
                shown += "\u27e8" + " ".join(f"{b:02x}" for b in data[e.start : e.end]) + "\u27e9"
                data = data[e.end :]
        return shown

    def unknown_characters(self, text: str) -> list[str]:
        """The distinct characters of ``text`` this tokenizer cannot encode, in order of
        first appearance. Byte-level tokenizers encode any text, so this default is []."""
        return []

    def check_encodable(self, text: str, what: str = "text") -> None:
        """Raise UserError naming the characters of ``text`` that cannot be encoded.

        ``what`` names the text in the message, e.g. "prompt".
        """
        unknown = self.unknown_characters(text)
        if unknown:
            raise UserError(self._unknown_characters_message(unknown, what))

    def _unknown_characters_message(self, unknown: list[str], what: str) -> str:
        shown = ", ".join(repr(c) for c in unknown[:_MAX_CHARS_SHOWN])
        hidden = len(unknown) - _MAX_CHARS_SHOWN
        more = f" and {hidden} more ({len(unknown)} distinct)" if hidden > 0 else ""
        return f"{what} has characters the {self.name} tokenizer never saw: {shown}{more}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    """One token per character: the sorted distinct characters of the corpus get ids
    0..n-1, end-of-text gets n, so vocab_size = n + 1. Text with a character outside the
    vocabulary cannot be encoded (encode raises UserError naming it)."""

    name = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise UserError("the char tokenizer needs at least one character: the corpus is empty")
        self.eot_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        self._id_of = {c: i for i, c in enumerate(self.chars)}
        # A dict, not a list, so that a negative id is an error instead of wrapping around.
        self._text_of = dict(enumerate([*self.chars, EOT_TEXT]))

    @classmethod
    def from_corpus(cls, chunks: Iterable[str]) -> CharTokenizer:
        """Build from text chunks, read once; memory grows only with the distinct characters."""
        seen: set[str] = set()
        for chunk in chunks:
            seen.update(chunk)
        return cls(seen)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._id_of[c] for c in text]
        except KeyError:
            message = self._unknown_characters_message(self.unknown_characters(text), "text")
            raise UserError(message) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._text_of[i] for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._text_of[token_id].encode("utf-8")

    def unknown_characters(self, text: str) -> list[str]:
        return [c for c in dict.fromkeys(text) if c not in self._id_of]

    def state(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


# ------------------------------------------------------------- tiktoken-backed


class _TiktokenBacked(Tokenizer):
    """Encode/decode through a tiktoken.Encoding whose special token EOT_TEXT is eot_id."""

    encoding: tiktoken.Encoding

    def encode(self, text: str) -> list[int]:
        # encode_ordinary never emits special tokens: "<|endoftext|>" in text is plain text.
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)


class BPETokenizer(_TiktokenBacked):
    """Byte-level BPE with the given ranks, run by tiktoken with GPT2_SPLIT_PATTERN.

    ``ranks`` maps each token's bytes to its rank (= its id): the ranks are exactly
    0..n-1 and include all 256 single bytes, so any text can be encoded; end-of-text is
    id n. Stored in tiktoken's rank-file format: one line "<base64 of bytes> <rank>" per
    token, in rank order.
    """

    name = "bpe"

    def __init__(self, ranks: dict[bytes, int]):
        _check_ranks(ranks)
        self.ranks = dict(ranks)
        self.eot_id = len(ranks)
        self.vocab_size = len(ranks) + 1
        self.encoding = tiktoken.Encoding(
            name="bpe",
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=self.ranks,
            special_tokens={EOT_TEXT: self.eot_id},
        )

    def rank_file_text(self) -> str:
        """The ranks in tiktoken's rank-file format."""
        by_rank = sorted(self.ranks.items(), key=lambda item: item[1])
        return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in by_rank)

    @classmethod
    def from_rank_file_text(cls, text: str, source: str = "BPE rank file") -> BPETokenizer:
        """Parse a rank file's text; ``source`` names it in error messages."""
        ranks: dict[bytes, int] = {}
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError
                ranks[base64.b64decode(fields[0], validate=True)] = int(fields[1])
            except (ValueError, binascii.Error):
                raise UserError(
                    f"{source}, line {line_number}: expected '<base64 token> <rank>', got {line!r}"
                ) from None
        _check_ranks(ranks, source)
        return cls(ranks)

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(self.rank_file_text(), encoding="ascii")

    def state(self) -> dict[str, Any]:
        return {"kind": "bpe", "ranks": self.rank_file_text()}

    def gpt2_files(self) -> tuple[str, str]:
        """The texts of vocab.json and merges.txt in a Hugging Face GPT-2 folder's format,
        which GPT2Tokenizer.from_files reads back into these ranks (and transformers'
        GPT2Tokenizer reads as the same tokenizer).

        vocab.json maps each token, its bytes spelled with GPT-2's byte symbols, to its id,
        and EOT_TEXT to eot_id. merges.txt lists, for the ids 256, 257, ... in order, the
        two tokens whose merge makes that id. The ranks do not store the pair: it is what
        BPE makes of the token's bytes with only the tokens ranked below it (those merges
        come first), which stops at two parts. A UserError when the ranks have no such
        form: a single byte ranked past 255, or a token that lower ranks do not build in
        two parts.
        """
        symbol = {byte: char for char, byte in _gpt2_byte_symbols().items()}

        def spelled(token: bytes) -> str:
            return "".join(symbol[b] for b in token)

        by_rank = sorted(self.ranks.items(), key=lambda item: item[1])
        if any(len(token) != 1 for token, _ in by_rank[:256]):
            raise UserError(f"the {self.name} tokenizer does not give ids 0-255 to the single bytes, as GPT-2's "
                            "vocab.json and merges.txt need")
        vocab = {spelled(token): rank for token, rank in by_rank}
        if EOT_TEXT in vocab:
            raise UserError(f"the {self.name} tokenizer has an ordinary token spelled {EOT_TEXT}, which GPT-2's "
                            "vocab.json keeps for end-of-text")
        vocab[EOT_TEXT] = self.eot_id
        merges = [" ".join(map(spelled, _last_merge(self.ranks, token, rank))) for token, rank in by_rank[256:]]
        return json.dumps(vocab, ensure_ascii=False), "\n".join(["#version: 0.2", *merges]) + "\n"


def _last_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The two tokens that BPE with the ranks below ``rank`` makes of ``token``'s bytes:
    repeatedly join the adjacent pair whose join ranks lowest, while that rank is below
    ``rank``, until two parts are left."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        joined = [ranks.get(first + second, rank) for first, second in zip(parts, parts[1:])]
        best = min(range(len(joined)), key=joined.__getitem__)
        if joined[best] >= rank:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise UserError(f"token {rank} ({token!r}) is not the merge of two tokens ranked below it: these BPE ranks "
                        "have no merges.txt")
    return parts[0], parts[1]


def _check_ranks(ranks: dict[bytes, int], source: str = "BPE ranks") -> None:
    """Raise UserError unless the ranks are 0..n-1 and include every single byte."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{source}: ranks must be 0..{len(ranks) - 1}, each once (found gaps or repeats)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(
            f"{source}: all 256 single bytes must be tokens; missing {len(missing)}, e.g. byte {missing[0]}"
        )


def _gpt2_byte_symbols() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte in vocab.json and merges.txt: the bytes
    of '!'..'~', '\xa1'..'\xac' and '\xae'..'\xff' stand for themselves; the other 68
    (space, controls, ...) get the characters 256, 257, ... in byte order (the
    bytes_to_unicode table of GPT-2's encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    symbols.update({chr(256 + n): b for n, b in enumerate(others)})
    return symbols


GPT2_VOCAB_FILE, GPT2_MERGES_FILE = "vocab.json", "merges.txt"


class GPT2Tokenizer(BPETokenizer):
    """GPT-2's own byte-level BPE (50,257 tokens, end-of-text 50256), run by tiktoken.

    Built from a Hugging Face GPT-2 folder's ``vocab.json`` (token -> id) and
    ``merges.txt`` (the merges in priority order), the same content as OpenAI's
    ``encoder.json`` and ``vocab.bpe`` under other names. A GPT-2 token's id is its
    merge rank: ids 0-255 are the single bytes (in GPT-2's order, not byte order) and
    id 256 + i is what merge i makes, so tiktoken runs GPT-2's BPE from these ranks.
    The split pattern is GPT-2's too (GPT2_SPLIT_PATTERN), so encodings equal
    tiktoken's own gpt2 encoding. The state carries the ranks: a checkpoint of a
    fine-tuned GPT-2 samples without the folder.
    """

    name = "gpt2"

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike[str], merges_path: str | os.PathLike[str]) -> GPT2Tokenizer:
        """Read and cross-check vocab.json and merges.txt; every problem is a one-line UserError."""
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        vocab = read_json_object(vocab_path, holds=" (token -> id)")
        symbols = _gpt2_byte_symbols()

        def to_bytes(token: str, source: Path) -> bytes:
            try:
                return bytes(symbols[c] for c in token)
            except KeyError as unknown:
                raise UserError(f"{source}: {token!r} has {unknown} that stands for no byte in GPT-2's "
                                "encoding") from None

        eot = vocab.pop(EOT_TEXT, None)
        ranks = {to_bytes(token, vocab_path): rank for token, rank in vocab.items()}
        if len(ranks) != len(vocab) or not all(isinstance(r, int) for r in ranks.values()):
            raise UserError(f"{vocab_path}: ids must be integers, one token each")
        _check_ranks(ranks, str(vocab_path))
        if eot != len(ranks):
            raise UserError(f"{vocab_path}: {EOT_TEXT} must have id {len(ranks)} (after the {len(ranks)} "
                            f"other tokens), found {eot}")
        token_at = {rank: token for token, rank in ranks.items()}
        merges = _read_merges(merges_path)
        if len(merges) != len(ranks) - 256:
            raise UserError(f"{merges_path} has {len(merges):,} merges but {vocab_path} has {len(ranks):,} tokens: "
                            f"{len(ranks) - 256:,} merges expected (the files are not from the same tokenizer)")
        for i, (first, second) in enumerate(merges):
            if to_bytes(first, merges_path) + to_bytes(second, merges_path) != token_at[256 + i]:
                raise UserError(f"{merges_path}, merge {i + 1} ({first} {second}) does not make token "
                                f"{256 + i} of {vocab_path}: the files are not from the same tokenizer")
        return cls(ranks)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> GPT2Tokenizer:
        folder = Path(folder)
        return cls.from_files(folder / GPT2_VOCAB_FILE, folder / GPT2_MERGES_FILE)

    def state(self) -> dict[str, Any]:
        return {"kind": "gpt2", "ranks": self.rank_file_text()}


def read_json_object(path: Path, holds: str = "") -> dict:
    """The JSON object in ``path``; a missing file, bad JSON or another kind of value is a
    UserError naming the file (``holds`` says what the object should map)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:  # json.loads of values nested thousands deep
        raise UserError(f"{path} nests its JSON too deeply to read") from None
    except ValueError as e:  # e.g. an integer over Python's 4,300-digit limit
        raise UserError(f"{path} is not usable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object{holds}")
    return data


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """The merges of merges.txt: one "first second" per line after the "#version" header."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte offset {e.start})") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if (number == 1 and line.startswith("#version")) or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{path}, line {number}: expected two tokens separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class TiktokenTokenizer(_TiktokenBacked):
    """A named tiktoken encoding (tiktoken.list_encoding_names()); eot is its <|endoftext|>.

    tiktoken downloads an encoding's files on first use and caches them. Offline, the
    constructor raises a UserError naming the URL and the exact cache path to put the
    file at.
    """

    def __init__(self, encoding_name: str):
        known = tiktoken.list_encoding_names()
        if encoding_name not in known:
            raise UserError(f"unknown tiktoken encoding {encoding_name!r}; known: {', '.join(known)}")
        try:
            self.encoding = tiktoken.get_encoding(encoding_name)
        except Exception as exc:  # network, HTTP, hash or import errors: all mean "file not available"
            raise UserError(_fetch_failure_message(encoding_name, exc)) from exc
        self.encoding_name = encoding_name
        self.name = f"tiktoken:{encoding_name}"
        self.eot_id = self.encoding.eot_token
        self.vocab_size = self.encoding.n_vocab

    def state(self) -> dict[str, Any]:
        return {"kind": "tiktoken", "encoding": self.encoding_name}


def _url_being_fetched(exc: BaseException) -> str | None:
    """The URL tiktoken was reading when ``exc`` was raised, if it was in read_file_cached.

    tiktoken's exceptions do not all name the full URL (requests' ConnectionError names
    only the host and path), but the URL is read_file_cached's first argument.
    """
    code = tiktoken.load.read_file_cached.__code__
    traceback = exc.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code is code:
            url = frame.f_locals.get(code.co_varnames[0])
            return url if isinstance(url, str) else None
        traceback = traceback.tb_next
    return None


def _tiktoken_cache_dir() -> str:
    """Where tiktoken looks for cached files (the rule of tiktoken/load.py read_file_cached);
    "" means caching is off."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _fetch_failure_message(encoding_name: str, exc: BaseException) -> str:
    # A short message (a hash mismatch, an HTTP status) helps; a long one (a chain of
    # connection errors) would bury the way out, so only its type is shown.
    text = " ".join(str(exc).split())
    reason = f"{type(exc).__name__}: {text}" if len(text) <= 100 else type(exc).__name__
    url = _url_being_fetched(exc)
    if url is None:
        return f"tiktoken could not load encoding {encoding_name!r} ({reason})"
    cache_dir = _tiktoken_cache_dir()
    file_name = hashlib.sha1(url.encode()).hexdigest()  # how tiktoken names a cached file
    place = (
        f"save it as {os.path.join(cache_dir, file_name)}"
        if cache_dir
        else f"set TIKTOKEN_CACHE_DIR to a folder and save it there as {file_name}"
    )
    return (
        f"tiktoken could not download {url} for encoding {encoding_name!r} ({reason}); "
        f"to work offline, download that file elsewhere and {place}, then run again "
        f"(if the encoding needs another file, the next error names it)"
    )


# --------------------------------------------------------------------- factories


def fit_tokenizer(
    spec: str,
    chunks: Callable[[], Iterable[str]],
    vocab_size: int | None,
    progress: bool = False,
) -> Tokenizer:
    """Build the tokenizer ``spec`` names: "char", "bpe", "gpt2:<folder>" or "tiktoken:<encoding name>".

    ``chunks()`` returns a fresh iterable over the corpus text; char and bpe read it
    once, tiktoken not at all. ``vocab_size`` is required for bpe (at least
    BPE_MIN_VOCAB_SIZE; training may stop with fewer tokens, see train_bpe) and ignored
    by char and tiktoken, whose vocabularies are fixed by the corpus or the encoding.
    """
    if spec == "char":
        return CharTokenizer.from_corpus(chunks())
    if spec == "bpe":
        if vocab_size is None:
            raise UserError(f"the bpe tokenizer needs a vocab_size (at least {BPE_MIN_VOCAB_SIZE})")
        return BPETokenizer(train_bpe(chunks(), vocab_size, progress=progress))
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec.removeprefix("tiktoken:"))
    if spec.startswith("gpt2:"):
        return GPT2Tokenizer.from_folder(spec.removeprefix("gpt2:"))
    names = ", ".join(tiktoken.list_encoding_names())
    raise UserError(
        f"unknown tokenizer {spec!r}; use 'char', 'bpe', 'gpt2:<folder with vocab.json and merges.txt>' or "
        f"'tiktoken:<name>' with <name> one of {names}"
    )


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """The tokenizer whose ``state()`` is ``state`` (encodes every text the same way)."""
    kind = state.get("kind")
    try:
        if kind == "char":
            return CharTokenizer(state["chars"])
        if kind == "bpe":
            return BPETokenizer.from_rank_file_text(state["ranks"], source="saved BPE ranks")
        if kind == "tiktoken":
            return TiktokenTokenizer(state["encoding"])
        if kind == "gpt2":
            return GPT2Tokenizer.from_rank_file_text(state["ranks"], source="saved GPT-2 ranks")
    except KeyError as missing:
        raise UserError(f"saved {kind} tokenizer state lacks {missing}") from None
    raise UserError(f"saved tokenizer state has unknown kind {kind!r}; expected 'char', 'bpe', 'gpt2' or 'tiktoken'")
