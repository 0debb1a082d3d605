"""Train a GPT on a prepared dataset.

    python train.py --config configs/shakespeare_char.toml [KEY=VALUE ...]
    python train.py --config configs/shakespeare_char.toml --resume     # go on from <out_dir>/last.pt
    torchrun --nproc_per_node=8 train.py --config configs/gpt2_124m.toml
    python train.py --plot out/shakespeare_char                        # loss curves -> loss.png

The loop, as a story: read the dataset's meta and memory-map its splits; build the
model from the config (vocab size from the data); AdamW with weight decay on the 2-D
weights only, or Muon for the blocks' matrices beside it (model/optim.py). Each step reads its batch (``batch_size`` windows, split over torchrun
processes and then into micro-batches whose gradients add up), computes the loss,
back-propagates, clips the gradient norm and steps at the learning rate of a
linear-warmup-then-cosine schedule. Every ``eval_interval`` steps it measures train
and val loss on the same held-out windows, appends a line to metrics.jsonl, and saves
``last.pt`` (and ``best.pt`` when val improved).

Every random draw of step s comes from generators seeded with (seed, s, ...), so the
run is a function of its config alone: a resumed run repeats exactly what the
uninterrupted one would have done. Ctrl-C or SIGTERM saves ``last.pt`` after the
current step and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import distributed
from model.checkpoint import copy_checkpoint, load_checkpoint, remove_stale_temporaries, save_checkpoint
from model.cli import run_cli
from model.config import Config, ModelConfig, TrainConfig, config_differences, config_tables, load_config
from model.data import (
    check_batch_fits, check_split_length, open_split, read_meta, read_windows, sample_starts, to_device,
)
from model.device import Precision, use_tensor_cores
from model.distributed import Distributed, gradient_sync
from model.errors import UserError
from model.gpt import GPT
from model.optim import Optimizers, build_optimizers
from model.score import bits_per_byte, token_byte_lengths
from model.tokenizer import tokenizer_from_state
from model.perf import flops_per_token, peak_flops

# Independent random streams, each seeded with (train.seed, stream, ...): see stream_seed.
BATCH_STREAM, EVAL_STREAM, DROPOUT_STREAM = 0, 1, 2


def stream_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed for the random stream named by ``numbers``
    (e.g. seed, BATCH_STREAM, step): nearby names give unrelated streams."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def learning_rate_at(step: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """Linear warmup to the peak over ``warmup_iters`` steps, then cosine decay to ``min_lr``.

    The decay runs from step warmup_iters to step ``lr_decay_iters`` (0: ``max_iters``) and
    stays at min_lr after. In a time-budgeted run (``time_fraction`` = training seconds so
    far / max_seconds) it follows the fraction of the budget spent instead.
    """
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if time_fraction is not None:
        progress = time_fraction
    else:
        decay_iters = cfg.lr_decay_iters or cfg.max_iters
        progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # 1 -> 0
    return cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)


def split_batch(batch_size: int, micro_batch_size: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, micro-steps per optimiser step) for one process: each of the
    ``world_size`` processes takes batch_size / world_size sequences of every batch, in
    micro-batches of ``micro_batch_size`` (0: all of them at once)."""
    if batch_size % world_size:
        raise UserError(
            f"train.batch_size ({batch_size}) must be a multiple of the number of processes ({world_size})"
        )
    share = batch_size // world_size
    micro = micro_batch_size or share
    if share % micro:
        raise UserError(
            f"gradient accumulation needs equal micro-batches: train.batch_size ({batch_size}) is not a multiple "
            f"of micro_batch_size ({micro}) x {world_size} process(es) = {micro * world_size}"
        )
    return micro, share // micro


def resolve_vocab_size(cfg: Config, meta: dict) -> Config:
    """The model's vocabulary comes from the dataset, rounded up to ``vocab_multiple``
    (the extra ids are never sampled); a config that names fewer tokens is an error."""
    data_vocab = int(meta["vocab_size"])
    vocab = cfg.model.vocab_size
    if vocab == 0:
        vocab = -(-data_vocab // cfg.model.vocab_multiple) * cfg.model.vocab_multiple
    elif vocab < data_vocab:
        raise UserError(
            f"model.vocab_size is {vocab} but the dataset's tokenizer has {data_vocab} tokens; "
            "leave model.vocab_size at 0 to take it from the data"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def check_same_model(checkpoint: dict, cfg: Config) -> None:
    """Resuming needs the checkpoint's network: name every setting that differs."""
    saved = dataclasses.asdict(ModelConfig(**checkpoint["config"]["model"]))
    differences = config_differences(saved, dataclasses.asdict(cfg.model))
    if differences:
        raise UserError(
            "cannot resume: the model config differs from the checkpoint's (checkpoint -> now): "
            + "; ".join(f"model.{d}" for d in differences)
            + ". Resume with the checkpoint's model settings (leave out --config), or train into a new out_dir"
        )


class Batches:
    """Which windows each process reads at each step.

    Step s draws ``batch_size`` window starts from a generator seeded with (seed, s);
    process r takes the r-th equal share and splits it into micro-batches. The whole
    batch is therefore the same however many processes and micro-steps share it.
    """

    def __init__(self, tokens: np.ndarray, cfg: Config, ddp: Distributed, micro_batch: int):
        self.tokens = tokens
        self.seed = cfg.train.seed
        self.batch_size = cfg.train.batch_size
        self.block_size = cfg.model.block_size
        self.share = self.batch_size // ddp.world_size
        self.first = ddp.rank * self.share
        self.micro_batch = micro_batch

    def at(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(stream_seed(self.seed, BATCH_STREAM, step))
        starts = sample_starts(len(self.tokens), self.block_size, self.batch_size, generator)
        mine = starts[self.first : self.first + self.share]
        return [read_windows(self.tokens, chunk, self.block_size) for chunk in mine.split(self.micro_batch)]


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module, splits: dict[str, np.ndarray], cfg: Config, micro_batch: int, ddp: Distributed,
    device: torch.device, precision: Precision, byte_lengths: torch.Tensor,
) -> dict[str, float]:
    """Mean loss per split over ``eval_iters x batch_size`` windows: the same windows every
    time (their own seeded generator, untouched by training), so evaluations compare like
    with like. The windows go in micro-batches, shared round-robin among the processes.
    Also "<split>_bpb": the same nats in bits per byte of the text (``byte_lengths``, see
    model/score.py), which compare across tokenizers."""
    model.eval()
    losses = {}
    for split, tokens in splits.items():
        generator = torch.Generator().manual_seed(stream_seed(cfg.train.seed, EVAL_STREAM))
        starts = sample_starts(len(tokens), cfg.model.block_size, cfg.train.eval_iters * cfg.train.batch_size,
                               generator)
        total = torch.zeros((), dtype=torch.float64, device=device)
        num_bytes = torch.zeros((), dtype=torch.float64, device=device)
        for chunk in starts.split(micro_batch)[ddp.rank :: ddp.world_size]:
            x, y = to_device(read_windows(tokens, chunk, cfg.model.block_size), device)
            with precision.autocast():
                _, loss = model(x, y)
            total += loss.double() * len(chunk)  # the loss is a mean over the chunk's tokens
            num_bytes += byte_lengths[y].sum()
        losses[split] = ddp.sum(total).item() / len(starts)
        losses[f"{split}_bpb"] = bits_per_byte(losses[split] * len(starts) * cfg.model.block_size,
                                               ddp.sum(num_bytes).item())
    model.train()
    return losses


def train_step(
    model: torch.nn.Module, raw_model: GPT, optimizer: Optimizers, scaler: torch.amp.GradScaler,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig, device: torch.device,
    precision: Precision,
) -> tuple[float, float]:
    """One optimiser step over the micro-batches (their gradients add up; each loss is
    divided by their number, so the sum is the gradient of the mean). Returns this
    process's mean loss and the global gradient norm before clipping."""
    count = len(micro_batches)
    total_loss = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):
        x, y = to_device(batch, device)
        with gradient_sync(model, last_micro_step=index == count - 1):
            with precision.autocast():
                _, loss = model(x, y)
            scaler.scale(loss / count).backward()
        total_loss += loss.detach()
    optimizer.unscale_(scaler)  # true gradients for the norm (a no-op without fp16 scaling)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
    optimizer.step(scaler)
    optimizer.zero_grad()
    return total_loss.item() / count, grad_norm.item()


def compile_model(model: GPT, trial: Callable[[torch.nn.Module], None], log: Callable[[str], None]) -> torch.nn.Module:
    """torch.compile the model, or say why not and keep the plain one. Compilation happens
    lazily on the first call, so ``trial`` runs one forward and backward to surface errors
    (no compiler, an unsupported Python or platform) here rather than mid-training."""
    try:
        compiled = torch.compile(model)
        trial(compiled)
    except Exception as error:  # torch.compile fails in many ways; every one means "run plain"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log(f"note: torch.compile is not available here ({type(error).__name__}: {reason[:200]}); "
            "training without it")
        return model
    log("compiled the model with torch.compile")
    return compiled


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM only note their arrival; the loop checks
    between steps, saves a checkpoint and returns. A second signal of the same kind gets
    its usual effect back (a second Ctrl-C aborts at once; the last checkpoint survives,
    as saves are atomic). Handlers can only be set from the main thread; elsewhere this
    does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@dataclasses.dataclass
class Progress:
    """Where training stands; what a checkpoint must carry to go on exactly."""

    step: int = 0  # optimiser steps done
    best_val: float = float("inf")
    train_seconds: float = 0.0  # time spent in training steps (evaluations and saves excluded)
    evaluated: bool = False  # whether the evaluation at ``step`` was done (and logged)


class Window:
    """Training statistics since the last metrics line: mean loss, gradient norm, speed."""

    def __init__(self):
        self.steps, self.loss, self.grad_norm, self.seconds = 0, 0.0, 0.0, 0.0

    def add(self, loss: float, grad_norm: float, seconds: float) -> None:
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm
        self.seconds += seconds


def train(cfg: Config, *, progress: bool = True, checkpoint: dict | None = None) -> dict[str, Any]:
    """Run one training job, alone or as one process of a torchrun job.

    checkpoint: a payload from load_checkpoint to resume from (model, optimiser, step,
    best val loss, schedule position); its model config must equal ``cfg.model``.
    Returns the final losses, the step reached, ``interrupted`` (the signal's name, or
    None), where the checkpoints are, and the trained ``model``.
    """
    ddp = distributed.from_environment()
    device = distributed.device_for_process(cfg.train.device, ddp)
    distributed.start(ddp, device)
    try:
        return _train(cfg, ddp, device, progress and ddp.is_main, checkpoint)
    finally:
        distributed.stop(ddp)


def _train(cfg: Config, ddp: Distributed, device: torch.device, progress: bool, checkpoint: dict | None) -> dict:
    tc = cfg.train
    meta = read_meta(tc.data_dir)
    cfg = resolve_vocab_size(cfg, meta)
    if checkpoint is not None:
        check_same_model(checkpoint, cfg)
    splits = {split: open_split(tc.data_dir, split, meta) for split in ("train", "val")}
    byte_lengths = token_byte_lengths(tokenizer_from_state(meta["tokenizer"]), cfg.model.vocab_size).to(device)
    for split, tokens in splits.items():
        check_split_length(tokens, cfg.model.block_size, split)
    check_batch_fits(splits["train"], tc.batch_size, cfg.model.block_size, "train")
    micro_batch, micro_steps = split_batch(tc.batch_size, tc.micro_batch_size, ddp.world_size)

    torch.manual_seed(tc.seed)  # the same initial weights in every process
    use_tensor_cores(device)
    raw_model = GPT(cfg.model).to(device)
    optimizer = build_optimizers(raw_model, tc, device)
    precision = Precision.for_device(device)
    scaler = precision.grad_scaler()
    state = Progress()
    if checkpoint is not None:
        if checkpoint["optimizer"] is None:
            raise UserError("cannot resume: the checkpoint has no optimizer state (an export for sampling)")
        raw_model.load_state_dict(checkpoint["model"])
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError as error:  # e.g. saved with optimizer = "adamw", resumed with "muon"
            raise UserError(f"cannot resume: {error}; resume with the checkpoint's train.optimizer") from None
        extra = checkpoint["extra"]  # empty in checkpoints of the first train.py: start those afresh
        if extra.get("scaler"):  # empty when saved without fp16 scaling (CPU, bf16)
            scaler.load_state_dict(extra["scaler"])
        state = Progress(checkpoint["step"], checkpoint["best_val_loss"], extra.get("train_seconds", 0.0),
                         extra.get("evaluated", True))

    log = (tqdm.write if progress else print) if ddp.is_main else (lambda message: None)
    batches = Batches(splits["train"], cfg, ddp, micro_batch)
    model: torch.nn.Module = raw_model
    if tc.compile:
        def trial(compiled: torch.nn.Module) -> None:
            with precision.autocast():
                _, loss = compiled(*to_device(batches.at(state.step)[0], device))
            loss.backward()
            raw_model.zero_grad(set_to_none=True)
        model = compile_model(raw_model, trial, log)
    train_model = model
    if ddp.enabled:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    out_dir = Path(tc.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        if checkpoint is None:
            clear_earlier_run(out_dir)
        start_metrics(metrics_path, state.step if checkpoint is not None else None)

    tokens_per_step = tc.batch_size * cfg.model.block_size
    flops_token = flops_per_token(cfg.model, raw_model.num_params())
    peak, peak_source = peak_flops(device, tc.peak_tflops)
    log(
        f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {cfg.model.n_layer} layers, {cfg.model.n_head} "
        f"heads, width {cfg.model.n_embd}, context {cfg.model.block_size}, vocab {cfg.model.vocab_size}, "
        f"{cfg.model.position} positions, {cfg.model.norm} | data: {len(splits['train']):,} train / "
        f"{len(splits['val']):,} val tokens"
    )
    log(
        f"batch: {tc.batch_size} x {cfg.model.block_size} = {tokens_per_step:,} tokens per step = {ddp.world_size} "
        f"process(es) x {micro_steps} micro-step(s) x {micro_batch} sequences | device {device} "
        f"({str(precision.dtype).removeprefix('torch.')}) | MFU against {peak_source}, "
        f"{flops_token / 1e6:.1f} MFLOP per token"
    )
    if checkpoint is not None:
        log(f"resumed from step {state.step} (best val loss {state.best_val:.4f})")

    def save(name: str) -> None:
        if ddp.is_main:
            save_checkpoint(
                out_dir / name, model=raw_model, optimizer=optimizer, config=cfg.to_dict(),
                tokenizer=meta["tokenizer"], step=state.step, best_val_loss=state.best_val,
                extra={"scaler": scaler.state_dict(), "train_seconds": state.train_seconds,
                       "evaluated": state.evaluated},
            )

    def mfu(tokens_per_s: float) -> float | None:
        return flops_token * tokens_per_s / (peak * ddp.world_size) if peak else None

    def time_fraction() -> float | None:
        return state.train_seconds / tc.max_seconds if tc.max_seconds else None

    started = time.perf_counter()

    def evaluate_and_save(window: Window) -> dict[str, float]:
        losses = estimate_loss(model, splits, cfg, micro_batch, ddp, device, precision, byte_lengths)
        window_loss = ddp.sum(torch.tensor(window.loss, dtype=torch.float64, device=device)).item() / ddp.world_size
        tokens_per_s = window.steps * tokens_per_step / window.seconds if window.steps else None
        record = {
            "step": state.step, "lr": learning_rate_at(state.step, tc, time_fraction()),
            "train_loss": losses["train"], "val_loss": losses["val"], "val_bpb": losses["val_bpb"],
            "loss": window_loss / window.steps if window.steps else None,
            "grad_norm": window.grad_norm / window.steps if window.steps else None,
            "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s) if tokens_per_s else None,
            "train_seconds": state.train_seconds, "elapsed_s": time.perf_counter() - started,
        }
        state.evaluated = True
        if ddp.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        log(f"step {state.step:>6}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
            f"({losses['val_bpb']:.4f} bits per byte)")
        if state.step > 0:
            improved = losses["val"] < state.best_val
            state.best_val = min(state.best_val, losses["val"])
            save("last.pt")
            if improved and ddp.is_main:
                copy_checkpoint(out_dir / "last.pt", out_dir / "best.pt")
        return losses

    bar = tqdm(total=None if tc.max_seconds else tc.max_iters, initial=state.step, desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    losses: dict[str, float] = {}
    window = Window()
    with StopSignals() as signals:
        while True:
            finished = state.step >= tc.max_iters or (tc.max_seconds > 0 and state.train_seconds >= tc.max_seconds)
            if (finished or state.step % tc.eval_interval == 0) and not state.evaluated:
                losses = evaluate_and_save(window)
                window = Window()
            if finished:
                break

            step_started = time.perf_counter()
            lr = learning_rate_at(state.step, tc, time_fraction())
            optimizer.set_lr_factor(lr / tc.learning_rate)  # every optimiser's peak follows the schedule
            torch.manual_seed(stream_seed(tc.seed, DROPOUT_STREAM, state.step, ddp.rank))
            loss, grad_norm = train_step(train_model, raw_model, optimizer, scaler, batches.at(state.step), tc,
                                         device, precision)
            seconds = time.perf_counter() - step_started
            if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not scaler.is_enabled()):
                bar.close()
                raise UserError(divergence_message(state.step, loss, grad_norm, lr, precision, out_dir))
            window.add(loss, grad_norm, seconds)
            # Every process must stop after the same step and follow the same clock.
            interrupted, state.train_seconds = ddp.agree_max(
                [float(signals.received is not None), state.train_seconds + seconds], device
            )
            state.step += 1
            state.evaluated = False
            rate = window.steps * tokens_per_step / window.seconds
            utilisation = mfu(rate)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val_bpb=f"{losses['val_bpb']:.3f}" if losses else "-",
                            lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}",
                            mfu=f"{utilisation:.1%}" if utilisation else "-", refresh=False)
            if interrupted:
                save("last.pt")
                bar.close()
                log(f"stopped by {signals.received or 'a signal to another process'} after step {state.step}: "
                    f"saved {out_dir / 'last.pt'}; continue with --resume")
                return result(cfg, state, losses, raw_model, interrupted=signals.received or "signal")
    bar.close()
    log(f"done at step {state.step}: best val loss {state.best_val:.4f} in {out_dir / 'best.pt'}, "
        f"latest in {out_dir / 'last.pt'}")
    return result(cfg, state, losses, raw_model, interrupted=None)


def divergence_message(step: int, loss: float, grad_norm: float, lr: float, precision: Precision,
                       out_dir: Path) -> str:
    """Why training stopped on a non-finite number. Under fp16 a non-finite gradient alone
    is routine (the gradient scaler skips that step and lowers its scale), so only the
    loss counts there. Nothing is saved after this: the last checkpoint stays as it was."""
    if precision.dtype == torch.float16:
        cause = "fp16 overflow in the forward pass (bf16 or fp32 has the range), or too high a learning rate"
    else:
        cause = f"too high a learning rate ({lr:.3g} at this step; lower train.learning_rate) or a bad batch"
    kept = out_dir / "last.pt"
    checkpoint = f"{kept} is left as it was" if kept.is_file() else "no checkpoint was written"
    return (f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; likely cause: {cause}; "
            f"{checkpoint}")


def result(cfg: Config, state: Progress, losses: dict, model: GPT, interrupted: str | None) -> dict[str, Any]:
    return {
        "train_loss": losses.get("train"), "val_loss": losses.get("val"), "val_bpb": losses.get("val_bpb"),
        "best_val_loss": state.best_val,
        "step": state.step, "interrupted": interrupted, "out_dir": cfg.train.out_dir, "model": model,
    }


def start_metrics(path: Path, resumed_step: int | None) -> None:
    """A new run starts an empty metrics.jsonl. A resumed one keeps the lines up to the step
    it resumes from and drops later ones, written after that checkpoint by the run that
    was stopped: they are about to be written again. So is a line that does not parse
    (one cut short when that run was killed mid-write)."""
    kept = []
    if resumed_step is not None and path.is_file():
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resumed_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _step_of(metrics_line: str) -> float:
    """The step a metrics line records; infinity for a line that is not a whole record."""
    try:
        return json.loads(metrics_line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def clear_earlier_run(out_dir: Path) -> None:
    """A new run replaces whatever an earlier run left in ``out_dir`` before its first step
    (and only once its config and data have checked out), so a new run stopped early
    never leaves the old run's best.pt beside its own last.pt. best.pt goes first: an
    interruption in between leaves no best.pt rather than a best.pt newer than last.pt."""
    for name in ("best.pt", "last.pt", "loss.png"):
        (out_dir / name).unlink(missing_ok=True)


def check_fresh_out_dir(out_dir: Path) -> None:
    """A new run must not silently replace an earlier run's checkpoints and metrics."""
    earlier = [name for name in ("last.pt", "best.pt") if (out_dir / name).is_file()]
    if earlier:
        raise UserError(
            f"{out_dir} holds an earlier run ({', '.join(earlier)}); continue it with --resume, start afresh "
            "with --overwrite, or set another out_dir"
        )


def out_dir_of(config_path: Path | None, overrides: list[str]) -> Path:
    """The out_dir the config file and overrides name (the default when neither does)."""
    return Path(str(config_tables(config_path, overrides)["train"].get("out_dir", TrainConfig.out_dir)))


def load_resume_checkpoint(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "last.pt"
    if not path.is_file():
        raise UserError(f"--resume: there is no {path} to resume from; train once without --resume")
    return load_checkpoint(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a GPT on a dataset prepared by data/prepare.py.",
        epilog="Overrides: KEY=VALUE with KEY as section.field or field, e.g. "
        "model.n_layer=6 max_iters=500 learning_rate=3e-4 device=cpu. "
        "Several processes (CPU or GPUs): torchrun --nproc_per_node=N train.py ...",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML file with [model] and [train] tables "
                        "(default: the built-in defaults, or the checkpoint's config with --resume)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps (overrides train.device)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile=true)")
    parser.add_argument("--resume", action="store_true",
                        help="go on from <out_dir>/last.pt: weights, optimiser, step, schedule, best val loss")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even if out_dir holds an earlier run: its checkpoints, metrics "
                        "and plot are removed once the new run's config and data check out")
    parser.add_argument("--plot", type=Path, metavar="RUN_DIR", default=None,
                        help="only draw RUN_DIR/metrics.jsonl as RUN_DIR/loss.png (needs matplotlib) and exit")
    parser.add_argument("--no-progress", action="store_true", help="print plain lines instead of a progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied in order")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # KEY=VALUE on both sides of a flag
    return run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    overrides += ["train.compile=true"] if args.compile else []
    if args.plot is not None:
        from model.plot import plot_run

        print(f"wrote {plot_run(args.plot)}")
        return
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in out_dir and --overwrite replaces it; choose one")
    checkpoint = None
    if args.resume:
        # The run's own config (the checkpoint's, unless --config names one) is the base the
        # overrides apply to, so they are validated against it, not against the defaults.
        checkpoint = load_resume_checkpoint(out_dir_of(args.config, overrides))
        cfg = load_config(args.config, overrides, base=None if args.config else checkpoint["config"])
    else:
        cfg = load_config(args.config, overrides)
        if not args.overwrite:
            check_fresh_out_dir(Path(cfg.train.out_dir))
    train(cfg, progress=not args.no_progress, checkpoint=checkpoint)


if __name__ == "__main__":
    sys.exit(main())
