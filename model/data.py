"""The on-disk token format, defined once: written by data/prepare.py, read by train.py.

A prepared dataset is a folder holding

    train.bin, val.bin   the token ids of each split, back to back, little-endian
                         uint16 when the vocabulary fits in 16 bits, else uint32
    meta.json            tokenizer state, vocab size, dtype, token counts, source, split

The splits are read through ``numpy.memmap``, so a corpus larger than memory trains
without ever being loaded whole; a batch copies only the rows it samples.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from model.errors import UserError

META_FILE = "meta.json"
META_FORMAT = "tinygpt-tokens"
META_VERSION = 1
META_REQUIRED = ("tokenizer", "vocab_size", "eot_id", "dtype", "tokens")  # what readers of a dataset use
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id: uint16 up to 65,536 tokens."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32).newbyteorder("<")


def split_file(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.bin"


class TokenWriter:
    """Appends token ids to one split file; counts what it wrote."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = path
        self.dtype = dtype
        self.count = 0
        self._file = open(path, "wb")

    def write(self, ids: Iterable[int]) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        array.tofile(self._file)
        self.count += array.size

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dataset_meta(tokenizer, dtype: np.dtype, tokens: dict[str, int], **about: Any) -> dict[str, Any]:
    """The meta.json of a dataset encoded by ``tokenizer`` (a model.tokenizer.Tokenizer) with
    ``tokens[split]`` ids per split; ``about`` adds descriptive fields (source, split rule)."""
    return {
        "format": META_FORMAT, "version": META_VERSION, "tokenizer": tokenizer.state(),
        "tokenizer_name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
        "dtype": dtype.str, "tokens": dict(tokens), **about,
    }


def write_meta(data_dir: str | Path, meta: dict[str, Any]) -> None:
    path = Path(data_dir) / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"no prepared dataset in {data_dir} ({META_FILE} is missing); run data/prepare.py first")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise UserError(f"{path} was not written by data/prepare.py; prepare the dataset again")
    missing = [key for key in META_REQUIRED if key not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; prepare the dataset again")
    return meta


def open_split(data_dir: str | Path, split: str, meta: dict[str, Any]) -> np.memmap:
    """Memory-map one split's token ids (read-only)."""
    path = split_file(data_dir, split)
    if not path.is_file():
        raise UserError(f"{path} is missing; prepare the dataset again")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise UserError(f"{path} is damaged: {size} bytes is not a whole number of {dtype.itemsize}-byte "
                        "tokens; prepare the dataset again")
    if size == 0:
        return np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


def check_split_length(tokens: np.ndarray, block_size: int, split: str) -> None:
    """A training example needs block_size inputs plus one more token as the last target."""
    if len(tokens) < block_size + 1:
        raise UserError(
            f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "use a bigger corpus or a smaller model.block_size"
        )


def check_batch_fits(tokens: np.ndarray, batch_size: int, block_size: int, split: str) -> None:
    """A batch of distinct windows needs batch_size * block_size tokens plus the last target."""
    needed = batch_size * block_size + 1
    if len(tokens) < needed:
        raise UserError(
            f"the {split} split has {len(tokens)} tokens, fewer than one batch: batch_size x block_size + 1 "
            f"= {batch_size} x {block_size} + 1 = {needed}; use a bigger corpus or a smaller batch_size or block_size"
        )


def sample_starts(num_tokens: int, block_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random window starts, uniform over 0 .. num_tokens - block_size - 1 (int64, CPU)."""
    return torch.randint(num_tokens - block_size, (count,), generator=generator)


def read_windows(tokens: np.ndarray, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows at ``starts`` as inputs x and targets y, int64 CPU tensors (len(starts), block_size),
    with y[b, t] == x[b, t + 1] for t < block_size - 1: the model predicts each next token.
    Only these rows are read from the (memory-mapped) token array."""
    rows = np.stack([tokens[s : s + block_size + 1] for s in starts.tolist()]).astype(np.int64)
    window = torch.from_numpy(rows)
    return window[:, :-1], window[:, 1:]


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Move a batch to the device. On CUDA the rows are first copied to pinned (page-locked)
    memory, from which the copy to the GPU runs asynchronously while the CPU goes on."""
    if device.type != "cuda":
        return tuple(t.to(device) for t in batch)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
