"""Where text comes from, read as a stream: the default corpus, or files the user names.

A corpus is a list of documents (one per file, or one per topic of the default
corpus). They are read in chunks of about a megabyte that end at a line break, so a
corpus of any size passes through in bounded memory, and a tokenizer never sees a
word cut in two by a chunk boundary.

The validation split is the end of the corpus: the text after the first line break at
or after ``1 - val_fraction`` of its bytes (from that byte itself when no text follows
such a line break, as in a one-line file). Splitting by text rather than by tokens
gives the same split to every tokenizer.
"""

from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from model.errors import UserError

CHUNK_BYTES = 1 << 20
DEFAULT_CORPUS_NAME = "pydoc"


@dataclass(frozen=True)
class Document:
    """One unit of text; an end-of-text token follows each document in the token files."""

    name: str
    size: int  # bytes
    open: Callable[[], BinaryIO]


@dataclass(frozen=True)
class Piece:
    """A decoded chunk of text, the split it belongs to, and whether it ends its document."""

    split: str  # "train" or "val"
    text: str
    ends_document: bool


def default_corpus() -> list[Document]:
    """Python's documentation topics, shipped with every Python (about 465 KB of English)."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        data = topics[key].encode("utf-8")
        docs.append(Document(f"pydoc_data.topics[{key!r}]", len(data), lambda data=data: io.BytesIO(data)))
    return docs


def find_documents(inputs: list[str]) -> list[Document]:
    """Files named directly, every file under a directory (recursively, skipping hidden
    ones), or the files a glob pattern matches; each in sorted order, without repeats."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            paths.append(path)
        elif path.is_dir():
            found = sorted(_folder_files(path))
            if not found:
                raise UserError(f"directory {item} has no files")
            paths.extend(found)
        elif glob.has_magic(item):
            found = sorted(_glob_files(item))
            if not found:
                raise UserError(f"no files match {item!r}")
            paths.extend(found)
        else:
            raise UserError(f"corpus not found: {item} (not a file, a directory or a glob pattern)")
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return [Document(str(p), p.stat().st_size, lambda p=p: p.open("rb")) for p in unique]


def _folder_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` outside hidden folders and not hidden itself. os.walk,
    not Path.rglob, because rglob skips a subfolder it cannot read without a word; like
    rglob, it does not descend into symlinked folders."""
    for root, folders, files in os.walk(folder, onerror=_unreadable):
        folders[:] = [name for name in folders if not name.startswith(".")]  # prune: hidden folders are skipped
        for name in files:
            path = Path(root, name)
            if not name.startswith(".") and path.is_file():
                yield path


def _unreadable(error: OSError) -> None:
    raise UserError(f"cannot read folder {error.filename} ({error.strerror or error}); "
                    "make it readable or leave it out")


def _glob_files(pattern: str) -> list[Path]:
    """The files a glob pattern matches (``**``: any depth of folders), skipping hidden
    ones. pathlib's glob does not descend into symlinked folders, so a symlink loop
    cannot make it run forever (the glob module's recursive glob follows them)."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:fixed]) if fixed else Path()
    return [
        path for path in root.glob(str(Path(*parts[fixed:])))
        if path.is_file() and not _is_hidden(path.relative_to(root))
    ]


def corpus_name(inputs: list[str]) -> str:
    """A folder name for the prepared data: the default corpus's, or the single input's stem."""
    if not inputs:
        return DEFAULT_CORPUS_NAME
    if len(inputs) == 1 and not glob.has_magic(inputs[0]):
        return Path(inputs[0]).resolve().stem or "corpus"
    return "corpus"


def check_not_empty(docs: list[Document], inputs: list[str]) -> int:
    """Total size in bytes; an empty corpus is an error, not an empty dataset."""
    total = sum(doc.size for doc in docs)
    if total == 0:
        raise UserError(f"the corpus is empty: {', '.join(inputs) or 'default corpus'} holds no text")
    return total


def iter_pieces(docs: list[Document], val_fraction: float, errors: str = "strict") -> Iterator[Piece]:
    """Decode the corpus chunk by chunk and tag each piece with its split.

    ``errors`` is "strict" (a byte that is not UTF-8 stops with the file and the byte
    offset) or "replace" (it becomes U+FFFD and reading goes on). Empty documents
    yield nothing.
    """
    split_at = int(sum(doc.size for doc in docs) * (1.0 - val_fraction))
    position = 0  # corpus bytes before the current chunk
    for doc_index, doc in enumerate(docs):
        offset = 0  # document bytes before the current part
        for raw, last_chunk in _mark_last(_line_chunks(doc)):
            ends_corpus = last_chunk and doc_index == len(docs) - 1
            parts = _split_parts(raw, split_at - position, ends_corpus)
            for index, (data, split) in enumerate(parts):
                text = _decode(data, doc.name, offset, errors)
                yield Piece(split, text, ends_document=last_chunk and index == len(parts) - 1)
                offset += len(data)
            position += len(raw)


def _split_parts(raw: bytes, split_offset: int, ends_corpus: bool) -> list[tuple[bytes, str]]:
    """The non-empty parts of a chunk with their split; ``split_offset`` is where the
    split point falls relative to the chunk's start."""
    if split_offset >= len(raw):
        return [(raw, "train")]
    if split_offset < 0:
        return [(raw, "val")]
    cut = _cut_point(raw, split_offset)
    if cut == len(raw) and ends_corpus:  # only the corpus's final line break follows the split point
        cut = _char_boundary(raw, split_offset)
    return [(data, split) for data, split in ((raw[:cut], "train"), (raw[cut:], "val")) if data]


def _mark_last(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Pair each chunk with whether it is the last, looking one chunk ahead."""
    previous = None
    for chunk in chunks:
        if previous is not None:
            yield previous, False
        previous = chunk
    if previous is not None:
        yield previous, True


def _line_chunks(doc: Document) -> Iterator[bytes]:
    """Chunks of about CHUNK_BYTES that end just after a line break (or at a UTF-8
    character boundary when a line is longer than a chunk)."""
    with doc.open() as f:
        carry = b""
        while True:
            block = f.read(CHUNK_BYTES)
            if not block:
                if carry:
                    yield carry
                return
            data = carry + block
            end = data.rfind(b"\n") + 1 or _complete_prefix(data) or len(data)
            yield data[:end]
            carry = data[end:]


def _cut_point(data: bytes, at: int) -> int:
    """Where val begins inside a chunk: after the first line break at or after ``at``,
    else at ``at`` itself moved to a character boundary."""
    newline = data.find(b"\n", at)
    if newline != -1:
        return newline + 1
    return _char_boundary(data, at)


def _complete_prefix(data: bytes) -> int:
    """Length of the longest prefix that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # ASCII or the lead byte of a multi-byte character
            length = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= length else len(data) - back
    return len(data)  # no lead byte in sight: not UTF-8, and decoding will say where


def _char_boundary(data: bytes, at: int) -> int:
    """The largest index <= at that does not fall inside a UTF-8 multi-byte character."""
    for i in range(at, max(at - 4, -1), -1):
        if data[i] & 0xC0 != 0x80:  # not a continuation byte: a character starts here
            return i
    return at


def _decode(data: bytes, name: str, offset: int, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{name}: not UTF-8 at byte offset {offset + e.start} (byte 0x{data[e.start]:02x}); "
            "pass --encoding-errors replace to replace such bytes and go on"
        ) from None


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def iter_texts(docs: list[Document], val_fraction: float, errors: str, split: str | None = None) -> Iterator[str]:
    """Just the text of the pieces (of one split, or all), for fitting a tokenizer."""
    for piece in iter_pieces(docs, val_fraction, errors):
        if split is None or piece.split == split:
            yield piece.text

