"""Training throughput: tokens/s, ms per step, MFU and peak memory of train.py's own loop.

    python bench/train_speed.py                       # both standard models, on the default device
    python bench/train_speed.py --device cpu --steps 200 --out bench/results/train_speed.json

Each case trains on a synthetic token file (uniform random ids over a 65-token
vocabulary: speed does not depend on the text) in a fresh subprocess, so its peak memory
is its own. train.py evaluates every ``--window`` steps; each evaluation line carries the
speed of the training steps since the one before (evaluations and saves excluded). The
first window is warm-up and dropped; the table shows the median of the others.
Peak memory is the process's peak resident set on the CPU, the peak allocated by
PyTorch on CUDA.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    "char-4x4x128": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "6x6x384-block256": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=12),
}
# Measured steps and steps per timing window: (a) takes tens of ms a step on 2 CPU cores, (b) seconds.
DEFAULT_TIMING = {"char-4x4x128": (200, 25), "6x6x384-block256": (40, 10)}
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


def run_case(name: str, device: str, steps: int, window: int, compile_model: bool, data_dir: Path) -> dict:
    """Train one case in this process; returns its measurements."""
    import torch

    from model.config import load_config
    from train import train

    shape = CASES[name]
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"{key}={value}" for key, value in shape.items()] + [
            f"data_dir={data_dir}", f"out_dir={out}", f"device={device}", f"max_iters={window + steps}",
            f"eval_interval={window}", "eval_iters=1", "warmup_iters=10", f"compile={str(compile_model).lower()}",
        ]
        result = train(load_config(None, overrides), progress=False)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records[2:] if r["tokens_per_s"]]  # records[0]: step 0; records[1]: warm-up window
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in windows)
    mfus = [r["mfu"] for r in windows if r["mfu"] is not None]
    on_cuda = result.device.startswith("cuda")
    peak_bytes = torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens_per_step = shape["batch_size"] * shape["block_size"]
    return {
        "case": name, **shape, "device": "cuda" if on_cuda else "cpu", "threads": torch.get_num_threads(),
        "compile": compile_model, "params_M": round(result.num_params / 1e6, 3),
        "tokens_per_s": round(tokens_per_s), "ms_per_step": round(1000 * tokens_per_step / tokens_per_s, 2),
        "mfu": round(statistics.median(mfus), 4) if mfus else None,
        "peak_memory_MiB": round(peak_bytes / 2**20, 1), "measured_steps": len(windows) * window,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, help="measured steps per case, after one warm-up window "
                        "(default: 200 for the char model, 40 for the bigger one)")
    parser.add_argument("--window", type=int, help="steps per timing window (default: 25 and 10)")
    parser.add_argument("--compile", action="store_true", help="train with torch.compile")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_speed.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(run_case(args.one, args.device, args.steps, args.window, args.compile, args.data)))
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as data:
        make_dataset(Path(data))
        for name in args.cases:
            steps, window = args.steps or DEFAULT_TIMING[name][0], args.window or DEFAULT_TIMING[name][1]
            if steps % window:
                parser.error(f"--steps ({steps}) must be a multiple of --window ({window})")
            command = [sys.executable, __file__, "--one", name, "--data", data, "--device", args.device,
                       "--steps", str(steps), "--window", str(window)] + (["--compile"] * args.compile)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print_row(rows[-1], header=len(rows) == 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'case':<18} {'device':<6} {'params':>8} {'batch x block':>13} {'tokens/s':>10} {'ms/step':>8} "
              f"{'MFU':>6} {'peak mem':>10}")
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
    print(f"{row['case']:<18} {row['device']:<6} {row['params_M']:>7.2f}M "
          f"{row['batch_size']:>6} x {row['block_size']:<4} {row['tokens_per_s']:>10,} {row['ms_per_step']:>8.1f} "
          f"{mfu:>6} {row['peak_memory_MiB']:>7.0f} MiB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
