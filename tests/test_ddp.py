"""Data-parallel training: 2 real gloo processes on the CPU against one process.

What we assert and why: both runs see exactly the same sequences at every step (the
batch of step s is drawn once from (seed, s) and shared out, see train.Batches), so in
exact arithmetic the two runs would be identical. They differ only in float rounding:
DDP averages the two processes' gradients (each a mean over half the batch) where one
process takes one mean over the whole batch. So we assert (1) the two ranks hold
bit-identical parameters (DDP hands both the same averaged gradient), (2) the losses
and final parameters match the single process to float32 rounding, amplified a little
by a few Adam steps, (3) gradient accumulation under DDP skips the all-reduce on
every micro-step but the last, and (4) a finished run leaves no gloo thread behind: one
still running when the interpreter shuts down can abort the process at exit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import train
from model.checkpoint import load_checkpoint
from model.config import load_config
from tests.conftest import ROOT, records, tiny_run_overrides

STEPS = 8


def overrides(tiny_dataset, out, *more: str) -> list[str]:
    return tiny_run_overrides(tiny_dataset, out, f"max_iters={STEPS}", "eval_interval=1", "eval_iters=2",
                              "warmup_iters=2", *more)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def native_threads() -> int | None:
    """The process's threads that Python did not start (gloo's among them); None off Linux."""
    tasks = Path("/proc/self/task")
    return len(list(tasks.iterdir())) - threading.active_count() if tasks.is_dir() else None


def worker(rank: int, world_size: int, port: int, args: list[str], out: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then train()."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    no_sync_calls = []
    real_no_sync = torch.nn.parallel.DistributedDataParallel.no_sync

    def counting_no_sync(self):
        no_sync_calls.append(1)
        return real_no_sync(self)

    torch.nn.parallel.DistributedDataParallel.no_sync = counting_no_sync
    models, real_build_optimizers = [], train.build_optimizers  # every rank's model, to compare their weights
    train.build_optimizers = lambda model, *more: models.append(model) or real_build_optimizers(model, *more)
    threads_before = native_threads()
    train.train(load_config(None, args), progress=False)
    torch.save({"params": models[0].state_dict(), "no_sync": len(no_sync_calls),
                "threads": (threads_before, native_threads())}, f"{out}/rank{rank}.pt")


def run_ddp(tmp_path, args: list[str], world_size: int = 2) -> list[dict]:
    mp.start_processes(worker, args=(world_size, free_port(), args, str(tmp_path)), nprocs=world_size,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


@pytest.mark.slow  # real gloo processes; .ci/run runs the slow suite too
@pytest.mark.parametrize("micro", [0, 2])  # 0: 4 sequences at once per process; 2: two micro-steps of 2 (no_sync)
def test_two_gloo_processes_match_one_process(micro, tiny_dataset, tmp_path):
    train.train(load_config(None, overrides(tiny_dataset, tmp_path / "single")), progress=False)
    single = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    ranks = run_ddp(tmp_path, overrides(tiny_dataset, tmp_path / "ddp", f"micro_batch_size={micro}"))

    for name, tensor in ranks[0]["params"].items():
        assert torch.equal(tensor, ranks[1]["params"][name]), f"ranks out of sync at {name}"
    for name, tensor in single.items():
        torch.testing.assert_close(ranks[0]["params"][name], tensor, atol=1e-5, rtol=1e-4)

    one, two = records(tmp_path / "single"), records(tmp_path / "ddp")  # rank 0 alone wrote these
    assert [r["step"] for r in two] == list(range(STEPS + 1))
    for a, b in zip(one, two):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        if a["loss"] is not None:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # the mean over both processes
    # with two micro-steps per step, the first of each step skipped the all-reduce
    assert [r["no_sync"] for r in ranks] == [STEPS if micro else 0] * 2
    # by the time train() returns, the process group is freed and its threads are joined
    for r in ranks:
        before, after = r["threads"]
        assert after == before, f"{after - before} native thread(s) outlived train()"
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]


@pytest.mark.slow
def test_torchrun_command_line(tiny_dataset, tmp_path):
    """The command a user types, with torchrun itself starting the processes."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "train.py", "--no-progress", *overrides(tiny_dataset, tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("step      8:") == 1  # only rank 0 logs
    assert "2 process(es)" in result.stdout


MUON = ["optimizer=muon", "muon_lr=0.05"]


@pytest.mark.slow  # 5 s: two spawned processes
def test_muon_under_two_gloo_processes_matches_one_process(tiny_dataset, tmp_path):
    train.train(load_config(None, overrides(tiny_dataset, tmp_path / "single", *MUON)), progress=False)
    single = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    ranks = run_ddp(tmp_path, overrides(tiny_dataset, tmp_path / "ddp", *MUON, "micro_batch_size=2"))
    for name, tensor in ranks[0]["params"].items():
        assert torch.equal(tensor, ranks[1]["params"][name]), f"ranks out of sync at {name}"
    for name, tensor in single.items():
        torch.testing.assert_close(ranks[0]["params"][name], tensor, atol=1e-4, rtol=1e-3)
    for a, b in zip(records(tmp_path / "single"), records(tmp_path / "ddp")):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
