"""The CPU decode fast path against its alternatives, on every model shape the project uses.

    python bench/decode_fast_path.py [--repeats 5] [--threads 2] [--shapes all] [--out bench/results/decode_fast_path.json]

Greedy decoding from a one-token prompt, batch 1, through generate's token loop
(model.generate.Context), with random weights (speed does not depend on what the
weights say). Each shape runs every variant once per repeat, interleaved, and the
table shows medians in tokens/s:

* plain: nn.Linear, the model as built (Context(..., fast_path=False));
* fast path: what generate uses (model.cpu_decode.for_decoding: large matrices,
  the LM head included, as one column block per thread);
* blocked, all: every Linear blocked whatever its size, the LM head included;
* blocked, no head: every Linear but the LM head blocked (the earlier model.gpt.Linear);
* layout: the widening weights stored (in, out) (the earlier use_decoding_layout);
* layout + blocked: both (the earlier default);
* bf16: a bfloat16 copy of the weights and the KV cache, plain products; the JSON
  also records its largest logit difference from fp32 and how often its argmax agrees.

The alternatives that generate does not use are built here, on copies of the model,
so the table can be measured again.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.cpu_decode import for_decoding
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


class InOutBlocked(nn.Module):
    """The earlier blocked product, which also read weights stored (in, out)."""

    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        self.linear, self.parts = linear, parts

    def forward(self, x):
        w, b, parts = self.linear.weight, self.linear.bias, self.parts
        out, inp = w.shape
        if torch.is_grad_enabled() or x.numel() > 16 * inp or out % parts:
            return self.linear(x)
        rows, block = x.reshape(-1, inp), out // parts
        if w.stride(0) == 1:
            blocks = w.t().view(inp, parts, block).transpose(0, 1)
        else:
            blocks = w.view(parts, block, inp).transpose(1, 2)
        stacked = rows.expand(parts, *rows.shape)
        y = torch.bmm(stacked, blocks) if b is None else torch.baddbmm(b.view(parts, 1, block), stacked, blocks)
        return y.transpose(0, 1).reshape(*x.shape[:-1], out)


def with_layout(model: GPT) -> GPT:
    """A copy whose widening weights (out > in, LM head aside) are stored (in, out)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module) is nn.Linear and module is not model.lm_head and module.out_features > module.in_features:
            module.weight.data = module.weight.data.t().contiguous().t()
    return model


def with_old_blocks(model: GPT) -> nn.Module:
    """A shallow copy whose Linear layers but the LM head run InOutBlocked, as the earlier model.gpt.Linear."""
    parts = torch.get_num_threads()

    def rebuild(module: nn.Module) -> nn.Module:
        if type(module) is nn.Linear:
            return module if module is model.lm_head else InOutBlocked(module, parts)
        clone = copy.copy(module)
        clone._modules = {name: rebuild(child) for name, child in module._modules.items()}
        return clone

    return rebuild(model)


def variants(model: GPT) -> dict[str, tuple[nn.Module, bool]]:
    """name: (model to run, whether Context applies the fast path to it)."""
    layout = with_layout(model)
    return {
        "plain": (model, False),
        "fast path": (model, True),
        "blocked, all": (for_decoding(model, min_weight=0), False),
        "blocked, no head": (with_old_blocks(model), False),
        "layout": (layout, False),
        "layout + blocked": (with_old_blocks(layout), False),
        "bf16": (copy.deepcopy(model).to(torch.bfloat16), False),
    }


@torch.inference_mode()
def greedy_rate(model: nn.Module, new_tokens: int, fast_path: bool) -> float:
    started = time.perf_counter()
    context = Context(model, [[0]], new_tokens, "exact", fast_path=fast_path)
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
    for candidate, fast_path in runs.values():
        greedy_rate(candidate, 4, fast_path)  # warm up
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (candidate, fast_path) in runs.items():
            rates[name].append(greedy_rate(candidate, new_tokens, fast_path))
    return {"tokens_per_s": {name: statistics.median(r) for name, r in rates.items()}, "runs": rates,
            "new_tokens": new_tokens, "bf16": bf16_error(model, runs["bf16"][0], min(64, settings["block_size"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per variant; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the fast path needs at least 2)")
    parser.add_argument("--shapes", default="all", help=f"comma-separated names, or all: {', '.join(SHAPES)}")
    parser.add_argument("--tokens", type=int, help="new tokens per run for every shape (default: per shape)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decode_fast_path.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(SHAPES) if args.shapes == "all" else [s.strip() for s in args.shapes.split(",")]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")

    results = {}
    for name in names:
        settings, new_tokens = SHAPES[name]
        results[name] = measure_shape(settings, args.tokens or new_tokens, args.repeats)
        row = results[name]["tokens_per_s"]
        print(f"{name}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()), flush=True)

    columns = list(next(iter(results.values()))["tokens_per_s"])
    print("\n| model | " + " | ".join(columns) + " | fast path / plain |")
    print("|---" * (len(columns) + 2) + "|")
    for name, result in results.items():
        row = result["tokens_per_s"]
        print(f"| {name} | " + " | ".join(f"{row[c]:.0f}" for c in columns) +
              f" | {row['fast path'] / row['plain']:.2f}x |")
    for name, result in results.items():
        err = result["bf16"]
        print(f"bf16 {name}: max |logit diff| {err['max_abs_logit_diff']:.3g} (logit std {err['logit_std']:.3g}), "
              f"argmax agrees {100 * err['argmax_agreement']:.0f}%")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "shapes": {name: SHAPES[name][0] for name in names}, "batch_size": 1, "strategy": "greedy",
        "prompt_tokens": 1, "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "results": results,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
