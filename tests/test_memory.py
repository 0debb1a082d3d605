"""model/memory.py: the memory a model needs, from its config, before it is built."""

from __future__ import annotations

import pytest
import torch

from model import memory
from model.config import ModelConfig
from model.errors import UserError
from model.gpt import GPT
from model.memory import check_model_memory, model_bytes, parameter_count

SHAPES = {
    "gpt-2 like": ModelConfig(vocab_size=61, block_size=24, n_layer=3, n_head=2, n_embd=16),
    "no bias": ModelConfig(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=16, bias=False),
    "rmsnorm": ModelConfig(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=16, norm="rmsnorm"),
    "rope": ModelConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32, position="rope"),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_count_is_gpts_own(shape):
    cfg = SHAPES[shape]
    assert parameter_count(cfg) == GPT(cfg).num_params()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_bytes_counts_parameters_and_the_rotary_tables(dtype):
    cfg = SHAPES["rope"]
    model = GPT(cfg).to(dtype)
    tables = sum(b.numel() * 4 for b in model.buffers())  # the float32 cos and sin GPT keeps
    angles = cfg.block_size * (cfg.n_embd // cfg.n_head // 2) * 8  # the float64 table they are built from
    assert model_bytes(cfg, dtype) == model.num_params() * dtype.itemsize + tables + angles


def test_a_rope_table_too_large_for_memory_is_refused_before_it_is_built(monkeypatch):
    monkeypatch.setattr(memory, "device_memory", lambda device: 8 * 2**30)
    cfg = ModelConfig(vocab_size=61, block_size=10**9, n_layer=1, n_head=2, n_embd=16, position="rope")
    with pytest.raises(UserError, match=r"^run.toml: the model \(n_layer 1, n_embd 16, block_size 1,000,000,000, "
                                        r"vocab_size 61\) needs 59.6 GiB of memory, more than the 8.0 GiB of the cpu$"):
        check_model_memory(cfg, "cpu", torch.float32, "run.toml")


def test_a_model_that_fits_passes():
    check_model_memory(SHAPES["gpt-2 like"], "cpu", torch.float32, "run.toml")


def test_the_memory_of_the_cpu_is_known():
    assert memory.device_memory("cpu") > 2**20
