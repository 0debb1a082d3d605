"""The checkpoint format, defined once.

One file holds everything needed to sample from a model or to go on training it:

    format, version     marks the file as ours
    model               the weights (state_dict, never with torch.compile's prefix)
    optimizer           the optimiser's state_dict (None in an export for sampling)
    config              the run's Config as plain dicts ({"model": ..., "train": ...})
    tokenizer           the tokenizer's state, so a checkpoint samples on its own
    step, best_val_loss where training stood
    extra               anything else the trainer keeps (train.py: the gradient scaler,
                        the training seconds spent, where the LR schedule stands)

Saving writes a temporary file in the same folder, flushes it to disk, then renames it
over the old one: an interrupted save leaves the previous checkpoint whole. Loading
uses ``torch.load(weights_only=True)``, which refuses to run code hidden in a file.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig
from model.errors import UserError
from model.gpt import GPT
from model.tokenizer import Tokenizer, tokenizer_from_state

FORMAT = "tinygpt-checkpoint"
VERSION = 1
COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before every parameter name


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop torch.compile's prefix so the weights load into a plain model."""
    return {k.removeprefix(COMPILED_PREFIX): v for k, v in state.items()}


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    best_val_loss: float = float("inf"),
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": clean_state_dict(model.state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": config,
        "tokenizer": tokenizer,
        "step": step,
        "best_val_loss": best_val_loss,
        "extra": extra or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def copy_checkpoint(source: str | Path, target: str | Path) -> None:
    """Make ``target`` a copy of the checkpoint ``source``, atomically: a hard link where the
    file system has them (no second write of a large file), else a byte copy; either way
    under a temporary name first, then renamed over ``target``."""
    source, target = Path(source), Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files of saves that never finished (a process killed mid-save
    leaves one; the checkpoint it was replacing is intact). Call it only while no save
    runs in ``directory``. Returns what was removed."""
    stale = sorted(Path(directory).glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; every failure is a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about odd files; the error below says it all
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise UserError(f"cannot read checkpoint {path}: permission denied") from None
    except pickle.UnpicklingError as e:  # weights_only refused an object, or no pickle at all
        raise UserError(f"{path} is not a tinygpt checkpoint ({_first_line(e)})") from None
    except Exception as e:  # reading arbitrary bytes fails in many ways (zip, EOF, OS, key errors)
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a tinygpt checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise UserError(f"{path} has checkpoint version {payload.get('version')}; this code reads version {VERSION}")
    payload["model"] = clean_state_dict(payload["model"])
    return payload


def model_from_checkpoint(payload: dict[str, Any], device: str | torch.device = "cpu") -> GPT:
    """Rebuild the network a checkpoint was saved from and load its weights."""
    model = GPT(ModelConfig(**payload["config"]["model"]))
    model.load_state_dict(payload["model"])
    return model.to(device)


def load_for_generation(path: str | Path, device: torch.device) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The model in eval mode on ``device``, its tokenizer, and the whole payload."""
    payload = load_checkpoint(path, map_location=device)
    return model_from_checkpoint(payload, device).eval(), tokenizer_from_state(payload["tokenizer"]), payload


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
