"""Sampling speed: the KV cache against full recomputation, inside and past the window.

    python bench/sample_speed.py [--vocab 65] [--repeats 3] [--device cpu] [--out bench/results/sample_speed.json]

A GPT of 6 layers, 6 heads, width 384 and block_size 256 with random weights (speed
does not depend on what the weights say), batch 1, fp32. It measures, in one run:

* tokens/s generating 255 tokens from a one-token prompt (inside the window) and 500
  tokens (past it), through the token loop (model.generate.decode_steps) with plain
  sampling (t=1), for each
  window mode: exact and shift (with the cache) and none (recompute everything);
* ms per token at context 16, 128 and 256: the time of one step when the context
  holds that many tokens, with the cache (one decode step) and without (one forward
  pass over the whole context).

Figures are medians over --repeats runs. The machine is shared: compare numbers from
the same run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from model.config import ModelConfig
from model.generate import Context, decode_steps
from model.gpt import GPT
from model.strategy import DecodingSpec

ROOT = Path(__file__).resolve().parents[1]


def build_model(vocab_size: int, device: str) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, block_size=256, n_layer=6, n_head=6, n_embd=384)
    return GPT(cfg).to(device).eval()


def tokens_per_second(model, new_tokens: int, window: str, repeats: int) -> float:
    """The token loop (model, strategy, sampling), without stopping at end-of-text:
    random weights would end samples at random lengths."""
    rates = []
    for repeat in range(repeats):
        started = time.perf_counter()
        steps = sum(1 for _ in decode_steps(model, [[0]], DecodingSpec(), new_tokens, [repeat], window=window))
        rates.append(steps / (time.perf_counter() - started))
    return statistics.median(rates)


@torch.inference_mode()
def ms_per_token(model, context_length: int, cached: bool, repeats: int) -> float:
    """Median time of the step that reads a context of ``context_length`` tokens."""
    prompt = [i % 64 for i in range(context_length - 1)]
    times = []
    for _ in range(max(repeats, 5) * 4):
        context = Context(model, [prompt], 1, "exact" if cached else "none")
        context.next_logits()  # prefill the first context_length - 1 tokens
        context.append(torch.tensor([1], device=context.tokens.device))
        started = time.perf_counter()
        context.next_logits()  # one step over context_length tokens
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=65, help="vocabulary size (65: tinyshakespeare's characters)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sample_speed.json")
    args = parser.parse_args()

    model = build_model(args.vocab, args.device)
    tokens_per_second(model, 20, "exact", 1)  # warm up

    throughput = {}
    for new_tokens in (255, 500):
        for window in ("exact", "shift", "none"):
            if new_tokens == 255 and window == "shift":
                continue  # inside the window, shift and exact run the same steps
            rate = tokens_per_second(model, new_tokens, window, args.repeats)
            throughput[f"{new_tokens}_{window}"] = rate
            print(f"{new_tokens} tokens, window={window:<5}: {rate:8.1f} tokens/s", flush=True)
    latency = {}
    for length in (16, 128, 256):
        latency[length] = {
            "cache": ms_per_token(model, length, True, args.repeats),
            "none": ms_per_token(model, length, False, args.repeats),
        }
        print(f"context {length:>3}: {latency[length]['cache']:6.2f} ms/token with the cache, "
              f"{latency[length]['none']:6.2f} without", flush=True)

    print("\n| measure | KV cache | no cache (recompute) | speed-up |\n|---|---|---|---|")
    print(f"| tokens/s, 255 new tokens (inside the window) | {throughput['255_exact']:.0f} | "
          f"{throughput['255_none']:.0f} | {throughput['255_exact'] / throughput['255_none']:.1f}x |")
    print(f"| tokens/s, 500 new tokens, exact window | {throughput['500_exact']:.0f} | "
          f"{throughput['500_none']:.0f} | {throughput['500_exact'] / throughput['500_none']:.1f}x |")
    print(f"| tokens/s, 500 new tokens, shift window | {throughput['500_shift']:.0f} | "
          f"{throughput['500_none']:.0f} | {throughput['500_shift'] / throughput['500_none']:.1f}x |")
    for length, row in latency.items():
        print(f"| ms/token at context {length} | {row['cache']:.2f} | {row['none']:.2f} | "
              f"{row['none'] / row['cache']:.1f}x |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "vocab_size": args.vocab},
        "batch_size": 1, "dtype": "float32", "strategy": "sample (t=1)", "device": args.device,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or
        platform.machine(), "repeats": args.repeats,
        "tokens_per_s": throughput, "ms_per_token": latency,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
