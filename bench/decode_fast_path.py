"""Ways to speed up a one-token decode step on the CPU, against plain nn.Linear, on every
model shape the project uses.

    python bench/decode_fast_path.py [--repeats 5] [--threads 2] [--shapes all] [--out bench/results/decode_fast_path.json]

Greedy decoding from a one-token prompt, batch 1, through generate's token loop
(model.generate.Context), with random weights (speed does not depend on what the
weights say). Each shape runs every variant once per repeat, interleaved, and the
table shows medians in tokens/s:

* plain: nn.Linear, the model as built (what generate runs);
* blocked, gated: each matrix of at least 2^18 elements, the LM head included,
  computed as one column block per thread in one batched product (a one-row product
  may read the weights with one core; the blocks let every core read its share);
* blocked, all: the same for every matrix whatever its size;
* blocked, no head: every matrix but the LM head (the earlier model.gpt.Linear);
* layout: the widening weights stored (in, out) (the earlier use_decoding_layout);
* layout + blocked: both (the earlier default);
* bf16: a bfloat16 copy of the weights and the KV cache, plain products; it also
  reports its largest logit difference from fp32 and how often its argmax agrees.

Every variant is built here on a copy of the model (a shallow copy sharing the
weights, or a real one for layout and bf16), so the table can be measured again.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.generate import Context
from model.gpt import GPT

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # name: (model settings, new tokens per run)
    "6x6x384 v65": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65), 255),
    "4x4x128 rope v104": (dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=104, position="rope"), 127),
    "4x4x192 rope v2048": (dict(n_layer=4, n_head=4, n_embd=192, block_size=128, vocab_size=2048, position="rope"),
                           127),
    "6x6x384 v50304": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304), 255),
    "12x12x768 v50257": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257), 64),
}
TINY = {"2x2x32 v65": (dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65), 8)}  # --tiny
GATE = 1 << 18  # elements: "blocked, gated" leaves smaller matrices plain


class Blocked(nn.Module):
    """A Linear layer computed, for a few rows without gradients, as one column block
    per thread in one batched product, reading its weight where it lies ((out, in) or
    (in, out)) without copying it; out % parts leftover columns are one plain product."""

    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        self.linear, self.parts = linear, parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, parts = self.linear.weight, self.linear.bias, self.parts
        out, inp = w.shape
        if torch.is_grad_enabled() or x.numel() > 16 * inp:
            return self.linear(x)
        rows, even = x.reshape(-1, inp), out - out % parts
        if w.stride(0) == 1:  # stored (in, out)
            blocks = w.t()[:, :even].view(inp, parts, even // parts).transpose(0, 1)
        else:
            blocks = w[:even].view(parts, even // parts, inp).transpose(1, 2)  # (parts, in, block)
        stacked = rows.expand(parts, *rows.shape)
        y = torch.bmm(stacked, blocks) if b is None else torch.baddbmm(b[:even].view(parts, 1, -1), stacked, blocks)
        y = y.transpose(0, 1).reshape(rows.size(0), even)
        if even < out:
            y = torch.cat([y, F.linear(rows, w[even:], None if b is None else b[even:])], dim=1)
        return y.view(*x.shape[:-1], out)


def with_blocks(model: GPT, chosen: Callable[[nn.Linear], bool]) -> nn.Module:
    """A shallow copy of the model (the same weights) whose chosen Linear layers run Blocked."""
    parts = torch.get_num_threads()

    def rebuild(module: nn.Module) -> nn.Module:
        if type(module) is nn.Linear:
            return Blocked(module, parts) if chosen(module) else module
        clone = copy.copy(module)  # a new object over the same parameter dict
        clone._modules = {name: rebuild(child) for name, child in module._modules.items()}
        return clone

    return rebuild(model)


def with_layout(model: GPT) -> GPT:
    """A copy whose widening weights (out > in, LM head aside) are stored (in, out)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module) is nn.Linear and module is not model.lm_head and module.out_features > module.in_features:
            module.weight.data = module.weight.data.t().contiguous().t()
    return model


def variants(model: GPT) -> dict[str, nn.Module]:
    layout = with_layout(model)
    return {
        "plain": model,
        "blocked, gated": with_blocks(model, lambda m: m.weight.numel() >= GATE),
        "blocked, all": with_blocks(model, lambda m: True),
        "blocked, no head": with_blocks(model, lambda m: m is not model.lm_head),
        "layout": layout,
        "layout + blocked": with_blocks(layout, lambda m: m is not layout.lm_head),
        "bf16": copy.deepcopy(model).to(torch.bfloat16),
    }


@torch.inference_mode()
def greedy_rate(model: nn.Module, new_tokens: int) -> float:
    started = time.perf_counter()
    context = Context(model, [[0]], new_tokens, "exact")
    for _ in range(new_tokens):
        context.append(context.next_logits().argmax(dim=-1))
    return new_tokens / (time.perf_counter() - started)


@torch.inference_mode()
def bf16_error(model: GPT, bf16: nn.Module, length: int) -> dict:
    """Largest |logit difference| from fp32, and how often the argmax agrees, over one
    random sequence of ``length`` tokens."""
    idx = torch.randint(model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    exact, approx = model(idx)[0][0], bf16(idx)[0][0].float()
    return {"max_abs_logit_diff": (exact - approx).abs().max().item(),
            "logit_std": exact.std().item(),
            "argmax_agreement": (exact.argmax(-1) == approx.argmax(-1)).float().mean().item()}


def measure_shape(settings: dict, new_tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = GPT(ModelConfig(dropout=0.0, **settings)).eval()
    runs = variants(model)
    for candidate in runs.values():
        greedy_rate(candidate, 4)  # warm up
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, candidate in runs.items():
            rates[name].append(greedy_rate(candidate, new_tokens))
    return {"tokens_per_s": {name: statistics.median(r) for name, r in rates.items()}, "runs": rates,
            "new_tokens": new_tokens, "bf16": bf16_error(model, runs["bf16"], min(64, settings["block_size"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per variant; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the blocked variants split the columns over them)")
    parser.add_argument("--shapes", default="all", help=f"comma-separated names, or all: {', '.join(SHAPES)}")
    parser.add_argument("--tokens", type=int, help="new tokens per run for every shape (default: per shape)")
    parser.add_argument("--tiny", action="store_true", help="one tiny model: a smoke run, not a measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decode_fast_path.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = TINY if args.tiny else SHAPES
    names = list(shapes) if args.shapes == "all" else [s.strip() for s in args.shapes.split(",")]
    unknown = [n for n in names if n not in shapes]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(shapes)}")

    results = {}
    for name in names:
        settings, new_tokens = shapes[name]
        results[name] = measure_shape(settings, args.tokens or new_tokens, args.repeats)
        row = results[name]["tokens_per_s"]
        print(f"{name}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()), flush=True)

    columns = list(next(iter(results.values()))["tokens_per_s"])
    print("\n| model | " + " | ".join(columns) + " | best / plain |")
    print("|---" * (len(columns) + 2) + "|")
    for name, result in results.items():
        row = result["tokens_per_s"]
        print(f"| {name} | " + " | ".join(f"{row[c]:.0f}" for c in columns) +
              f" | {max(row.values()) / row['plain']:.2f}x |")
    for name, result in results.items():
        err = result["bf16"]
        print(f"bf16 {name}: max |logit diff| {err['max_abs_logit_diff']:.3g} (logit std {err['logit_std']:.3g}), "
              f"argmax agrees {100 * err['argmax_agreement']:.0f}%")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "shapes": {name: shapes[name][0] for name in names}, "batch_size": 1, "strategy": "greedy",
        "prompt_tokens": 1, "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "results": results,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
