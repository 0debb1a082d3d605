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
over the old one: an interrupted save (or a full disk) leaves the previous checkpoint
whole. Loading uses ``torch.load(weights_only=True)``, which refuses to run code hidden
in a file, then checks the payload once (every part present, the config valid and
matching the weights' names and shapes, the weights finite), so that every reader can
rely on it and a bad file is one line naming what is wrong.
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

from model.config import Config, ModelConfig, config_from_dict
from model.errors import UserError
from model.gpt import GPT
from model.pretrained import gpt2_config, is_gpt2_folder, load_gpt2
from model.tokenizer import Tokenizer, tokenizer_from_state

FORMAT = "tinygpt-checkpoint"
VERSION = 1
COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before every parameter name
PARTS = ("model", "optimizer", "config", "tokenizer", "step", "best_val_loss", "extra")


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
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a failed write as a RuntimeError
        Path(tmp_name).unlink(missing_ok=True)
        raise _save_failed(path, error) from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _save_failed(path: Path, error: BaseException) -> UserError:
    """One line for a save that could not be written (a full disk, usually); the file it
    was to replace is untouched, which the message says."""
    free = shutil.disk_usage(path.parent).free
    kept = f"; the previous {path.name} is kept" if path.exists() else ""
    return UserError(f"could not save {path} ({_first_line(error)}; {free / 2**20:.1f} MiB free there){kept}")


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
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _save_failed(target, error) from None
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
    check_payload(payload, path)
    return payload


def check_payload(payload: dict[str, Any], path: str | Path) -> None:
    """Everything a reader of a checkpoint relies on, checked once, each failure a
    UserError naming the file and what is wrong."""
    missing = [part for part in PARTS if part not in payload]
    if missing:
        raise UserError(f"{path} is not a whole checkpoint: it lacks {', '.join(missing)}")
    tokenizer = payload["tokenizer"]
    if not isinstance(tokenizer, dict) or "kind" not in tokenizer:
        raise UserError(f"{path} has no tokenizer state (its tokenizer is {_short(tokenizer)})")
    config = checkpoint_config(payload, path)
    weights = payload["model"]
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise UserError(f"{path}: its model is not a state_dict of tensors")
    _check_weights_match(weights, config, path)
    not_finite = next((name for name, t in weights.items() if t.is_floating_point() and not t.isfinite().all()), None)
    if not_finite is not None:
        raise UserError(f"{path} has NaN or infinite weights (in {not_finite} and maybe more); "
                        "use an earlier checkpoint")
    if not isinstance(payload["step"], int) or payload["step"] < 0:
        raise UserError(f"{path}: step must be a whole number >= 0, got {_short(payload['step'])}")
    if not isinstance(payload["optimizer"], (dict, type(None))) or not isinstance(payload["extra"], dict):
        raise UserError(f"{path}: its optimizer state or extra is not a dict")


def checkpoint_config(payload: dict[str, Any], path: str | Path) -> Config:
    """The checkpoint's config, validated like a config file (an unknown key, a bad value)."""
    tables = payload["config"]
    if not isinstance(tables, dict) or not all(isinstance(table, dict) for table in tables.values()):
        raise UserError(f"{path}: its config is not a {{'model': {{...}}, 'train': {{...}}}} table")
    return config_from_dict({name: dict(table) for name, table in tables.items()}, source=f"{path} config")


def _check_weights_match(weights: dict[str, torch.Tensor], config: Config, path: str | Path) -> None:
    """The weights have exactly the names and shapes of the network the config describes
    (built on the meta device: shapes only, no memory, no initialisation)."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GPT(config.model).state_dict().items()}
    problems = [f"missing {name}" for name in expected if name not in weights]
    problems += [f"unexpected {name}" for name in weights if name not in expected]
    problems += [
        f"{name} is {tuple(weights[name].shape)}, the config needs {shape}"
        for name, shape in expected.items() if name in weights and tuple(weights[name].shape) != shape
    ]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise UserError(f"{path}: its config does not match its weights ({'; '.join(problems[:3])}{more})")


def model_from_checkpoint(payload: dict[str, Any], device: str | torch.device = "cpu") -> GPT:
    """Rebuild the network a (loaded, so checked) checkpoint was saved from, with its weights."""
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
    tokenizer = tokenizer_from_state(payload["tokenizer"])
    vocab = payload["config"]["model"]["vocab_size"]
    if tokenizer.vocab_size > vocab:
        raise UserError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab}")
    return model_from_checkpoint(payload, device).eval(), tokenizer, payload


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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
