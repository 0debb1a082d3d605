"""Optimisers: which parameters Muon gets, the shared schedule, and Muon through the whole
training engine (exact resume, gradient accumulation, DDP)."""

from __future__ import annotations

import pytest
import torch

import train
from model.checkpoint import load_checkpoint
from model.config import TrainConfig
from model.gpt import GPT
from model.optim import MuonWithPrecision, build_optimizers, muon_ns_dtype
from tests.conftest import one_line_error, records, run_args, tiny_config, tiny_run, without_timing

CPU = torch.device("cpu")
MUON = ["optimizer=muon", "muon_lr=0.05"]


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else():
    model = GPT(tiny_config(n_layer=3))
    optimizers = build_optimizers(model, TrainConfig(optimizer="muon"), CPU)
    muon = [p for g in optimizers.optimizers["muon"].param_groups for p in g["params"]]
    adamw = [p for g in optimizers.optimizers["adamw"].param_groups for p in g["params"]]
    names = {id(p): name for name, p in model.named_parameters()}
    # 4 matrices a block: attention's qkv and output projection, the MLP's two
    assert sorted(names[id(p)] for p in muon) == sorted(
        f"blocks.{i}.{m}.weight" for i in range(3) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    assert {id(p) for p in muon}.isdisjoint(id(p) for p in adamw)
    assert {id(p) for p in muon + adamw} == {id(p) for p in model.parameters()}
    assert "wte.weight" in {names[id(p)] for p in adamw}  # the embedding (and the head tied to it)


def test_adamw_alone_decays_only_matrices():
    model = GPT(tiny_config())
    (adamw,) = build_optimizers(model, TrainConfig(weight_decay=0.3), CPU).optimizers.values()
    decayed, plain = adamw.param_groups
    assert decayed["weight_decay"] == 0.3 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])


def test_the_schedule_scales_both_optimisers_from_their_own_peaks():
    optimizers = build_optimizers(GPT(tiny_config()), TrainConfig(optimizer="muon", learning_rate=2e-3,
                                                                  min_lr=0.0, muon_lr=0.04), CPU)
    optimizers.set_lr_factor(0.25)
    assert [g["lr"] for g in optimizers.optimizers["adamw"].param_groups] == [5e-4, 5e-4]
    assert [g["lr"] for g in optimizers.optimizers["muon"].param_groups] == [0.01]
    optimizers.set_lr_factor(1.0)  # back to the peaks, not compounded
    assert [g["lr"] for g in optimizers.param_groups] == [2e-3, 2e-3, 0.04]


def test_a_muon_step_moves_each_matrix_by_its_orthogonalised_gradient():
    """From zero momentum the update is -lr x NS(g): Newton-Schulz pushes every singular
    value of g towards 1 (the quintic iteration lands in about [0.7, 1.2]) keeping its
    singular vectors, so the step is close to -lr U V^T (U S V^T = g, worked out here with
    an SVD, over the directions where g is not zero). The gradient's own direction
    (plain momentum SGD) has cosine 0.72 with U V^T here, AdamW's first step sign(g) 0.57."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizers = build_optimizers(model, TrainConfig(optimizer="muon", muon_lr=0.01), CPU)
    weight = model.blocks[0].mlp.fc.weight  # (64, 16): "original" scales the rate by sqrt(64 / 16) = 2
    before = weight.detach().clone()
    _, loss = model(torch.randint(0, 37, (4, 16)), torch.randint(0, 37, (4, 16)))
    loss.backward()
    u, s, vh = torch.linalg.svd(weight.grad, full_matrices=False)
    rank = int((s > 1e-6 * s[0]).sum())
    polar = u[:, :rank] @ vh[:rank]
    optimizers.step(torch.amp.GradScaler("cpu", enabled=False))
    step = (before - weight.detach()) / (0.01 * 2)
    assert (step * polar).sum() / (step.norm() * polar.norm()) > 0.93
    singular_values = torch.linalg.svdvals(step)[:rank]
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25


def muon_run(optimizer_class, steps: int, **settings) -> list[torch.Tensor]:
    """Three matrices (wide, tall, square) after ``steps`` steps on fixed random gradients."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((8, 24), (24, 8), (16, 16))]
    optimizer = optimizer_class(params, lr=0.05, weight_decay=0.1, **settings)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_in_bfloat16_is_torchs_muon_bit_for_bit(adjust_lr_fn, nesterov):
    ours = muon_run(MuonWithPrecision, 3, ns_dtype=torch.bfloat16, adjust_lr_fn=adjust_lr_fn, nesterov=nesterov)
    torchs = muon_run(torch.optim.Muon, 3, adjust_lr_fn=adjust_lr_fn, nesterov=nesterov)
    for a, b in zip(ours, torchs):
        assert torch.equal(a, b)


def test_muon_in_float32_differs_from_bfloat16_by_bfloat16_rounding_only():
    """bfloat16 keeps 8 bits of mantissa (relative rounding about 4e-3): the float32
    iteration lands within a few of those roundings of torch's, and is not the same."""
    start = muon_run(torch.optim.Muon, 0)
    in_bf16 = muon_run(torch.optim.Muon, 3)
    in_fp32 = muon_run(MuonWithPrecision, 3, ns_dtype=torch.float32)
    for before, a, b in zip(start, in_bf16, in_fp32):
        moved = (a - before).norm()
        assert (a - b).norm() < 0.03 * moved
        assert not torch.equal(a, b)


def test_muon_precision_auto_is_bfloat16_on_cuda_only():
    assert muon_ns_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert muon_ns_dtype("auto", CPU) == torch.float32
    assert muon_ns_dtype("bfloat16", CPU) == torch.bfloat16
    optimizers = build_optimizers(GPT(tiny_config()), TrainConfig(optimizer="muon", muon_precision="bfloat16"), CPU)
    assert optimizers.optimizers["muon"].ns_dtype == torch.bfloat16


def test_muon_resume_n_plus_n_equals_2n_bit_for_bit(tiny_dataset, tmp_path):
    common = [*MUON, "dropout=0.1", "lr_decay_iters=12", "eval_interval=1"]
    assert train.main(run_args(tiny_dataset, tmp_path / "straight", *common, "max_iters=12")) == 0
    assert train.main(run_args(tiny_dataset, tmp_path / "split", *common, "max_iters=6")) == 0
    assert train.main(["--no-progress", "--resume", f"out_dir={tmp_path / 'split'}", "max_iters=12"]) == 0

    assert without_timing(records(tmp_path / "split")) == without_timing(records(tmp_path / "straight"))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 12
    assert set(b["optimizer"]) == {"adamw", "muon"}  # both states were saved and carried over
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name in ("adamw", "muon"):
        for index, state in a["optimizer"][name]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b["optimizer"][name]["state"][index][key]), (name, index, key)


def test_resuming_with_the_other_optimizer_is_refused(tiny_dataset, tmp_path, capsys):
    assert train.main(run_args(tiny_dataset, tmp_path, "max_iters=2", "eval_interval=2")) == 0
    capsys.readouterr()
    assert train.main(["--no-progress", "--resume", f"out_dir={tmp_path}", "max_iters=4", "optimizer=muon"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "cannot resume: the checkpoint's optimizer state does not fit the model (optimizer state is for " \
           "adamw, this run uses adamw, muon)" in line


def test_a_loaded_state_keeps_this_runs_peak_learning_rates():
    model = GPT(tiny_config())
    saved = build_optimizers(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.01, min_lr=0.0), CPU)
    _, loss = model(torch.randint(0, 37, (2, 16)), torch.randint(0, 37, (2, 16)))
    loss.backward()
    saved.step(torch.amp.GradScaler(enabled=False))
    resumed = build_optimizers(model, TrainConfig(optimizer="muon", learning_rate=3e-3, muon_lr=0.02, min_lr=0.0), CPU)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.optimizers["adamw"].state[model.wte.weight]["step"] == 1  # the state did load
    assert [g["peak_lr"] for g in resumed.param_groups] == [3e-3, 3e-3, 0.02]  # the run's peaks, not the saved ones


def test_muon_with_gradient_accumulation_trains_the_same(tiny_dataset, tmp_path):
    train.train(tiny_run(tiny_dataset, tmp_path / "a", *MUON, "eval_interval=1"), progress=False)
    train.train(tiny_run(tiny_dataset, tmp_path / "b", *MUON, "eval_interval=1", "micro_batch_size=2"),
                progress=False)
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    for ra, rb in zip(a[1:], b[1:]):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    whole, accumulated = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in "ab")
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("args, message", [
    (["optimizer=sgd"], "train.optimizer must be 'adamw' or 'muon', got 'sgd'"),
    (["muon_lr=0"], "train.muon_lr must be > 0"),
    (["muon_momentum=1.0"], "train.muon_momentum must be in [0, 1)"),
    (["muon_weight_decay=-0.1"], "train.muon_weight_decay must be >= 0"),
    (["muon_adjust_lr=moonshot"], "train.muon_adjust_lr must be 'original' or 'match_rms_adamw'"),
    (["muon_precision=float16"], "train.muon_precision must be 'auto', 'bfloat16' or 'float32'"),
])
def test_bad_optimizer_settings_are_one_line_errors(args, message, tiny_dataset, tmp_path, capsys):
    assert train.main([f"data_dir={tiny_dataset}", f"out_dir={tmp_path}", "max_iters=1", "device=cpu", *args]) == 2
    assert message in one_line_error(capsys.readouterr().err)
