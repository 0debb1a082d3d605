"""The training engine: schedule, batch splitting, accumulation, metrics, MFU, bad input."""

from __future__ import annotations

import builtins
import json
import math
import os
import signal

import pytest
import torch

import train
from model.checkpoint import load_checkpoint, read_checkpoint
from model.config import ModelConfig, TrainConfig, config_differences, load_config
from model.errors import UserError
from model.gpt import GPT
from model.perf import flops_per_token
from tests.conftest import one_line_error, records, tiny_config, tiny_run


# --- the learning-rate schedule, worked by hand ------------------------------------------

def test_learning_rate_schedule_by_hand():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert train.learning_rate_at(0, cfg) == pytest.approx(0.1)  # 1 * (0 + 1) / 10
    assert train.learning_rate_at(9, cfg) == pytest.approx(1.0)  # warmup's last step reaches the peak
    assert train.learning_rate_at(10, cfg) == pytest.approx(1.0)  # cosine at progress 0
    # halfway through the decay (step 60 of 10..110): cosine factor 0.5 -> 0.1 + 0.5 * 0.9
    assert train.learning_rate_at(60, cfg) == pytest.approx(0.55)
    assert train.learning_rate_at(110, cfg) == pytest.approx(0.1)
    assert train.learning_rate_at(500, cfg) == pytest.approx(0.1)  # stays at the floor


def test_the_schedule_is_a_factor_of_the_peak_from_warmup_to_the_min_lr_floor():
    cfg = TrainConfig(learning_rate=2.0, min_lr=0.5, warmup_iters=10, max_iters=110)
    assert train.lr_factor_at(4, cfg) == 0.5  # (4 + 1) / 10, exactly: no division by the peak
    assert train.lr_factor_at(10, cfg) == 1.0
    assert train.lr_factor_at(60, cfg) == pytest.approx(0.25 + 0.5 * 0.75)  # floor 0.5 / 2 = 0.25
    assert train.lr_factor_at(500, cfg) == pytest.approx(0.25)
    assert train.learning_rate_at(60, cfg) == 2.0 * train.lr_factor_at(60, cfg)


def test_the_config_file_is_read_once(tiny_dataset, tmp_path, monkeypatch):
    import model.config

    config = tmp_path / "run.toml"
    config.write_text(f"[model]\nblock_size = 16\nn_layer = 1\nn_head = 2\nn_embd = 16\n[train]\n"
                      f"data_dir = '{tiny_dataset}'\nout_dir = '{tmp_path / 'out'}'\ndevice = 'cpu'\n"
                      "batch_size = 4\neval_interval = 2\neval_iters = 1\n")
    reads = []
    real_read = model.config._read_toml
    monkeypatch.setattr(model.config, "_read_toml", lambda path: reads.append(path) or real_read(path))
    assert train.main(["--no-progress", "--config", str(config), "max_iters=2"]) == 0
    assert train.main(["--no-progress", "--config", str(config), "--resume", "max_iters=4"]) == 0
    assert reads == [config, config]  # once per command


def test_time_budgeted_schedule_follows_the_clock():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=5, max_seconds=90.0)
    assert train.learning_rate_at(2, cfg, time_fraction=0.9) == pytest.approx(0.6)  # warmup is by step
    # a quarter of the budget: 0.5 * (1 + cos(pi / 4))
    assert train.learning_rate_at(50, cfg, time_fraction=0.25) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))
    assert train.learning_rate_at(50, cfg, time_fraction=1.3) == pytest.approx(0.0)


# --- splitting a batch over processes and micro-steps -------------------------------------

@pytest.mark.parametrize("batch, micro, world, expected", [
    (12, 0, 1, (12, 1)), (12, 3, 1, (3, 4)), (12, 3, 2, (3, 2)), (12, 0, 4, (3, 1)), (480, 12, 8, (12, 5)),
])
def test_split_batch(batch, micro, world, expected):
    assert train.split_batch(batch, micro, world) == expected


@pytest.mark.parametrize("batch, micro, world, message", [
    (12, 5, 1, "not a multiple of micro_batch_size (5) x 1 process(es) = 5"),
    (12, 4, 2, "not a multiple of micro_batch_size (4) x 2 process(es) = 8"),
    (12, 0, 5, "must be a multiple of the number of processes (5)"),
])
def test_split_batch_refuses_uneven_splits(batch, micro, world, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.split_batch(batch, micro, world)


def test_a_batch_is_the_same_however_it_is_shared(tiny_dataset):
    """The union of every process's micro-batches is the single-process batch, in order."""
    from model.data import open_split, read_meta
    from model.distributed import Distributed

    cfg = load_config(None, [f"data_dir={tiny_dataset}", "batch_size=12", "block_size=16"])
    tokens = open_split(tiny_dataset, "train", read_meta(tiny_dataset))
    whole = train.Batches(tokens, cfg, Distributed(), 12).at(7)
    assert len(whole) == 1
    for world, micro in [(1, 3), (2, 2), (3, 4), (4, 1)]:
        pieces = [b for rank in range(world) for b in train.Batches(tokens, cfg, Distributed(rank, rank, world), micro).at(7)]
        assert all(x.shape == (micro, 16) for x, _ in pieces)
        assert torch.equal(torch.cat([x for x, _ in pieces]), whole[0][0])
        assert torch.equal(torch.cat([y for _, y in pieces]), whole[0][1])
    other_step = train.Batches(tokens, cfg, Distributed(), 12).at(8)
    assert not torch.equal(other_step[0][0], whole[0][0])


def test_gradient_accumulation_gives_the_same_training(tiny_dataset, tmp_path):
    """4 micro-steps of 2 sequences see the batch of 1 step of 8; only float summation order
    differs (a mean of 4 means vs one mean), so losses agree to float32 rounding."""
    train.train(tiny_run(tiny_dataset, tmp_path / "a", "eval_interval=1"), progress=False)
    train.train(tiny_run(tiny_dataset, tmp_path / "b", "eval_interval=1", "micro_batch_size=2"), progress=False)
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in a] == list(range(7))
    for ra, rb in zip(a[1:], b[1:]):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    whole, accumulated = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in "ab")
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, atol=1e-5, rtol=1e-4)


# --- metrics, MFU, plots --------------------------------------------------------------------

def test_metrics_lines_carry_every_field(tiny_dataset, tmp_path):
    train.train(tiny_run(tiny_dataset, tmp_path), progress=False)
    lines = records(tmp_path)
    assert [r["step"] for r in lines] == [0, 3, 6]
    first, last = lines[0], lines[-1]
    assert first["loss"] is None and first["tokens_per_s"] is None  # nothing trained yet
    for key in ("lr", "train_loss", "val_loss", "loss", "grad_norm", "tokens_per_s", "mfu", "train_seconds"):
        assert last[key] is not None and last[key] > 0, key
    # 3 steps of 8 x 16 tokens over the seconds those steps took
    assert last["tokens_per_s"] * (last["train_seconds"] - lines[1]["train_seconds"]) == pytest.approx(3 * 128, rel=1e-6)
    assert 0 < last["mfu"] < 1


def test_a_fresh_run_starts_a_fresh_metrics_file(tiny_dataset, tmp_path):
    train.train(tiny_run(tiny_dataset, tmp_path), progress=False)
    train.train(tiny_run(tiny_dataset, tmp_path, "max_iters=3"), progress=False)
    assert [r["step"] for r in records(tmp_path)] == [0, 3]


def test_resume_drops_later_and_torn_metrics_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 3}\n{"step": 6}\n{"step": 9, "tra')  # killed mid-write
    train.RunFolder(tmp_path).start_metrics(resumed_step=3)
    assert path.read_text() == '{"step": 0}\n{"step": 3}\n'


def test_flops_per_token_by_hand():
    # tiny_config: V=37, T=16, L=2, C=16: 7440 parameters (see test_model), of which the
    # position table T*C = 256 is a lookup: 6 * 7184 = 43104; attention 12 * 2 * 16 * 16 = 6144.
    cfg = tiny_config()
    assert flops_per_token(cfg, GPT(cfg).num_params()) == 43104 + 6144
    rope = tiny_config(position="rope")  # no position table at all: 7440 - 256 parameters
    assert flops_per_token(rope, GPT(rope).num_params()) == 6 * 7184 + 6144


def test_plot_writes_a_png(tiny_dataset, tmp_path):
    pytest.importorskip("matplotlib")
    train.train(tiny_run(tiny_dataset, tmp_path), progress=False)
    assert train.main(["--plot", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tiny_dataset, tmp_path, monkeypatch, capsys):
    train.train(tiny_run(tiny_dataset, tmp_path), progress=False)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert train.main(["--plot", str(tmp_path)]) == 2
    assert "needs matplotlib: pip install" in one_line_error(capsys.readouterr().err)


# --- compile ------------------------------------------------------------------------------

def test_compile_failure_falls_back_to_plain_pytorch(tiny_dataset, tmp_path, monkeypatch, capsys):
    def broken(model, *args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    result = train.train(tiny_run(tiny_dataset, tmp_path, "compile=true"), progress=False)
    out = capsys.readouterr().out
    assert "torch.compile is not available here (RuntimeError: no C++ compiler found); training without it" in out
    assert result.step == 6 and result.val_loss < 4


# --- architecture options reach the trainer ---------------------------------------------------

def test_rope_rmsnorm_model_trains(tiny_dataset, tmp_path):
    train.train(tiny_run(tiny_dataset, tmp_path, "position=rope", "norm=rmsnorm", "max_iters=30", "eval_interval=30"),
                progress=False)
    lines = records(tmp_path)
    assert lines[-1]["val_loss"] < lines[0]["val_loss"] - 0.5


def test_vocab_is_padded_to_the_multiple():
    cfg = load_config(None, ["vocab_multiple=64"])
    assert train.resolve_vocab_size(cfg, {"vocab_size": 50257}).model.vocab_size == 50304  # 786 * 64
    assert train.resolve_vocab_size(cfg, {"vocab_size": 64}).model.vocab_size == 64
    assert train.resolve_vocab_size(load_config(), {"vocab_size": 66}).model.vocab_size == 66


# --- bad input ------------------------------------------------------------------------------

def test_config_differences_lists_each_changed_key():
    old = vars(ModelConfig(n_layer=4, n_embd=128))
    new = vars(ModelConfig(n_layer=6, n_embd=128, position="rope"))
    assert config_differences(old, new) == ["n_layer: 4 -> 6", "position: 'learned' -> 'rope'"]
    assert config_differences(old, dict(old)) == []


@pytest.mark.parametrize("args, message", [
    (["batch_size=8", "micro_batch_size=3"], "not a multiple of micro_batch_size (3)"),
    (["batch_size=400", "block_size=32"], "fewer than one batch: batch_size x block_size + 1 = 400 x 32 + 1"),
    (["seed=-1"], "train.seed must be >= 0"),
    (["position=rope", "n_embd=18", "n_head=2"], "head size n_embd / n_head = 9 must be even"),
    (["norm=batchnorm"], "model.norm must be 'layernorm' or 'rmsnorm'"),
    (["max_seconds=-1"], "train.max_seconds must be >= 0"),
    (["seed=18446744073709551616"], "train.seed must be below 2**64"),  # 2**64
    (["n_embd=1000000", "n_head=1"], "the model does not fit in cpu memory: 48,000,"),
])
def test_train_bad_input(args, message, tiny_dataset, tmp_path, capsys):
    assert train.main([f"data_dir={tiny_dataset}", f"out_dir={tmp_path}", "max_iters=1", "device=cpu", *args]) == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_torchrun_asking_for_cuda_without_cuda(tiny_dataset, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert train.main([f"data_dir={tiny_dataset}", f"out_dir={tmp_path}", "--device", "cuda"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "torchrun started 2 processes for device 'cuda', but this machine has no usable CUDA GPU" in line
    assert "device=cpu" in line


def test_resume_without_a_checkpoint(tiny_dataset, tmp_path, capsys):
    assert train.main([f"data_dir={tiny_dataset}", f"out_dir={tmp_path}", "--resume"]) == 2
    assert f"there is no {tmp_path / 'last.pt'} to resume from" in one_line_error(capsys.readouterr().err)


def test_resume_with_another_model_lists_the_differences(tiny_dataset, tmp_path, capsys):
    base = [f"data_dir={tiny_dataset}", f"out_dir={tmp_path}", "device=cpu", "block_size=16", "n_layer=2",
            "n_head=2", "n_embd=16", "batch_size=4", "max_iters=2", "eval_interval=2", "eval_iters=1"]
    assert train.main(["--no-progress", *base]) == 0
    capsys.readouterr()
    config = tmp_path / "other.toml"
    config.write_text("[model]\nblock_size = 16\nn_layer = 3\nn_head = 2\nn_embd = 32\n")
    assert train.main(["--config", str(config), "--resume", *base[:3], "max_iters=4"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "the model config differs from the checkpoint's (checkpoint -> now): model.n_embd: 16 -> 32; " \
           "model.n_layer: 2 -> 3." in line


def test_overwrite_removes_the_earlier_run_before_the_first_step(tiny_dataset, tmp_path, monkeypatch, capsys):
    """A new run stopped before its first evaluation must not leave the old run's best.pt
    beside its own last.pt."""
    args = ["--no-progress", f"data_dir={tiny_dataset}", f"out_dir={tmp_path}", "device=cpu", "block_size=16",
            "n_layer=2", "n_head=2", "n_embd=16", "batch_size=4", "eval_iters=1"]
    assert train.main([*args, "max_iters=2", "eval_interval=2"]) == 0
    assert (tmp_path / "best.pt").is_file()
    real_step = train.train_step

    def ctrl_c_during_the_first_step(*step_args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # noted by the trainer, acted on after this step
        return real_step(*step_args, **kwargs)

    monkeypatch.setattr(train, "train_step", ctrl_c_during_the_first_step)
    assert train.main(["--overwrite", *args, "max_iters=50", "eval_interval=25"]) == 0
    assert "stopped by SIGINT after step 1" in capsys.readouterr().out
    assert not (tmp_path / "best.pt").exists()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    assert [r["step"] for r in records(tmp_path)] == [0]


def test_token_ids_beyond_the_vocabulary_are_refused_before_training(tiny_dataset, tmp_path, capsys):
    """A meta.json whose vocab_size is too small for the ids in the token files."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["vocab_size"] = 5
    (data / "meta.json").write_text(json.dumps(meta))
    assert train.main([f"data_dir={data}", f"out_dir={tmp_path / 'out'}", "device=cpu", "block_size=16"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{data / 'train.bin'} holds token id " in line and "but the vocabulary has 5 ids (0 to 4)" in line
    assert not (tmp_path / "out").exists()


def test_max_seconds_ends_a_run_and_a_resumed_run_goes_on_to_its_own_budget(tiny_dataset, tmp_path):
    """The time budget, not max_iters, ends the run; the schedule reaches min_lr at the end;
    a resume with a bigger budget continues from the training seconds already spent."""
    budget = ["max_iters=1000000", "eval_interval=1000000", "warmup_iters=2"]
    first = train.train(tiny_run(tiny_dataset, tmp_path, *budget, "max_seconds=0.3"), progress=False)
    end = records(tmp_path)[-1]
    assert 2 < first.step < 1000000 and end["step"] == first.step
    assert end["train_seconds"] >= 0.3 and end["lr"] == pytest.approx(1e-3)  # min_lr: the budget is spent
    resumed = train.train(tiny_run(tiny_dataset, tmp_path, *budget, "max_seconds=0.6"), progress=False,
                          checkpoint=read_checkpoint(tmp_path / "last.pt"))
    lines = records(tmp_path)
    assert resumed.step > first.step and lines[-1]["train_seconds"] >= 0.6
    assert [r["step"] for r in lines] == [0, first.step, resumed.step]


@pytest.mark.slow
def test_compile_success_path_trains(tiny_dataset, tmp_path, capsys):
    result = train.train(tiny_run(tiny_dataset, tmp_path, "compile=true"), progress=False)
    assert "compiled the model with torch.compile" in capsys.readouterr().out
    assert result.step == 6 and records(tmp_path)[-1]["val_loss"] < records(tmp_path)[0]["val_loss"]
