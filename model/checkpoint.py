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

import dataclasses
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
from model.pretrained import gpt2_config, is_gpt2_folder, load_gpt2
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
    """The model in eval mode on ``device``, its tokenizer, and the whole payload.

    ``path`` is a checkpoint file or a Hugging Face GPT-2 folder (model/pretrained.py);
    a folder's payload has its model config and tokenizer state, no training config
    (``config["train"]`` is empty: no dataset of its own) and no optimizer."""
    if is_gpt2_folder(path):
        model, tokenizer = load_gpt2(path, device=device)
        payload = {"config": {"model": dataclasses.asdict(model.config), "train": {}},
                   "tokenizer": tokenizer.state(), "optimizer": None, "source": "gpt2-folder"}
        return model, tokenizer, payload
    payload = load_checkpoint(path, map_location=device)
    return model_from_checkpoint(payload, device).eval(), tokenizer_from_state(payload["tokenizer"]), payload


def source_model_config(path: str | Path) -> ModelConfig:
    """The shape of the weights at ``path``: a GPT-2 folder or a checkpoint of this project."""
    if not Path(path).exists():
        raise UserError(f"{path} not found (expected a Hugging Face GPT-2 folder or a checkpoint file)")
    if is_gpt2_folder(path):
        return gpt2_config(path)
    return ModelConfig(**load_checkpoint(path)["config"]["model"])


def load_initial_weights(path: str | Path, block_size: int) -> tuple[GPT, dict[str, Any]]:
    """The model to fine-tune from (a GPT-2 folder or a checkpoint of this project), with
    its position table cropped to ``block_size``, and its tokenizer state."""
    if is_gpt2_folder(path):
        model, tokenizer = load_gpt2(path, block_size=block_size)
        return model.train(), tokenizer.state()
    payload = load_checkpoint(path)
    cfg = ModelConfig(**payload["config"]["model"])
    if block_size > cfg.block_size:
        raise UserError(f"block_size {block_size} exceeds the {cfg.block_size} positions of {path}")
    weights = payload["model"]
    if "wpe.weight" in weights:
        weights["wpe.weight"] = weights["wpe.weight"][:block_size]  # a shorter context keeps the first positions
    model = GPT(dataclasses.replace(cfg, block_size=block_size))
    model.load_state_dict(weights)
    return model, payload["tokenizer"]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
