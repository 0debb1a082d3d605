"""Training throughput: train.py's own loop against a plain loop written the usual way,
and where the time of one step goes.

    python bench/train_speed.py                       # every case, both loops, on the default device
    python bench/train_speed.py --cases nanogpt-4x4x128 char-4x4x128 --repeats 3
    python bench/train_speed.py --device cpu --steps 200 --out bench/results/train_speed.json
    python bench/train_speed.py --compile             # both loops train a torch.compile'd model
    python bench/train_speed.py --profile --cases nanogpt-4x4x128                     # step phases, AdamW
    python bench/train_speed.py --profile --cases nanogpt-4x4x128 --optimizer muon    # step phases, Muon

Comparison (the default). For each case two loops train the same GPT (model/gpt.py) on
a synthetic token file (uniform random ids over a 65-token vocabulary: speed does not
depend on the text):

- train.py: its own train() (schedule, clipping, evaluations, checkpoints), with
  ``--optimizer`` (default adamw, the project's settings). It evaluates every
  ``--window`` steps; each evaluation line carries the speed of the training steps
  since the one before (evaluations and saves excluded).
- plain: what one would write in a notebook: ``torch.optim.AdamW(model.parameters())``
  at the project's default learning rate, betas and weight decay, random windows of the
  same token file, ``loss.backward(); clip_grad_norm_(..., 1.0); opt.step();
  opt.zero_grad(set_to_none=True)``, bf16 autocast on CUDA only. Timed the same way:
  per step, summed over windows of ``--window`` steps.

Each run is a fresh subprocess (its peak memory is its own) and the two loops alternate,
train.py then plain, ``--repeats`` times. In each run the first window is warm-up and
dropped and the run's tokens/s is the median of the other windows; the table shows the
median over the repeats of each loop and their ratio (train.py / plain). Peak memory is
the process's peak resident set on the CPU, the peak allocated by PyTorch on CUDA.

Profile (``--profile``). In this process, for each case: train.py's step taken apart
into its phases, each timed with time.perf_counter: data (Batches.at, as train.py
draws a batch, and the copy to the device), forward, backward, clip (fp16 unscaling and
clip_grad_norm_), optimizer (the learning-rate factor and the step of every optimizer of
model/optim.py's build_optimizers, so ``--optimizer muon`` includes Muon's), zero_grad.
Instrumented steps alternate with whole steps of train.py's own train_step; after
``--window`` warm-up pairs, ``--steps`` pairs are measured. The table shows each phase's
median ms, their sum, and the median of the whole steps. On CUDA every mark waits for
the device (torch.cuda.synchronize), which the whole steps do only once, at their end.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.cli import run_cli  # noqa: E402
from model.errors import UserError  # noqa: E402

from clock import timer  # noqa: E402  (bench/clock.py, beside this file)

CASES = {
    # The comparison config of issue 12: nanoGPT's small char model, the way it is usually run.
    "nanogpt-4x4x128": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, bias=False,
                            position="learned", norm="layernorm", dropout=0.0),
    "char-4x4x128": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "6x6x384-block256": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=12),
}
# Measured steps and steps per timing window: the 4x4x128 models take tens of ms a step
# on 2 CPU cores, the bigger one seconds.
DEFAULT_TIMING = {"nanogpt-4x4x128": (200, 25), "char-4x4x128": (200, 25), "6x6x384-block256": (40, 10)}
TRAIN_KEYS = ("batch_size",)  # the rest of a case is [model]
PHASES = ("data", "forward", "backward", "clip", "optimizer", "zero_grad")
VOCAB = 65


def make_dataset(folder: Path, tokens: int = 200_000) -> None:
    """Random token ids in the format of model/data.py, under a char tokenizer of VOCAB - 1
    characters plus end-of-text, so the run's checkpoints are ordinary ones."""
    from model.data import TokenWriter, dataset_meta, split_file, token_dtype, write_meta
    from model.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(chr(ord("0") + i) for i in range(VOCAB - 1))
    rng = np.random.default_rng(0)
    dtype = token_dtype(tokenizer.vocab_size)
    for split in ("train", "val"):
        with TokenWriter(split_file(folder, split), dtype) as writer:
            writer.write(rng.integers(0, tokenizer.vocab_size, tokens))
    write_meta(folder, dataset_meta(tokenizer, dtype, {"train": tokens, "val": tokens}, source="synthetic"))


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else str(value)


def case_config(name: str, device: str, optimizer: str, compile_model: bool, data_dir: Path, extra: list[str]):
    """The train.py config of a case (vocab size still unresolved, as load_config leaves it)."""
    from model.config import load_config

    overrides = [f"{key}={toml_value(value)}" for key, value in CASES[name].items()] + [
        f"data_dir={data_dir}", f"device={device}", f"optimizer={optimizer}", f"compile={toml_value(compile_model)}",
    ] + extra
    return load_config(None, overrides)


def peak_memory_mib(on_cuda: bool) -> float:
    import torch

    peak = torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return round(peak / 2**20, 1)


def median_tokens_per_s(window_tokens_per_s: list[float]) -> float:
    """The median of the timing windows after the first (warm-up) one."""
    return statistics.median(window_tokens_per_s[1:])


def run_ours(name: str, device: str, steps: int, window: int, compile_model: bool, optimizer: str,
             data_dir: Path) -> dict:
    """Train one case with train.py's train() in this process; returns its measurements."""
    import torch

    from train import train

    with tempfile.TemporaryDirectory() as out:
        extra = [f"out_dir={out}", f"max_iters={window + steps}", f"eval_interval={window}", "eval_iters=1",
                 "warmup_iters=10"]
        result = train(case_config(name, device, optimizer, compile_model, data_dir, extra), progress=False)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records[1:] if r["tokens_per_s"]]  # records[0]: step 0, before any training
    mfus = [r["mfu"] for r in windows[1:] if r["mfu"] is not None]
    on_cuda = result.device.startswith("cuda")
    return {
        "tokens_per_s": median_tokens_per_s([r["tokens_per_s"] for r in windows]),
        "mfu": statistics.median(mfus) if mfus else None, "peak_memory_MiB": peak_memory_mib(on_cuda),
        "params_M": round(result.num_params / 1e6, 3), "device": "cuda" if on_cuda else "cpu",
        "threads": torch.get_num_threads(), "measured_steps": (len(windows) - 1) * window,
    }


def run_plain(name: str, device: str, steps: int, window: int, compile_model: bool, data_dir: Path) -> dict:
    """Train one case with the plain loop in this process; returns its measurements."""
    import torch

    from model.config import ModelConfig, TrainConfig
    from model.data import open_split, read_meta
    from model.device import resolve_device
    from model.gpt import GPT

    device = resolve_device(device)
    shape = {key: value for key, value in CASES[name].items() if key not in TRAIN_KEYS}
    batch_size, block_size = CASES[name]["batch_size"], shape["block_size"]
    defaults = TrainConfig()
    tokens = open_split(data_dir, "train", read_meta(data_dir))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    model = GPT(ModelConfig(vocab_size=VOCAB, **shape)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=defaults.learning_rate, betas=(defaults.beta1, defaults.beta2),
                            weight_decay=defaults.weight_decay)
    forward = torch.compile(model) if compile_model else model

    def get_batch():
        starts = rng.integers(0, len(tokens) - block_size - 1, batch_size)
        rows = torch.from_numpy(np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64))
        return rows[:, :-1].to(device), rows[:, 1:].to(device)

    window_seconds = []
    for step in range(window + steps):
        started = time.perf_counter()
        x, y = get_batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # what a notebook logs; on CUDA it also waits for the step to finish
        if step % window == 0:
            window_seconds.append(0.0)
        window_seconds[-1] += time.perf_counter() - started
    tokens_per_window = window * batch_size * block_size
    return {
        "tokens_per_s": median_tokens_per_s([tokens_per_window / seconds for seconds in window_seconds]),
        "peak_memory_MiB": peak_memory_mib(device.type == "cuda"),
    }


def run_side(side: str, name: str, args: argparse.Namespace, steps: int, window: int, data: str) -> dict:
    """One run of one loop in a fresh subprocess."""
    command = [sys.executable, __file__, "--one", name, "--side", side, "--data", data, "--device", args.device,
               "--steps", str(steps), "--window", str(window), "--optimizer", args.optimizer]
    done = subprocess.run(command + ["--compile"] * args.compile, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise UserError(f"the {side} run of {name} failed with exit status {done.returncode} (its output is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_case(name: str, args: argparse.Namespace, data: str) -> dict:
    """Both loops on one case, alternating, ``args.repeats`` times each: the case's row."""
    import torch

    steps, window = timing_of(name, args)
    ours, plain = [], []
    for _ in range(args.repeats):
        ours.append(run_side("ours", name, args, steps, window, data))
        plain.append(run_side("plain", name, args, steps, window, data))
    shape = CASES[name]
    tokens_per_s = round(statistics.median(run["tokens_per_s"] for run in ours))
    plain_tokens_per_s = round(statistics.median(run["tokens_per_s"] for run in plain))
    mfus = [run["mfu"] for run in ours if run["mfu"] is not None]
    tokens_per_step = shape["batch_size"] * shape["block_size"]
    return {
        "case": name, **shape, "device": ours[0]["device"], "threads": ours[0]["threads"], "compile": args.compile,
        "optimizer": args.optimizer, "plain_optimizer": "adamw", "params_M": ours[0]["params_M"],
        "repeats": args.repeats, "measured_steps": ours[0]["measured_steps"],
        "tokens_per_s": tokens_per_s, "ms_per_step": round(1000 * tokens_per_step / tokens_per_s, 2),
        "plain_tokens_per_s": plain_tokens_per_s,
        "plain_ms_per_step": round(1000 * tokens_per_step / plain_tokens_per_s, 2),
        "ratio": round(tokens_per_s / plain_tokens_per_s, 3),
        "mfu": round(statistics.median(mfus), 4) if mfus else None,
        "peak_memory_MiB": max(run["peak_memory_MiB"] for run in ours),
        "plain_peak_memory_MiB": max(run["peak_memory_MiB"] for run in plain),
        "runs_tokens_per_s": {"ours": [round(run["tokens_per_s"]) for run in ours],
                              "plain": [round(run["tokens_per_s"]) for run in plain]},
        "torch": torch.__version__,
    }


def profile_case(name: str, device_name: str, steps: int, warmup: int, compile_model: bool, optimizer_name: str,
                 data_dir: Path) -> dict:
    """train.py's step on one case, phase by phase, beside whole steps (see the docstring)."""
    import torch

    from model.data import open_split, read_meta, to_device
    from model.device import Precision, resolve_device, use_tensor_cores
    from model.distributed import Distributed
    from model.optim import build_optimizers
    from train import DROPOUT_STREAM, Batches, initial_model, learning_rate_at, resolve_vocab_size, stream_seed, \
        train_step

    device = resolve_device(device_name)
    meta = read_meta(data_dir)
    cfg = resolve_vocab_size(case_config(name, device_name, optimizer_name, compile_model, data_dir, []), meta)
    tc = cfg.train
    torch.manual_seed(tc.seed)
    use_tensor_cores(device)
    model = initial_model(cfg, meta, resuming=False).to(device)
    optimizer = build_optimizers(model, tc, device)
    precision = Precision.for_device(device)
    scaler = precision.grad_scaler()
    batches = Batches(open_split(data_dir, "train", meta), cfg, Distributed(), tc.batch_size)
    step_model = torch.compile(model) if compile_model else model
    clock = timer(device)

    def schedule(step: int) -> None:
        optimizer.set_lr_factor(learning_rate_at(step, tc) / tc.learning_rate)
        torch.manual_seed(stream_seed(tc.seed, DROPOUT_STREAM, step, 0))

    def phased_step(step: int) -> dict[str, float]:
        marks = [clock()]
        torch.manual_seed(stream_seed(tc.seed, DROPOUT_STREAM, step, 0))
        x, y = to_device(batches.at(step)[0], device)
        marks.append(clock())
        with precision.autocast():
            _, loss = step_model(x, y)
        marks.append(clock())
        scaler.scale(loss).backward()
        marks.append(clock())
        optimizer.unscale_(scaler)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
        marks.append(clock())
        optimizer.set_lr_factor(learning_rate_at(step, tc) / tc.learning_rate)
        optimizer.step(scaler)
        marks.append(clock())
        optimizer.zero_grad()
        marks.append(clock())
        return {phase: 1000 * (end - start) for phase, start, end in zip(PHASES, marks, marks[1:])}

    def whole_step(step: int) -> float:
        started = clock()
        schedule(step)
        train_step(step_model, model, optimizer, scaler, batches.at(step), tc, device, precision)
        return 1000 * (clock() - started)

    phased, whole = [], []
    for pair in range(warmup + steps):
        times = phased_step(2 * pair), whole_step(2 * pair + 1)
        if pair >= warmup:
            phased.append(times[0])
            whole.append(times[1])
    phases_ms = {phase: round(statistics.median(step[phase] for step in phased), 3) for phase in PHASES}
    return {
        "case": name, "device": device.type, "threads": torch.get_num_threads(), "compile": compile_model,
        "optimizer": optimizer_name, "batch_size": tc.batch_size, "block_size": cfg.model.block_size,
        "warmup_steps": warmup, "measured_steps": steps, "phases_ms": phases_ms,
        "phases_sum_ms": round(sum(phases_ms.values()), 3), "step_ms": round(statistics.median(whole), 3),
        "torch": torch.__version__,
    }


def timing_of(name: str, args: argparse.Namespace) -> tuple[int, int]:
    steps, window = args.steps or DEFAULT_TIMING[name][0], args.window or DEFAULT_TIMING[name][1]
    if steps % window and not args.profile:
        raise UserError(f"--steps ({steps}) must be a multiple of --window ({window})")
    return steps, window


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="the models to measure")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--steps", type=int, help="measured steps per run, after one warm-up window (default: "
                        "200 for the 4x4x128 models, 40 for the bigger one); with --profile, measured step pairs")
    parser.add_argument("--window", type=int, help="steps per timing window (default: 25 and 10); with --profile, "
                        "warm-up step pairs")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, alternating; medians are reported")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                        help="train.py's optimizer (and the profile's); the plain loop always uses AdamW")
    parser.add_argument("--compile", action="store_true", help="both loops (and the profile) use torch.compile")
    parser.add_argument("--profile", action="store_true",
                        help="time the phases of train.py's step instead of comparing the loops")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default: bench/results/train_speed.json, "
                        "with --profile bench/results/train_speed_profile.json)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run of one case, its JSON on stdout
    parser.add_argument("--side", choices=["ours", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag in ("steps", "window", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")


def bench(args: argparse.Namespace) -> None:
    check_args(args)
    if args.one:
        if args.side == "ours":
            row = run_ours(args.one, args.device, args.steps, args.window, args.compile, args.optimizer, args.data)
        else:
            row = run_plain(args.one, args.device, args.steps, args.window, args.compile, args.data)
        print(json.dumps(row))
        return
    for name in args.cases:
        timing_of(name, args)  # refuse bad settings before anything runs
    out = args.out or ROOT / "bench" / "results" / ("train_speed_profile.json" if args.profile else "train_speed.json")
    rows = []
    with tempfile.TemporaryDirectory() as data:
        make_dataset(Path(data))
        for name in args.cases:
            if args.profile:
                steps, warmup = timing_of(name, args)
                rows.append(profile_case(name, args.device, steps, warmup, args.compile, args.optimizer, Path(data)))
                print_profile(rows[-1])
            else:
                rows.append(compare_case(name, args, data))
                print_row(rows[-1], header=len(rows) == 1)
    if not args.profile:
        print_runs(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: bench(build_parser().parse_args(argv)))


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'case':<18} {'device':<6} {'params':>8} {'batch x block':>13} {'train.py tok/s':>14} "
              f"{'plain tok/s':>11} {'ratio':>6} {'ms/step':>8} {'plain ms':>8} {'MFU':>6} {'peak mem':>10}")
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
    print(f"{row['case']:<18} {row['device']:<6} {row['params_M']:>7.2f}M "
          f"{row['batch_size']:>6} x {row['block_size']:<4} {row['tokens_per_s']:>14,} "
          f"{row['plain_tokens_per_s']:>11,} {row['ratio']:>6.3f} {row['ms_per_step']:>8.1f} "
          f"{row['plain_ms_per_step']:>8.1f} {mfu:>6} {row['peak_memory_MiB']:>7.0f} MiB", flush=True)


def print_runs(rows: list[dict]) -> None:
    """Every run's tokens/s, in the order they ran, under the table of medians."""
    for row in rows:
        pairs = zip(row["runs_tokens_per_s"]["ours"], row["runs_tokens_per_s"]["plain"])
        print(f"{row['case']}: train.py / plain per repeat: " + ", ".join(f"{a:,} / {b:,}" for a, b in pairs))


def print_profile(row: dict) -> None:
    print(f"{row['case']} ({row['device']}, {row['threads']} threads, optimizer {row['optimizer']}"
          f"{', compiled' if row['compile'] else ''}): median ms of {row['measured_steps']} steps")
    for phase, ms in row["phases_ms"].items():
        print(f"  {phase:<10} {ms:>9.2f}  {ms / row['step_ms']:>6.1%}")
    print(f"  {'sum':<10} {row['phases_sum_ms']:>9.2f}  {row['phases_sum_ms'] / row['step_ms']:>6.1%}")
    print(f"  {'step':<10} {row['step_ms']:>9.2f}  (train.py's train_step, whole)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
