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
in a file, then checks the payload once (every part present and of its type, the config
valid and matching the weights' names and shapes, the weights finite) into a typed
``Checkpoint``, so that every reader can rely on it and a bad file is one line naming
what is wrong.

Fine-tuning (train.init_from) starts from the weights of a checkpoint or a GPT-2 folder;
the rules for the shape it fixes and the tokenizer it needs live here too.
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

from model.config import Config, ModelConfig, config_differences, config_from_dict
from model.errors import UserError
from model.gpt import GPT
from model.memory import check_model_memory
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
    fsync_path(path.parent)


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
    fsync_path(target.parent)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files of saves that never finished (a process killed mid-save
    leaves one; the checkpoint it was replacing is intact). Call it only while no save
    runs in ``directory``. Returns what was removed."""
    stale = sorted(Path(directory).glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (which makes a rename into it durable), to disk;
    a no-op where the path cannot be opened (folders on some systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file, checked and typed: what every reader of one works with."""

    path: Path
    config: Config  # validated like a config file
    weights: dict[str, torch.Tensor]  # finite, with the names and shapes config.model needs
    tokenizer: dict[str, Any]  # a tokenizer state (model/tokenizer.py)
    optimizer: dict[str, Any] | None  # None in an export for sampling
    step: int
    best_val_loss: float  # infinity before the first evaluation
    extra: dict[str, Any]

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: str | Path) -> Checkpoint:
        """Check a loaded payload once; each problem is a UserError naming the file and what is wrong."""
        missing = [part for part in PARTS if part not in payload]
        if missing:
            raise UserError(f"{path} is not a whole checkpoint: it lacks {', '.join(missing)}")
        tokenizer = payload["tokenizer"]
        if not isinstance(tokenizer, dict) or "kind" not in tokenizer:
            raise UserError(f"{path} has no tokenizer state (its tokenizer is {_short(tokenizer)})")
        config = checkpoint_config(payload, path)
        weights = payload["model"]
        _check_weights(weights, config, path)
        step, best = payload["step"], payload["best_val_loss"]
        if not _is_int(step) or step < 0:
            raise UserError(f"{path}: step must be a whole number >= 0, got {_short(step)}")
        if not (_is_int(best) or isinstance(best, float)):
            raise UserError(f"{path}: best_val_loss must be a number, got {_short(best)}")
        if not isinstance(payload["optimizer"], (dict, type(None))) or not isinstance(payload["extra"], dict):
            raise UserError(f"{path}: its optimizer state or extra is not a dict")
        return cls(Path(path), config, weights, tokenizer, payload["optimizer"], step, float(best), payload["extra"])

    def build_model(self, device: str | torch.device = "cpu") -> GPT:
        """The network this checkpoint was saved from, with its weights; a one-line UserError
        first when it would not fit in the device's memory (a rope table sized by a huge
        block_size is not in the weights, so the file's size does not tell)."""
        check_model_memory(self.config.model, device, torch.float32, str(self.path))
        model = GPT(self.config.model)
        model.load_state_dict(self.weights)
        return model.to(device)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and check a checkpoint file; every failure is a one-line UserError naming it."""
    return Checkpoint.from_payload(_read_payload(path, map_location), path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The file's payload as the plain dicts it holds, checked as read_checkpoint checks it:
    for code that edits a checkpoint and saves it again."""
    payload = _read_payload(path, map_location)
    Checkpoint.from_payload(payload, path)
    return payload


def _read_payload(path: str | Path, map_location: str | torch.device) -> dict[str, Any]:
    """torch.load(weights_only=True) of a file that must carry our marker and version."""
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
    return payload


def checkpoint_config(payload: dict[str, Any], path: str | Path) -> Config:
    """The checkpoint's config, validated like a config file (an unknown key, a bad value)."""
    tables = payload["config"]
    if not isinstance(tables, dict) or not all(isinstance(table, dict) for table in tables.values()):
        raise UserError(f"{path}: its config is not a {{'model': {{...}}, 'train': {{...}}}} table")
    source = f"{path} config"
    try:
        return config_from_dict({name: dict(table) for name, table in tables.items()}, source=source)
    except UserError as error:  # a value's type or range: config_from_dict names the key, not the file
        message = str(error)
        raise UserError(message if message.startswith(source) else f"{source}: {message}") from None


def _check_weights(weights: Any, config: Config, path: str | Path) -> None:
    """A state_dict of finite tensors that fits the config's network."""
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise UserError(f"{path}: its model is not a state_dict of tensors")
    _check_weights_match(weights, config, path)
    not_finite = next((name for name, t in weights.items() if t.is_floating_point() and not t.isfinite().all()), None)
    if not_finite is not None:
        raise UserError(f"{path} has NaN or infinite weights (in {not_finite} and maybe more); use an earlier checkpoint")


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
    """The network of a payload from load_checkpoint, with its weights."""
    return Checkpoint.from_payload(payload, "checkpoint").build_model(device)


def load_for_generation(path: str | Path, device: torch.device) -> tuple[GPT, Tokenizer, Checkpoint | None]:
    """The model in eval mode on ``device``, its tokenizer, and the checkpoint it came from.

    ``path`` is a checkpoint file or a Hugging Face GPT-2 folder (model/pretrained.py); a
    folder was not trained here, so it has no Checkpoint (no training config, no dataset
    of its own): None."""
    if is_gpt2_folder(path):
        model, tokenizer = load_gpt2(path, device=device)
        return model, tokenizer, None
    checkpoint = read_checkpoint(path, device)
    tokenizer = tokenizer_from_state(checkpoint.tokenizer)
    vocab = checkpoint.config.model.vocab_size
    if tokenizer.vocab_size > vocab:
        raise UserError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab}")
    return checkpoint.build_model(device).eval(), tokenizer, checkpoint


# Model settings that may differ from train.init_from's: they do not change the weights.
FREE_MODEL_KEYS = ("block_size", "dropout", "attention")


def source_model_config(path: str | Path) -> ModelConfig:
    """The shape of the weights at ``path``: a GPT-2 folder or a checkpoint of this project."""
    if not Path(path).exists():
        raise UserError(f"{path} not found (expected a Hugging Face GPT-2 folder or a checkpoint file)")
    if is_gpt2_folder(path):
        return gpt2_config(path)
    return read_checkpoint(path).config.model


def adopt_init_shape(cfg: Config, given: set[str]) -> Config:
    """With train.init_from the model's shape is that of the weights there: every model key
    the config leaves out is taken from them, and one it sets (``given``: section.key
    names) to another value is an error. block_size may be smaller (the position table
    is cropped); dropout and attention are free."""
    source = source_model_config(cfg.train.init_from)
    conflicts = [
        f"model.{key} = {getattr(cfg.model, key)!r} but init_from has {getattr(source, key)!r}"
        for key in sorted(k.removeprefix("model.") for k in given if k.startswith("model."))
        if key not in FREE_MODEL_KEYS and getattr(cfg.model, key) != getattr(source, key)
    ]
    if conflicts:
        raise UserError(f"train.init_from {cfg.train.init_from} fixes the model's shape: {'; '.join(conflicts)}; "
                        "leave those keys out of the config")
    block_size = cfg.model.block_size if "model.block_size" in given else source.block_size
    if block_size > source.block_size:
        raise UserError(f"model.block_size {block_size} exceeds the {source.block_size} positions of "
                        f"train.init_from {cfg.train.init_from}")
    model = dataclasses.replace(source, block_size=block_size, dropout=cfg.model.dropout,
                                attention=cfg.model.attention)
    return dataclasses.replace(cfg, model=model)


def load_init_from(cfg: Config, meta: dict[str, Any]) -> GPT:
    """The weights of train.init_from as a network of ``cfg.model`` (adopt_init_shape's
    shape; dropout and attention path free). The dataset (``meta``, from model/data.py)
    must be tokenized with those weights' tokenizer."""
    source, tokenizer_state = load_initial_weights(cfg.train.init_from, cfg.model.block_size)
    free = {key: getattr(cfg.model, key) for key in FREE_MODEL_KEYS}
    differences = config_differences(dataclasses.asdict(dataclasses.replace(source.config, **free)),
                                     dataclasses.asdict(cfg.model))
    if differences:
        raise UserError(f"the model config differs from train.init_from's (init_from -> config): "
                        + "; ".join(f"model.{d}" for d in differences))
    if tokenizer_state != meta["tokenizer"]:
        raise UserError(f"{cfg.train.data_dir} was prepared with the {meta.get('tokenizer_name', '?')} tokenizer, "
                        f"not the one of train.init_from {cfg.train.init_from}; prepare the corpus with "
                        "--tokenizer gpt2:FOLDER (for a GPT-2 folder) or that checkpoint's tokenizer")
    if dataclasses.asdict(source.config) == dataclasses.asdict(cfg.model):
        return source
    model = GPT(cfg.model)  # other dropout or attention path: the same weights
    model.load_state_dict(source.state_dict())
    return model


def load_initial_weights(path: str | Path, block_size: int) -> tuple[GPT, dict[str, Any]]:
    """The model to fine-tune from (a GPT-2 folder or a checkpoint of this project), with
    its position table cropped to ``block_size``, and its tokenizer state."""
    if is_gpt2_folder(path):
        model, tokenizer = load_gpt2(path, block_size=block_size)
        return model.train(), tokenizer.state()
    checkpoint = read_checkpoint(path)
    cfg = checkpoint.config.model
    if block_size > cfg.block_size:
        raise UserError(f"block_size {block_size} exceeds the {cfg.block_size} positions of {path}")
    weights = dict(checkpoint.weights)
    if "wpe.weight" in weights:
        weights["wpe.weight"] = weights["wpe.weight"][:block_size]  # a shorter context keeps the first positions
    model = GPT(dataclasses.replace(cfg, block_size=block_size))
    model.load_state_dict(weights)
    return model, checkpoint.tokenizer


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
