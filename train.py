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

The file reads top to bottom: the schedule and the checks, the pieces of a step and of an
evaluation, the run folder's bookkeeping, setup, then the loop itself (``_train``) and
the command line.
"""

from __future__ import annotations

import argparse
import ctypes
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
from model.checkpoint import (
    Checkpoint, adopt_init_shape, copy_checkpoint, load_init_from, read_checkpoint, remove_stale_temporaries,
    save_checkpoint,
)
from model.cli import run_cli
from model.config import (
    Config, ModelConfig, TrainConfig, config_differences, config_from_dict, config_tables,
)
from model.data import (
    check_batch_fits, check_split_length, check_token_ids, open_split, read_meta, read_windows, sample_starts,
    split_file, to_device,
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
TRAINING_BYTES_PER_PARAM = 16  # fp32 weight, gradient and AdamW's two moments
# What train.py keeps in a checkpoint's extra, and the types it may have.
RESUME_EXTRA: dict[str, tuple[type, ...]] = {"scaler": (dict,), "train_seconds": (float, int), "evaluated": (bool,)}


def stream_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed for the random stream named by ``numbers``
    (e.g. seed, BATCH_STREAM, step): nearby names give unrelated streams."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def lr_factor_at(step: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """The learning rate at ``step`` as a factor of the peak: every optimiser's rate follows it.

    Linear warmup to 1 over ``warmup_iters`` steps, then cosine decay to min_lr / learning_rate.
    The decay runs from step warmup_iters to step ``lr_decay_iters`` (0: ``max_iters``) and
    stays at the floor after. In a time-budgeted run (``time_fraction`` = training seconds so
    far / max_seconds) it follows the fraction of the budget spent instead.
    """
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    if time_fraction is not None:
        decayed = time_fraction
    else:
        decay_iters = cfg.lr_decay_iters or cfg.max_iters
        decayed = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(decayed, 1.0)))  # 1 -> 0
    floor = cfg.min_lr / cfg.learning_rate
    return floor + cosine * (1.0 - floor)


def learning_rate_at(step: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """The (AdamW) learning rate at ``step``, as logged: the peak times lr_factor_at."""
    return cfg.learning_rate * lr_factor_at(step, cfg, time_fraction)


def time_fraction(tc: TrainConfig, state: RunState) -> float | None:
    """The share of a time budget spent (None without one): where its LR schedule stands."""
    return state.train_seconds / tc.max_seconds if tc.max_seconds else None


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


def check_same_tokenizer(checkpoint: Checkpoint, meta: dict, data_dir: str) -> None:
    """Resuming needs the data the run was trained on: token ids mean nothing under another
    tokenizer, even one with as many tokens (the checkpoint would be saved with the new one)."""
    if checkpoint.tokenizer != meta["tokenizer"]:
        raise UserError(
            f"cannot resume: {data_dir} was prepared with another tokenizer than the checkpoint's "
            f"({meta.get('tokenizer_name', '?')}); resume on the dataset the run was trained on, "
            "or train into a new out_dir"
        )


def check_same_model(checkpoint: Checkpoint, cfg: Config) -> None:
    """Resuming needs the checkpoint's network: name every setting that differs."""
    saved = dataclasses.asdict(checkpoint.config.model)
    differences = config_differences(saved, dataclasses.asdict(cfg.model))
    if differences:
        raise UserError(
            "cannot resume: the model config differs from the checkpoint's (checkpoint -> now): "
            + "; ".join(f"model.{d}" for d in differences)
            + ". Resume with the checkpoint's model settings (leave out --config), or train into a new out_dir"
        )


def check_work_left(checkpoint: Checkpoint, tc: TrainConfig) -> None:
    """A resume that would train no step is an error saying which limit ends the run
    (a time-budgeted run stays finished however large max_iters is)."""
    step, seconds = checkpoint.step, checkpoint.extra["train_seconds"]
    if not checkpoint.extra["evaluated"]:
        return  # the final evaluation and save are still to do
    if tc.max_seconds and seconds >= tc.max_seconds:
        raise UserError(
            f"cannot resume: the run's time budget is spent ({seconds:.1f} s trained of train.max_seconds = "
            f"{tc.max_seconds:g}, at step {step}), so a larger max_iters trains nothing; "
            "raise train.max_seconds to go on"
        )
    if step >= tc.max_iters:
        raise UserError(f"cannot resume: the run already ended at step {step} (train.max_iters = {tc.max_iters}); "
                        "raise train.max_iters to go on")


def check_resume_extra(checkpoint: Checkpoint) -> None:
    """What train.py keeps in a checkpoint's extra, present and of its type."""
    extra, path = checkpoint.extra, checkpoint.path
    missing = [key for key in RESUME_EXTRA if key not in extra]
    if missing:
        raise UserError(f"cannot resume: {path} lacks what train.py saves to go on ({', '.join(missing)})")
    for key, kinds in RESUME_EXTRA.items():
        if not isinstance(extra[key], kinds) or (isinstance(extra[key], bool) and bool not in kinds):
            raise UserError(f"cannot resume: {path} has a wrong {key} ({type(extra[key]).__name__})")


def initial_model(cfg: Config, meta: dict, resuming: bool) -> GPT:
    """The network training starts from: fresh weights, or those of train.init_from
    (unless resuming: the checkpoint has newer ones)."""
    if not cfg.train.init_from or resuming:
        return GPT(cfg.model)
    return load_init_from(cfg, meta)


def in_memory(build: Callable[[], GPT], cfg: ModelConfig, device: torch.device) -> GPT:
    """The network ``build`` makes, on ``device``; one that does not fit in memory is a
    one-line error saying how much its weights, gradients and AdamW state need."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        params = sum(p.numel() for p in GPT(cfg).parameters())
    needed = f"{params / 1e6:,.0f}M parameters need about {params * TRAINING_BYTES_PER_PARAM / 2**30:,.1f} GiB " \
             f"for weights, gradients and AdamW state ({TRAINING_BYTES_PER_PARAM} bytes each)"
    try:
        return build().to(device)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "memory" not in str(error):
            raise
        raise UserError(f"the model does not fit in {device} memory: {needed}; choose a smaller model") from None


def resume_from(checkpoint: Checkpoint, model: GPT, optimizer: Optimizers,
                scaler: torch.amp.GradScaler) -> RunState:
    """Load a checkpoint's weights, optimiser and scaler state; where its run stood."""
    extra = checkpoint.extra
    model.load_state_dict(checkpoint.weights)
    try:
        optimizer.load_state_dict(checkpoint.optimizer)
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot resume: the checkpoint's optimizer state does not fit the model ({error})") from None
    if extra["scaler"]:  # empty when saved without fp16 scaling (CPU, bf16)
        scaler.load_state_dict(extra["scaler"])
    return RunState(checkpoint.step, checkpoint.best_val_loss, extra["train_seconds"], extra["evaluated"])


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


class RunFolder:
    """A run's files in out_dir (last.pt, best.pt, metrics.jsonl, loss.png) and the rules
    that keep them consistent through new runs, resumes and kills. Only the main process
    writes here."""

    def __init__(self, path: Path):
        self.path = path
        self.last, self.best, self.metrics = path / "last.pt", path / "best.pt", path / "metrics.jsonl"

    def check_fresh(self) -> None:
        """A new run must not silently replace an earlier run's checkpoints and metrics."""
        earlier = [path.name for path in (self.last, self.best) if path.is_file()]
        if earlier:
            raise UserError(
                f"{self.path} holds an earlier run ({', '.join(earlier)}); continue it with --resume, start afresh "
                "with --overwrite, or set another out_dir"
            )

    def load_resume(self) -> Checkpoint:
        """last.pt, with everything train.py saves to go on from it."""
        if not self.last.is_file():
            raise UserError(f"--resume: there is no {self.last} to resume from; train once without --resume")
        checkpoint = read_checkpoint(self.last)
        if checkpoint.optimizer is None:
            raise UserError(f"cannot resume: {self.last} has no optimizer state (an export for sampling)")
        check_resume_extra(checkpoint)
        return checkpoint

    def prepare(self, resumed: Checkpoint | None, log: Callable[[str], None]) -> None:
        """Ready the folder once the config and data have checked out: a new run clears the
        earlier one, a resumed one repairs best.pt; either way the metrics start over from
        where the run stands."""
        self.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        if resumed is None:
            self.clear()
        else:
            self.repair_best(resumed, log)
        self.start_metrics(None if resumed is None else resumed.step)

    def clear(self) -> None:
        """A new run replaces whatever an earlier run left here before its first step, so a
        new run stopped early never leaves the old run's best.pt beside its own last.pt.
        best.pt goes first: an interruption in between leaves no best.pt rather than a
        best.pt newer than last.pt."""
        for path in (self.best, self.last, self.path / "loss.png"):
            path.unlink(missing_ok=True)

    def repair_best(self, last: Checkpoint, log: Callable[[str], None]) -> None:
        """Make best.pt hold the best weights again after a kill between saving an improved
        last.pt and copying it to best.pt. last.pt's best val loss is then lower than
        best.pt's, and last.pt has the best weights exactly when its own evaluation (its
        metrics line) measured that loss; otherwise they are lost, which is said."""
        target = last.best_val_loss
        if target == math.inf:  # no evaluation after step 0 yet: no best.pt is due
            return
        if self.best.is_file() and (os.path.samefile(self.best, self.last)
                                    or read_checkpoint(self.best).best_val_loss == target):
            return
        state = "missing" if not self.best.is_file() else "behind last.pt"
        if self.val_loss_at(last.step) == target:
            self.promote_last()
            log(f"{self.best} was {state} (a save was cut short): made it a copy of last.pt, step {last.step}, "
                f"val loss {target:.4f}")
        else:
            log(f"warning: {self.best} is {state} and the weights of the best val loss {target:.4f} were not kept; "
                "best.pt is not the best model of this run")

    def promote_last(self) -> None:
        """best.pt becomes a copy of last.pt (atomically; a hard link where it can)."""
        copy_checkpoint(self.last, self.best)

    def start_metrics(self, resumed_step: int | None) -> None:
        """A new run starts an empty metrics.jsonl. A resumed one keeps the lines up to the step
        it resumes from and drops later ones, written after that checkpoint by the run that
        was stopped: they are about to be written again. So is a line that does not parse
        (one cut short when that run was killed mid-write)."""
        kept = []
        if resumed_step is not None and self.metrics.is_file():
            kept = [line for line in self.metrics.read_text().splitlines() if _step_of(line) <= resumed_step]
        tmp = self.metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def val_loss_at(self, step: int) -> float | None:
        """The val loss the metrics line of ``step`` records; None without such a line."""
        lines = [line for line in self.metrics.read_text().splitlines() if _step_of(line) == step] \
            if self.metrics.is_file() else []
        return json.loads(lines[-1])["val_loss"] if lines else None


def _step_of(metrics_line: str) -> float:
    """The step a metrics line records; infinity for a line that is not a whole record."""
    try:
        return json.loads(metrics_line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


@dataclasses.dataclass
class RunState:
    """Where training stands; what a checkpoint must carry to go on exactly."""

    step: int = 0  # optimiser steps done
    best_val: float = float("inf")
    train_seconds: float = 0.0  # time spent in training steps (evaluations and saves excluded)
    evaluated: bool = False  # whether the evaluation at ``step`` was done (and logged)


class Tally:
    """Training statistics since the last metrics line: summed loss and gradient norm, speed."""

    def __init__(self):
        self.steps, self.loss, self.grad_norm, self.seconds = 0, 0.0, 0.0, 0.0

    def add(self, loss: float, grad_norm: float, seconds: float) -> None:
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm
        self.seconds += seconds


@dataclasses.dataclass
class Run:
    """Everything the loop works with, built once by ``setup``."""

    cfg: Config  # vocab_size resolved from the data
    ddp: Distributed
    device: torch.device
    precision: Precision
    model: GPT  # the network itself: what is saved, clipped and counted
    train_model: torch.nn.Module  # what steps run through: the model, compiled and/or wrapped in DDP
    eval_model: torch.nn.Module  # the model, compiled when asked, never wrapped in DDP
    optimizer: Optimizers
    scaler: torch.amp.GradScaler
    splits: dict[str, np.ndarray]
    batches: Batches
    micro_batch: int
    tokenizer: dict[str, Any]  # the dataset's tokenizer state, saved in every checkpoint
    folder: RunFolder
    log: Callable[[str], None]
    flops_per_token: float
    peak_flops: float | None  # one device's peak FLOP/s; None: unknown, no MFU
    started: float  # time.perf_counter() at the start of the loop
    byte_lengths: torch.Tensor  # UTF-8 bytes per token id, for bits per byte (model/score.py)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.model.block_size


@dataclasses.dataclass
class Result:
    """What a finished (or stopped) run reports."""

    step: int
    train_loss: float | None  # from the last evaluation; None when there was none
    val_loss: float | None
    val_bpb: float | None  # the last evaluation's val loss in bits per byte
    best_val_loss: float
    interrupted: str | None  # the signal that stopped the run, or None when it finished
    out_dir: str
    num_params: int
    device: str


def setup(cfg: Config, ddp: Distributed, device: torch.device, progress: bool,
          checkpoint: Checkpoint | None) -> tuple[Run, RunState]:
    """Check the data against the config, build the model and optimiser (from the
    checkpoint when resuming), prepare out_dir and log what will run."""
    tc = cfg.train
    meta = read_meta(tc.data_dir)
    cfg = resolve_vocab_size(cfg, meta)
    if checkpoint is not None:
        check_same_tokenizer(checkpoint, meta, tc.data_dir)
        check_same_model(checkpoint, cfg)
        check_work_left(checkpoint, tc)
    splits = {split: open_split(tc.data_dir, split, meta) for split in ("train", "val")}
    for split, tokens in splits.items():
        check_split_length(tokens, cfg.model.block_size, split)
        check_token_ids(tokens, cfg.model.vocab_size, split_file(tc.data_dir, split))
    check_batch_fits(splits["train"], tc.batch_size, cfg.model.block_size, "train")
    micro_batch, micro_steps = split_batch(tc.batch_size, tc.micro_batch_size, ddp.world_size)

    torch.manual_seed(tc.seed)  # the same initial weights in every process
    use_tensor_cores(device)
    model = in_memory(lambda: initial_model(cfg, meta, resuming=checkpoint is not None), cfg.model, device)
    optimizer = build_optimizers(model, tc, device)
    precision = Precision.for_device(device)
    scaler = precision.grad_scaler()
    state = RunState() if checkpoint is None else resume_from(checkpoint, model, optimizer, scaler)

    log = (tqdm.write if progress else print) if ddp.is_main else (lambda message: None)
    batches = Batches(splits["train"], cfg, ddp, micro_batch)
    eval_model: torch.nn.Module = model
    if tc.compile:
        def trial(compiled: torch.nn.Module) -> None:
            with precision.autocast():
                _, loss = compiled(*to_device(batches.at(state.step)[0], device))
            loss.backward()
            model.zero_grad(set_to_none=True)
        eval_model = compile_model(model, trial, log)
    train_model = eval_model
    if ddp.enabled:
        train_model = DistributedDataParallel(eval_model, device_ids=[device.index] if device.type == "cuda" else None)

    folder = RunFolder(Path(tc.out_dir))
    if ddp.is_main:
        folder.prepare(checkpoint, log)

    peak, peak_source = peak_flops(device, tc.peak_tflops)
    run = Run(cfg, ddp, device, precision, model, train_model, eval_model, optimizer, scaler, splits, batches,
              micro_batch, meta["tokenizer"], folder, log, flops_per_token(cfg.model, model.num_params()), peak,
              time.perf_counter(),
              token_byte_lengths(tokenizer_from_state(meta["tokenizer"]), cfg.model.vocab_size).to(device))
    log(
        f"model: {model.summary()} | data: {len(splits['train']):,} train / "
        f"{len(splits['val']):,} val tokens"
    )
    log(
        f"batch: {tc.batch_size} x {cfg.model.block_size} = {run.tokens_per_step:,} tokens per step = "
        f"{ddp.world_size} process(es) x {micro_steps} micro-step(s) x {micro_batch} sequences | device {device} "
        f"({str(precision.dtype).removeprefix('torch.')}) | MFU against {peak_source}, "
        f"{run.flops_per_token / 1e6:.1f} MFLOP per token"
    )
    if checkpoint is not None:
        log(f"resumed from step {state.step} (best val loss {state.best_val:.4f})")
    return run, state


def mfu(run: Run, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation: model FLOP/s over the peak of every device in the run; None
    when the peak is unknown, or estimated below what the run reaches (over 100% would
    say the estimate is wrong, not that the run is fast)."""
    if not run.peak_flops:
        return None
    utilisation = run.flops_per_token * tokens_per_s / (run.peak_flops * run.ddp.world_size)
    return utilisation if utilisation <= 1 else None


def save_last(run: Run, state: RunState) -> None:
    """Write last.pt (main process only): weights, optimiser, config, tokenizer, run state."""
    if run.ddp.is_main:
        save_checkpoint(
            run.folder.last, model=run.model, optimizer=run.optimizer, config=run.cfg.to_dict(),
            tokenizer=run.tokenizer, step=state.step, best_val_loss=state.best_val,
            extra={"scaler": run.scaler.state_dict(), "train_seconds": state.train_seconds,
                   "evaluated": state.evaluated},
        )


def evaluate_and_save(run: Run, state: RunState, tally: Tally) -> dict[str, float]:
    """Measure train and val loss, append a metrics line (with the tally of the steps
    since the last one), save last.pt and, when val improved, best.pt as a copy of it."""
    tc, ddp = run.cfg.train, run.ddp
    losses = estimate_loss(run.eval_model, run.splits, run.cfg, run.micro_batch, ddp, run.device, run.precision,
                           run.byte_lengths)
    tally_loss = ddp.sum(torch.tensor(tally.loss, dtype=torch.float64, device=run.device)).item() / ddp.world_size
    tokens_per_s = tally.steps * run.tokens_per_step / tally.seconds if tally.steps else None
    record = {
        "step": state.step, "lr": learning_rate_at(state.step, tc, time_fraction(tc, state)),
        "train_loss": losses["train"], "val_loss": losses["val"], "val_bpb": losses["val_bpb"],
        "loss": tally_loss / tally.steps if tally.steps else None,
        "grad_norm": tally.grad_norm / tally.steps if tally.steps else None,
        "tokens_per_s": tokens_per_s, "mfu": mfu(run, tokens_per_s) if tokens_per_s else None,
        "train_seconds": state.train_seconds, "elapsed_s": time.perf_counter() - run.started,
    }
    state.evaluated = True
    if ddp.is_main:
        run.folder.append_metrics(record)
    run.log(f"step {state.step:>6}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
            f"({losses['val_bpb']:.4f} bits per byte)")
    if state.step > 0:
        improved = losses["val"] < state.best_val
        state.best_val = min(state.best_val, losses["val"])
        save_last(run, state)
        if improved and ddp.is_main:
            run.folder.promote_last()
    return losses


def show_step(bar: tqdm, run: Run, tally: Tally, loss: float, lr: float, val_bpb: float | None) -> None:
    """The progress bar's step: loss, learning rate, speed and MFU since the last metrics line."""
    rate = tally.steps * run.tokens_per_step / tally.seconds
    utilisation = mfu(run, rate)
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.3f}", val_bpb=f"{val_bpb:.3f}" if val_bpb is not None else "-",
                    lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}",
                    mfu=f"{utilisation:.1%}" if utilisation else "-", refresh=False)


def divergence_message(step: int, loss: float, grad_norm: float, lr: float, precision: Precision,
                       last: Path) -> str:
    """Why training stopped on a non-finite number. Under fp16 a non-finite gradient alone
    is routine (the gradient scaler skips that step and lowers its scale), so only the
    loss counts there. Nothing is saved after this: the last checkpoint stays as it was."""
    if precision.dtype == torch.float16:
        cause = "fp16 overflow in the forward pass (bf16 or fp32 has the range), or too high a learning rate"
    else:
        cause = f"too high a learning rate ({lr:.3g} at this step; lower train.learning_rate) or a bad batch"
    checkpoint = f"{last} is left as it was" if last.is_file() else "no checkpoint was written"
    return (f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; likely cause: {cause}; "
            f"{checkpoint}")


def result(run: Run, state: RunState, losses: dict[str, float], interrupted: str | None) -> Result:
    return Result(state.step, losses.get("train"), losses.get("val"), losses.get("val_bpb"), state.best_val,
                  interrupted,
                  run.cfg.train.out_dir, run.model.num_params(), str(run.device))


def train(cfg: Config, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> Result:
    """Run one training job, alone or as one process of a torchrun job.

    progress: show a progress bar (rank 0 only). checkpoint: one to resume from (model,
    optimiser, step, best val loss, schedule position); its model config must equal ``cfg.model``.
    """
    ddp = distributed.from_environment()
    device = distributed.device_for_process(cfg.train.device, ddp)
    distributed.start(ddp, device)
    try:
        return _train(cfg, ddp, device, progress and ddp.is_main, checkpoint)
    finally:
        distributed.stop(ddp)


def _train(cfg: Config, ddp: Distributed, device: torch.device, progress: bool, checkpoint: Checkpoint | None) -> Result:
    """The loop: evaluate (and save) when due, stop when finished, else one step."""
    run, state = setup(cfg, ddp, device, progress, checkpoint)
    tc = run.cfg.train
    bar = tqdm(total=None if tc.max_seconds else tc.max_iters, initial=state.step, desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    losses: dict[str, float] = {}
    tally = Tally()
    with StopSignals() as signals:
        while True:
            finished = state.step >= tc.max_iters or (tc.max_seconds > 0 and state.train_seconds >= tc.max_seconds)
            if (finished or state.step % tc.eval_interval == 0) and not state.evaluated:
                losses = evaluate_and_save(run, state, tally)
                tally = Tally()
            if finished:
                break

            step_started = time.perf_counter()
            lr_factor = lr_factor_at(state.step, tc, time_fraction(tc, state))
            run.optimizer.set_lr_factor(lr_factor)
            lr = tc.learning_rate * lr_factor  # AdamW's, for the progress bar and a divergence message
            torch.manual_seed(stream_seed(tc.seed, DROPOUT_STREAM, state.step, ddp.rank))
            loss, grad_norm = train_step(run.train_model, run.model, run.optimizer, run.scaler,
                                         run.batches.at(state.step), tc, device, run.precision)
            seconds = time.perf_counter() - step_started
            if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not run.scaler.is_enabled()):
                bar.close()
                raise UserError(divergence_message(state.step, loss, grad_norm, lr, run.precision, run.folder.last))
            tally.add(loss, grad_norm, seconds)
            # Every process must stop after the same step and follow the same clock.
            interrupted, state.train_seconds = ddp.agree_max(
                [float(signals.received is not None), state.train_seconds + seconds], device
            )
            state.step += 1
            state.evaluated = False
            show_step(bar, run, tally, loss, lr, losses.get("val_bpb"))
            if interrupted:
                save_last(run, state)
                bar.close()
                run.log(f"stopped by {signals.received or 'a signal to another process'} after step {state.step}: "
                        f"saved {run.folder.last}; continue with --resume")
                return result(run, state, losses, interrupted=signals.received or "signal")
    bar.close()
    run.log(f"done at step {state.step}: best val loss {state.best_val:.4f} in {run.folder.best}, "
            f"latest in {run.folder.last}")
    return result(run, state, losses, interrupted=None)


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


def command_config(args: argparse.Namespace, overrides: list[str]) -> tuple[Config, Checkpoint | None]:
    """The run's config and, with --resume, the checkpoint it goes on from; the config file
    is read once. Resuming without --config, the checkpoint's config is the base the
    overrides apply to, so they are validated against it, not against the defaults."""
    given = config_tables(args.config, overrides)  # what the file and overrides set, defaults left out
    folder = RunFolder(Path(str(given["train"].get("out_dir", TrainConfig.out_dir))))
    checkpoint = folder.load_resume() if args.resume else None
    tables = given
    if checkpoint is not None and args.config is None:
        tables = {name: {**table, **given[name]} for name, table in checkpoint.config.to_dict().items()}
    given_keys = {f"{section}.{key}" for section, table in given.items() for key in table}
    cfg = config_from_dict(tables, source=str(args.config) if args.config else "defaults")
    if checkpoint is None and not args.overwrite:
        folder.check_fresh()
    if cfg.train.init_from and (args.config is not None or checkpoint is None):  # a resumed config has the shape
        cfg = adopt_init_shape(cfg, given_keys)
    return cfg, checkpoint


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed blocks below 1 GiB for reuse instead of handing them
    back to the OS. A step frees and allocates the same large buffers every time (with a
    50k vocabulary, about four of the logits' size a step: 100 MB each at 2 x 256 tokens);
    past malloc's mmap threshold (32 MiB at most by default) each one was a fresh mapping
    whose every page faulted again on first touch. Where the C library is not glibc: nothing."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    mallopt(M_TRIM_THRESHOLD, 1 << 30)
    mallopt(M_MMAP_THRESHOLD, 1 << 30)


def run(args: argparse.Namespace) -> None:
    if args.plot is not None:
        from model.plot import plot_run

        print(f"wrote {plot_run(args.plot)}")
        return
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in out_dir and --overwrite replaces it; choose one")
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    overrides += ["train.compile=true"] if args.compile else []
    cfg, checkpoint = command_config(args, overrides)
    keep_freed_memory()
    train(cfg, progress=not args.no_progress, checkpoint=checkpoint)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # KEY=VALUE on both sides of a flag
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
