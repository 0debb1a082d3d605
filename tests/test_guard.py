"""Training stops at the first non-finite loss or gradient norm, saves nothing after it, and
says so in one line; validation is reported in bits per byte too."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import train
from model.checkpoint import load_checkpoint
from model.config import load_config
from model.data import open_split, read_meta
from model.device import Precision
from model.distributed import Distributed
from model.gpt import GPT
from tests.conftest import one_line_error, records, run_args

# No clipping and no warmup: the first step at this rate throws the weights far enough that
# the next loss is ~1e9 and its gradient overflows (to inf, or to nan where an inf meets
# a zero: which one depends on the CPU's kernels).
DIVERGING = ["learning_rate=1e4", "min_lr=0", "warmup_iters=0", "grad_clip=0", "eval_interval=1"]


def test_a_diverging_run_stops_at_the_bad_step_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path, capsys):
    assert train.main(run_args(tiny_dataset, tmp_path / "bad", *DIVERGING, "max_iters=10")) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: training diverged at step 1: loss ")
    assert re.search(r"gradient norm (inf|nan); likely cause: too high a learning rate \(9\.76e\+03 at this step", line)
    assert f"{tmp_path / 'bad' / 'last.pt'} is left as it was" in line
    # last.pt is the step-1 checkpoint, exactly what a run that stopped there on purpose saves
    assert train.main(run_args(tiny_dataset, tmp_path / "good", *DIVERGING, "max_iters=1")) == 0
    bad, good = load_checkpoint(tmp_path / "bad" / "last.pt"), load_checkpoint(tmp_path / "good" / "last.pt")
    assert bad["step"] == good["step"] == 1
    for name, tensor in good["model"].items():
        assert torch.equal(bad["model"][name], tensor) and torch.isfinite(tensor).all(), name
    assert [r["step"] for r in records(tmp_path / "bad")] == [0, 1]


def test_divergence_before_any_checkpoint_says_none_was_written(tiny_dataset, tmp_path, capsys):
    assert train.main(run_args(tiny_dataset, tmp_path, *DIVERGING[:-1], "eval_interval=100", "max_iters=10")) == 2
    assert one_line_error(capsys.readouterr().err).endswith("no checkpoint was written")
    assert not (tmp_path / "last.pt").exists()


def test_under_fp16_the_message_points_at_overflow(tmp_path):
    fp16 = Precision(torch.device("cpu"), torch.float16)
    message = train.divergence_message(7, math.nan, math.inf, 3e-4, fp16, Path(tmp_path) / "last.pt")
    assert message.startswith("training diverged at step 7: loss nan, gradient norm inf; likely cause: fp16 overflow")


def test_validation_bits_per_byte_are_nats_per_byte_over_ln2(tiny_dataset):
    """With every token one byte (a char model of ASCII) bpb = nats per token / ln 2; with
    every token two bytes, half that."""
    cfg = load_config(None, [f"data_dir={tiny_dataset}", "block_size=16", "n_layer=1", "n_head=2",
                                   "n_embd=16", "batch_size=4", "eval_iters=3", "vocab_size=40"])
    splits = {"val": open_split(tiny_dataset, "val", read_meta(tiny_dataset))}
    model, cpu = GPT(cfg.model), torch.device("cpu")
    one = train.estimate_loss(model, splits, cfg, 4, Distributed(), cpu, Precision(cpu, torch.float32),
                              torch.ones(40, dtype=torch.int64))
    two = train.estimate_loss(model, splits, cfg, 4, Distributed(), cpu, Precision(cpu, torch.float32),
                              torch.full((40,), 2, dtype=torch.int64))
    assert one["val_bpb"] == pytest.approx(one["val"] / math.log(2), rel=1e-12)
    assert two["val_bpb"] == pytest.approx(one["val_bpb"] / 2, rel=1e-12)


def test_training_reports_validation_bits_per_byte(tiny_dataset, tmp_path):
    result = train.train(load_config(None, run_args(tiny_dataset, tmp_path, "max_iters=2",
                                                           "eval_interval=2")[1:]), progress=False)
    last = records(tmp_path)[-1]
    assert last["val_bpb"] == result.val_bpb
    # TINY_TEXT is ASCII, one byte a token but for the end-of-text token (none): a little above nats / ln 2
    assert last["val_loss"] / math.log(2) <= last["val_bpb"] < 1.02 * last["val_loss"] / math.log(2)
