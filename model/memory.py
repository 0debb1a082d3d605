"""How much memory a model needs, checked against its device before anything is allocated.

A config file can ask for any shape: n_embd 10^9, or a rope table for block_size 10^9,
would otherwise end in an allocator traceback or in the machine swapping. The numbers
here follow model/gpt.py's layers (tests/test_memory.py holds them to GPT's own count).
"""

from __future__ import annotations

import os

import torch

from model.config import ModelConfig
from model.errors import UserError


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of GPT(cfg), the tied embedding/head matrix once (GPT.num_params)."""
    C, bias = cfg.n_embd, cfg.bias
    norm = C * (2 if cfg.norm == "layernorm" and bias else 1)  # weight, and bias where LayerNorm has one
    linears = 12 * C * C + (9 * C if bias else 0)  # qkv (3C x C), proj (C x C), fc (4C x C), proj (C x 4C)
    positions = cfg.block_size * C if cfg.position == "learned" else 0
    return cfg.vocab_size * C + positions + cfg.n_layer * (linears + 2 * norm) + norm


def model_bytes(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes GPT(cfg) needs: its parameters in ``dtype`` and, with rope, the rotary
    tables, built from a float64 (block_size, head_size / 2) table of angles into float32
    cosines and sines."""
    rotary = 0
    if cfg.position == "rope":
        rotary = cfg.block_size * (cfg.n_embd // cfg.n_head // 2) * (8 + 4 + 4)
    return parameter_count(cfg) * dtype.itemsize + rotary


def device_memory(device: str | torch.device) -> int | None:
    """Total memory of the device in bytes, or None where it is not known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # not a POSIX system
            return None
    return None


def check_model_memory(cfg: ModelConfig, device: str | torch.device, dtype: torch.dtype, source: str) -> None:
    """Refuse, in one line naming ``source`` (the file the shape comes from), a model that
    would not fit in the memory of ``device``."""
    needed, available = model_bytes(cfg, dtype), device_memory(device)
    if available is not None and needed > available:
        raise UserError(f"{source}: the model (n_layer {cfg.n_layer:,}, n_embd {cfg.n_embd:,}, block_size "
                        f"{cfg.block_size:,}, vocab_size {cfg.vocab_size:,}) needs {_gib(needed)} of memory, more "
                        f"than the {_gib(available)} of the {torch.device(device).type}")


def _gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"
