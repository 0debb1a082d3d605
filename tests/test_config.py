"""Configs: TOML loading, overrides, validation messages."""

from __future__ import annotations

import pytest

from model.config import load_config, parse_override
from model.errors import UserError
from tests.conftest import ROOT


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model.n_layer == 4 and cfg.train.device == "auto"


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        load_config(path)


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nn_layer = 3\n[train]\nlearning_rate = 0.01\n")
    cfg = load_config(path, ["model.n_layer=5", "max_iters=7", "device=cpu", "learning_rate=1"])
    assert cfg.model.n_layer == 5
    assert cfg.train.max_iters == 7
    assert cfg.train.device == "cpu"
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)


def test_override_values_are_toml():
    assert parse_override("train.out_dir=\"a b\"") == ("train", "out_dir", "a b")
    assert parse_override("bias=false") == ("model", "bias", False)
    assert parse_override("device=cuda:1") == ("train", "device", "cuda:1")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["n_layers=3"], "unknown config key 'n_layers'; did you mean 'n_layer'?"),
        (["modle.n_layer=3"], "unknown section 'modle'"),
        (["n_layer"], "must look like key=value"),
        (["n_embd=100", "n_head=3"], "model.n_embd (100) must be divisible by model.n_head (3)"),
        (["n_layer=2.5"], "model.n_layer must be an integer, got 2.5"),
        (["dropout=1.5"], "model.dropout must be in [0, 1)"),
        (["learning_rate=-1"], "train.learning_rate must be > 0"),
        (["device=tpu"], "train.device must be auto, cpu, cuda, cuda:N or mps"),
        (["attention=flash"], "model.attention must be 'sdpa' or 'explicit'"),
        (["bias=1"], "model.bias must be true or false, got 1"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(UserError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_suggests_closest(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlearning_rat = 0.1\n")
    with pytest.raises(UserError, match=r"unknown key train.learning_rat; did you mean 'learning_rate'\?"):
        load_config(path)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    flat = tmp_path / "flat.toml"
    flat.write_text("n_layer = 3\n")
    with pytest.raises(UserError, match="must be a table"):
        load_config(flat)
