"""Every knob of the project, as dataclasses, and their loading from TOML plus overrides.

A config file has two tables, ``[model]`` (the network's shape) and ``[train]`` (the
optimisation and the run). Anything left out keeps the default written here.
Overrides on the command line are ``KEY=VALUE`` pairs, where KEY is ``section.field``
or just ``field`` when only one section has it, and VALUE is read as a TOML value
(``learning_rate=3e-4``, ``compile=true``, ``device="cuda"`` or simply ``device=cuda``).

Validation happens here, once: an unknown key names the closest known one, a value of
the wrong type or out of range is a one-line :class:`UserError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.errors import UserError


ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclass
class ModelConfig:
    """The shape of the GPT (see model/gpt.py)."""

    vocab_size: int = 0  # 0: take it from the prepared dataset's meta.json (rounded up to vocab_multiple)
    vocab_multiple: int = 1  # pad the data's vocabulary up to a multiple of this (64 suits GPU matmuls)
    block_size: int = 128  # the longest context the model sees
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    attention: str = "sdpa"  # "sdpa" (fused kernel) or "explicit" (scores, mask, softmax, sum)
    position: str = "learned"  # "learned" absolute embeddings (GPT-2) or "rope" (rotary, in attention)
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (scale only, no centring, no bias)
    norm_eps: float = 1e-5  # added to the variance in every norm (GPT-2's config.json: layer_norm_epsilon)
    activation: str = "gelu"  # the MLP's: "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation, GPT-2's gelu_new)

    def validate(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            _require(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.vocab_size >= 0, f"model.vocab_size must be >= 0, got {self.vocab_size}")
        _require(
            self.n_embd % self.n_head == 0,
            f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})",
        )
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _require(
            self.attention in ("sdpa", "explicit"),
            f"model.attention must be 'sdpa' or 'explicit', got {self.attention!r}",
        )
        _require(
            self.position in ("learned", "rope"),
            f"model.position must be 'learned' or 'rope', got {self.position!r}",
        )
        _require(self.norm in ("layernorm", "rmsnorm"), f"model.norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        _require(0 < self.norm_eps < 1, f"model.norm_eps must be in (0, 1), got {self.norm_eps}")
        _require(
            self.activation in ACTIVATIONS,
            f"model.activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {self.activation!r}",
        )
        _require(
            self.position != "rope" or (self.n_embd // self.n_head) % 2 == 0,
            f"model.position 'rope' rotates pairs of features: the head size n_embd / n_head "
            f"= {self.n_embd // self.n_head} must be even",
        )


@dataclass
class TrainConfig:
    """How to train: data, optimiser, schedule, evaluation, checkpoints, device."""

    data_dir: str = "data/pydoc"  # a folder written by data/prepare.py
    out_dir: str = "out/default"  # checkpoints and metrics.jsonl go here
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    batch_size: int = 16  # sequences per optimiser step, summed over micro-steps and torchrun processes
    micro_batch_size: int = 0  # sequences per forward pass in one process; 0: the whole share (no accumulation)
    max_iters: int = 1000
    max_seconds: float = 0.0  # > 0: stop after this much training time; the LR schedule then runs on time
    learning_rate: float = 1e-3  # peak, reached after warmup
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_iters: int = 50
    lr_decay_iters: int = 0  # 0: decay over the whole run (max_iters)
    weight_decay: float = 0.1  # AdamW's, applied to 2-D weights only
    optimizer: str = "adamw"  # "adamw": AdamW for everything; "muon": Muon for the blocks' matrices, AdamW for the rest
    # Muon (torch.optim.Muon; optimizer = "muon"): the 2-D weight matrices inside the
    # Transformer blocks. Embeddings, the head, biases and norms stay with AdamW at
    # learning_rate. The schedule scales both optimisers' rates by the same factor.
    muon_lr: float = 0.02  # peak Muon learning rate (before muon_adjust_lr's shape scaling)
    muon_momentum: float = 0.95  # Nesterov momentum of Muon
    muon_weight_decay: float = 0.0  # decoupled weight decay of the Muon matrices (multiplied by the lr)
    # How Muon scales its rate by a matrix's shape (out x in): "original" (Keller Jordan's,
    # sqrt(max(1, out / in))) or "match_rms_adamw" (Moonshot's, 0.2 sqrt(max(out, in)): an
    # update as large as AdamW's, so an AdamW learning rate carries over)
    muon_adjust_lr: str = "original"
    # The number type of Muon's Newton-Schulz iteration: "auto" (bfloat16 on CUDA, float32
    # on other devices), "bfloat16" (torch.optim.Muon's own choice) or "float32"
    muon_precision: str = "auto"
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 100  # iterations between evaluations (and checkpoints)
    eval_iters: int = 20  # batches (of batch_size sequences) per split in one evaluation
    compile: bool = False  # torch.compile the model (falls back to plain PyTorch if it cannot)
    peak_tflops: float = 0.0  # one device's peak, for MFU; 0: a built-in estimate (see model/perf.py)
    init_from: str = ""  # start from these weights: a Hugging Face GPT-2 folder or a checkpoint of this project

    def validate(self) -> None:
        for name in ("batch_size", "max_iters", "eval_interval", "eval_iters"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "warmup_iters", "lr_decay_iters", "micro_batch_size"):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.seed < 2**64, f"train.seed must be below 2**64 (a 64-bit seed), got {self.seed}")
        _require(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
        _require(
            0 <= self.min_lr <= self.learning_rate,
            f"train.min_lr must be in [0, learning_rate={self.learning_rate}], got {self.min_lr}",
        )
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.optimizer in ("adamw", "muon"), f"train.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        _require(self.muon_lr > 0, f"train.muon_lr must be > 0, got {self.muon_lr}")
        _require(0 <= self.muon_momentum < 1, f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        _require(self.muon_weight_decay >= 0, f"train.muon_weight_decay must be >= 0, got {self.muon_weight_decay}")
        _require(
            self.muon_adjust_lr in ("original", "match_rms_adamw"),
            f"train.muon_adjust_lr must be 'original' or 'match_rms_adamw', got {self.muon_adjust_lr!r}",
        )
        _require(
            self.muon_precision in ("auto", "bfloat16", "float32"),
            f"train.muon_precision must be 'auto', 'bfloat16' or 'float32', got {self.muon_precision!r}",
        )
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        _require(self.max_seconds >= 0, f"train.max_seconds must be >= 0 (0: no time limit), got {self.max_seconds}")
        _require(self.peak_tflops >= 0, f"train.peak_tflops must be >= 0 (0: estimate it), got {self.peak_tflops}")
        _require(
            self.micro_batch_size <= self.batch_size,
            f"train.micro_batch_size ({self.micro_batch_size}) must not exceed train.batch_size ({self.batch_size})",
        )
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        _require(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            f"train.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
        )


@dataclass
class Config:
    """A whole run: the model's shape and how to train it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Read a TOML config, apply overrides, validate. Without ``path`` the starting point
    is ``base`` (a config as plain dicts, e.g. a checkpoint's) or else the defaults."""
    return config_from_dict(config_tables(path, overrides, base), source=str(path) if path else "defaults")


def config_tables(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The settings ``load_config`` would validate, as plain dicts: what the file (or
    ``base``) and the overrides name, the defaults left out. Lets a caller find a value
    (where the run lives) before knowing which base the overrides apply to."""
    tables: dict[str, dict[str, Any]] = {name: dict((base or {}).get(name, {})) for name in SECTIONS}
    if path is not None:
        tables = _read_toml(Path(path))
    for item in overrides:
        section, key, value = parse_override(item)
        tables[section][key] = value
    return tables


def config_from_dict(tables: dict[str, dict[str, Any]], source: str = "config") -> Config:
    """Build a validated Config from ``{"model": {...}, "train": {...}}``."""
    unknown_sections = set(tables) - set(SECTIONS)
    if unknown_sections:
        name = sorted(unknown_sections)[0]
        raise UserError(f"{source}: unknown section [{name}]{_did_you_mean(name, SECTIONS)}")
    parts = {}
    for section, cls in SECTIONS.items():
        values = tables.get(section, {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise UserError(f"{source}: {_unknown_key(section, key)}")
            values[key] = _coerce(f"{section}.{key}", value, known[key].type)
        parts[section] = cls(**values)
    return Config(**parts).validate()


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs (a missing key reads as None)."""
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def parse_override(item: str) -> tuple[str, str, Any]:
    """Split ``[section.]key=value`` into (section, key, parsed value)."""
    if "=" not in item:
        raise UserError(f"override {item!r} must look like key=value (for example model.n_layer=6)")
    dotted, raw = item.split("=", 1)
    dotted = dotted.strip()
    if "." in dotted:
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            raise UserError(f"unknown section {section!r} in override {item!r}{_did_you_mean(section, SECTIONS)}")
        if key not in _field_names(SECTIONS[section]):
            raise UserError(f"override {item!r}: {_unknown_key(section, key)}")
    else:
        key = dotted
        owners = [name for name, cls in SECTIONS.items() if key in _field_names(cls)]
        if not owners:
            every = [f"{name}.{f}" for name, cls in SECTIONS.items() for f in _field_names(cls)]
            every += [f for cls in SECTIONS.values() for f in _field_names(cls)]
            raise UserError(f"unknown config key {key!r}{_did_you_mean(key, every)}")
        section = owners[0]
    return section, key, _parse_value(raw.strip())


def _parse_value(raw: str) -> Any:
    """A TOML value if it parses as one, else the raw text (so device=cuda works unquoted)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _read_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    for name, table in data.items():
        if not isinstance(table, dict):
            raise UserError(f"{path}: top-level key {name!r} must be a table such as [model] or [train]")
    return {name: dict(data.get(name, {})) for name in set(SECTIONS) | set(data)}


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Check ``value`` against the field's annotation (a string, thanks to __future__ annotations)."""
    if annotation == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    expected, described = _TYPES[annotation]
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise UserError(f"{name} must be {described}, got {value!r}")
    # TOML reads inf and nan as floats; no knob here means anything with them.
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return value


_TYPES = {"int": (int, "an integer"), "float": (float, "a number"), "bool": (bool, "true or false"),
          "str": (str, "a string")}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(section: str, key: str) -> str:
    """Name an unknown ``section.key``: the closest key of that section, or the other
    section when the key belongs there."""
    message = f"unknown key {section}.{key}"
    owners = [name for name, cls in SECTIONS.items() if key in _field_names(cls)]
    if owners:
        return f"{message}; {key} belongs in [{owners[0]}]"
    return message + _did_you_mean(key, _field_names(SECTIONS[section]))


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)
