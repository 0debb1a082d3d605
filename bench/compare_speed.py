"""How long a strategy comparison takes: 6 strategies x 8 prompts x 200 tokens.

    python bench/compare_speed.py                       # out/default/best.pt, its own dataset
    python bench/compare_speed.py CKPT --out bench/results/compare_speed.json

Runs `python sample.py compare` in-process on the first six strategies of the default
grid (greedy, beam:n=4, sample, temperature:t=0.7, top-k:k=40, top-p:p=0.9) with the
command's defaults otherwise (4 samples per prompt, prompts drawn from the validation
split, a human row), prints the table and the wall time of the whole command
(checkpoint loading included), and writes each strategy's seconds and tokens/s as
JSON. On a shared machine, take timings you report under an exclusive lock:
``flock -x /tmp/cpu.lock python bench/compare_speed.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from model.compare import DEFAULT_GRID, HUMAN  # noqa: E402
from sample import parse_args, run_compare  # noqa: E402

STRATEGIES = DEFAULT_GRID[:6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="out/default/best.pt", help="the checkpoint to compare on")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts drawn from the validation split")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens per sample")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare_speed.json",
                        help="write the figures to this JSON file")
    args = parser.parse_args()
    argv = ["compare", args.checkpoint, "--num-prompts", str(args.num_prompts), "--max-new-tokens",
            str(args.max_new_tokens), "--no-progress"]
    for strategy in STRATEGIES:
        argv += ["-s", strategy]
    table = io.StringIO()
    started = time.perf_counter()
    comparison = run_compare(parse_args(argv), out=table)
    wall = time.perf_counter() - started
    print(table.getvalue(), end="")
    print(f"wall time {wall:.1f} s for {len(STRATEGIES)} strategies x {args.num_prompts} prompts x "
          f"{args.max_new_tokens} tokens ({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs)")
    record = {
        "checkpoint": args.checkpoint, "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens,
        "wall_seconds": wall, "torch_threads": torch.get_num_threads(),
        "rows": {row["strategy"]: {"seconds": row["seconds"], "tokens_per_s": row["tokens_per_s"]}
                 for row in comparison.rows if row["strategy"] != HUMAN},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
