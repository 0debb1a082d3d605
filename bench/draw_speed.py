"""How long drawing one token takes: model.decoding.draw_tokens against torch.multinomial.

    python bench/draw_speed.py [--vocabs 65,50304] [--decode-tokens 255] [--repeats 6] [--out FILE]

Two measurements, each alternating the two draws within every repeat (medians):

* one draw from a random softmax distribution of each vocabulary size, batch 1, a fresh
  distribution per call (the softmax is inside the timed call for both, as in a decode step);
* tokens/s of the token loop (model.generate.decode_steps, plain sampling t=1, batch 1, a
  one-token prompt) with the 6 x 6 x 384 random-weight GPT of bench/sample_speed.py, once
  with draw_tokens and once with torch.multinomial in its place.

draw_tokens uses one uniform per row and a cumulative sum; torch.multinomial one random
number per token. The machine is shared: compare figures from the same run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

import model.decoding as decoding  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.generate import decode_steps  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.strategy import DecodingSpec  # noqa: E402

SHAPE = dict(block_size=256, n_layer=6, n_head=6, n_embd=384)
TINY_SHAPE = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)


def multinomial_tokens(probs: torch.Tensor, generators) -> torch.Tensor:
    """What choose_tokens did before draw_tokens: torch.multinomial, one row at a time."""
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])


DRAWS = {"draw_tokens": decoding.draw_tokens, "multinomial": multinomial_tokens}


def one_draw_ms(vocab: int, repeats: int, calls: int) -> dict[str, float]:
    """Median ms of softmax + one draw, per draw function, alternating the two."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(calls, 1, vocab, generator=generator) * 3
    times: dict[str, list[float]] = {name: [] for name in DRAWS}
    for repeat in range(repeats):
        order = list(DRAWS) if repeat % 2 == 0 else list(reversed(DRAWS))
        for name in order:
            draw = DRAWS[name]
            started = time.perf_counter()
            for row in logits:
                draw(torch.softmax(row, dim=-1), [generator])
            times[name].append((time.perf_counter() - started) / calls * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def decode_tokens_per_s(vocab: int, shape: dict, tokens: int, repeats: int) -> dict[str, float]:
    """Median tokens/s of the token loop with each draw in choose_tokens, alternating."""
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(vocab_size=vocab, **shape)).eval()
    spec = DecodingSpec()
    times: dict[str, list[float]] = {name: [] for name in DRAWS}
    try:
        for repeat in range(repeats):
            order = list(DRAWS) if repeat % 2 == 0 else list(reversed(DRAWS))
            for name in order:
                decoding.draw_tokens = DRAWS[name]  # choose_tokens looks it up at each call
                started = time.perf_counter()
                made = sum(1 for _ in decode_steps(gpt, [[0]], spec, tokens, [1]))
                times[name].append(made / (time.perf_counter() - started))
    finally:
        decoding.draw_tokens = DRAWS["draw_tokens"]
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="65,50304", help="vocabulary sizes, comma-separated")
    parser.add_argument("--decode-tokens", type=int, default=255, help="tokens per token-loop run")
    parser.add_argument("--repeats", type=int, default=6, help="runs per figure; the median is reported")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-32 model and few tokens: a smoke "
                        "run, not a measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "draw_speed.json",
                        help="write the figures to this JSON file")
    args = parser.parse_args()
    vocabs = [int(v) for v in args.vocabs.split(",")]
    shape, tokens = (TINY_SHAPE, 8) if args.tiny else (SHAPE, args.decode_tokens)
    results = []
    print("| vocabulary | draw_tokens, ms a draw | multinomial, ms a draw | decode tok/s, draw_tokens "
          "| decode tok/s, multinomial | ratio |")
    print("|---|---|---|---|---|---|")
    for vocab in vocabs:
        draw = one_draw_ms(vocab, args.repeats, 5 if args.tiny else 200)
        decode = decode_tokens_per_s(vocab, shape, tokens, args.repeats)
        ratio = decode["draw_tokens"] / decode["multinomial"]
        results.append({"vocab": vocab, "ms_per_draw": draw, "decode_tokens_per_s": decode, "ratio": ratio})
        print(f"| {vocab:,} | {draw['draw_tokens']:.3f} | {draw['multinomial']:.3f} | "
              f"{decode['draw_tokens']:.1f} | {decode['multinomial']:.1f} | {ratio:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "tiny": args.tiny,
                                    "shape": shape, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
