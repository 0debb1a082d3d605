"""How long a decoding sweep takes: the default grid (each family x 6 settings), judged.

    python bench/sweep_speed.py out/shakespeare_char/best.pt --judge out/shakespeare_char_large/best.pt
    python bench/sweep_speed.py CKPT --out bench/results/sweep_speed.json

Runs ``python sample.py compare CKPT --sweep`` in-process with the command's defaults (8
prompts drawn from the validation split, 4 samples each, 200 tokens, 32-token escape
prompts, 1000 bootstrap draws) and prints the sweep's tables, the wall time of the whole
command (checkpoint loading included) and the seconds of generation summed over the
settings; writes them as JSON. Target: under 10 minutes for the 0.8M char model on 2
cores. On a shared machine, take timings you report under an exclusive lock:
``flock -x /tmp/cpu.lock python bench/sweep_speed.py ...``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from model.compare import HUMAN  # noqa: E402
from sample import parse_args, run_compare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="out/shakespeare_char/best.pt",
                        help="the checkpoint to sweep")
    parser.add_argument("--judge", help="the judge checkpoint (same tokenizer); none: the generator's own NLL")
    parser.add_argument("--sweep", default="default", help="the sweep (compare's --sweep syntax)")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts drawn from the validation split")
    parser.add_argument("--num-samples", type=int, default=4, help="samples per prompt and setting")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens per sample")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws")
    parser.add_argument("--window", default="exact", help="compare's --window: exact, or shift (fast past the "
                        "generator's context)")
    parser.add_argument("--units", default="words", help="compare's --units: words, or tokens (a char model's "
                        "characters)")
    parser.add_argument("--oracle", help="compare's --oracle DIR: a synthetic language's chain, then the sweep's "
                        "quality axis")
    parser.add_argument("--data-dir", help="the prepared dataset (default: the checkpoint's own)")
    parser.add_argument("--compare-out", type=Path, help="also write compare's files (sweep.md, frontier.png, ...) "
                        "into this folder")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep_speed.json",
                        help="write the figures to this JSON file")
    args = parser.parse_args()
    argv = ["compare", args.checkpoint, "--sweep", args.sweep, "--num-prompts", str(args.num_prompts),
            "--num-samples", str(args.num_samples), "--max-new-tokens", str(args.max_new_tokens),
            "--bootstrap", str(args.bootstrap), "--window", args.window, "--units", args.units,
            "--no-progress"]
    argv += ["--data-dir", args.data_dir] if args.data_dir else []
    argv += ["--oracle", args.oracle] if args.oracle else []
    argv += ["--judge", args.judge] if args.judge else []
    argv += ["--out", str(args.compare_out)] if args.compare_out else []
    printed = io.StringIO()
    started = time.perf_counter()
    comparison = run_compare(parse_args(argv), out=printed)
    wall = time.perf_counter() - started
    print(printed.getvalue(), end="")
    settings = [row for row in comparison.rows if row["strategy"] != HUMAN]
    generation = math.fsum(row["seconds"] for row in settings)
    print(f"wall time {wall:.1f} s for {len(settings)} settings x {args.num_prompts} prompts x {args.num_samples} "
          f"samples x {args.max_new_tokens} tokens ({generation:.1f} s generating the samples; "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs)")
    record = {
        "checkpoint": args.checkpoint, "judge": args.judge, "oracle": args.oracle, "sweep": args.sweep, "num_prompts": args.num_prompts,
        "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens, "bootstrap": args.bootstrap,
        "window": args.window, "units": args.units, "settings": len(settings), "wall_seconds": wall, "generation_seconds": generation,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
