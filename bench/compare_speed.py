"""How long a strategy comparison takes: 6 strategies x 8 prompts x 200 tokens.

    python bench/compare_speed.py                       # out/default/best.pt, its own dataset
    python bench/compare_speed.py CKPT --json bench.json

Runs `python sample.py compare` in-process on the first six strategies of the default
grid (greedy, beam:n=4, sample, temperature:t=0.7, top-k:k=40, top-p:p=0.9) with the
command's defaults otherwise (4 samples per prompt, prompts drawn from the validation
split, a human row), and prints the wall time of the whole command (checkpoint loading
included) and each strategy's tokens/s. On a shared machine, take timings you report
under an exclusive lock: ``flock -x /tmp/cpu.lock python bench/compare_speed.py``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from model.compare import DEFAULT_GRID  # noqa: E402
from sample import parse_args, run_compare  # noqa: E402

STRATEGIES = DEFAULT_GRID[:6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="out/default/best.pt")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    argv = ["compare", args.checkpoint, "--num-prompts", "8", "--max-new-tokens", "200", "--no-progress"]
    for strategy in STRATEGIES:
        argv += ["-s", strategy]
    table = io.StringIO()
    started = time.perf_counter()
    comparison = run_compare(parse_args(argv), out=table)
    wall = time.perf_counter() - started
    print(table.getvalue(), end="")
    print(f"wall time {wall:.1f} s for {len(STRATEGIES)} strategies x 8 prompts x 200 tokens "
          f"({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs)")
    if args.json:
        record = {
            "checkpoint": args.checkpoint, "wall_seconds": wall, "torch_threads": torch.get_num_threads(),
            "rows": {row["strategy"]: {"seconds": row["seconds"], "tokens_per_s": row["tokens_per_s"]}
                     for row in comparison.rows if row["strategy"] != "human"},
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
