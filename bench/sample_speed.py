"""Sampling speed: the KV cache against full recomputation, and our token loop against
Hugging Face transformers' generate() on the same weights.

    python bench/sample_speed.py [--vocab 65] [--repeats 3] [--device cpu] [--out bench/results/sample_speed.json]
        [--hf-python PYTHON] [--hf-vocabs 65,50304] [--floor-mib 1024]

A GPT of 6 layers, 6 heads, width 384 and block_size 256 with random weights (speed
does not depend on what the weights say), batch 1, float32 weights, on --device. The
token loop computes as model/generate.py's Context chooses for that device: float32 on
the CPU, bf16 autocast with a bf16 KV cache on CUDA (model/device.py); the output and
the JSON say which. Every clock reading waits for a CUDA device first (bench/clock.py).
It measures, in one run:

* tokens/s generating 255 tokens from a one-token prompt (inside the window) and 500
  tokens (past it), through the token loop (model.generate.decode_steps) with plain
  sampling (t=1), for each
  window mode: exact and shift (with the cache) and none (recompute everything);
* ms per token at context 16, 128 and 256: the time of one step when the context
  holds that many tokens, with the cache (one decode step) and without (one forward
  pass over the whole context).

* the bandwidth floor of batch-1 decoding: a one-token step reads every weight once
  (the tied embedding once, as the LM head reads it whole; one row of a position table)
  and the keys and values of its context in every layer, so no fp32 loop can make more
  than bandwidth / those bytes tokens/s. The bandwidth is a streaming read measured in
  the same run, on the same device: torch's sum over a float32 tensor of --floor-mib
  MiB (make it larger than the last-level cache), median of 5 passes. A last-level
  cache larger than the weights can hold them between steps, so the same read of one
  step's bytes is measured too ("cached floor"): the bound when every step reads from
  that cache;

* tokens/s of our token loop, of that floor and of transformers'
  ``GPT2LMHeadModel.generate()`` with its KV cache, built from the same weights
  (bench/hf_side.py, run by --hf-python, a separate venv with transformers: it is never
  a dependency of the project), 255 new tokens, plain sampling, for each vocabulary of
  --hf-vocabs, on the same device, in float32 under the autocast our token loop uses
  there (none on the CPU); the three alternate, one run each per repeat, and the table
  prints ours / floor and ours / transformers. --hf-python (a path, or a command on
  PATH) defaults to $HF_PYTHON, else .venv-hf/bin/python in the checkout (make
  venv-hf); on a machine whose own Python has transformers, name that one. Without that
  Python the transformers column is skipped with a note; the floor is measured all the
  same.

Figures are medians over --repeats runs. The machine is shared: compare numbers from
the same run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from model.config import ModelConfig
from model.device import resolve_device
from model.errors import UserError
from model.generate import Context, decode_steps
from model.gpt import GPT
from model.strategy import DecodingSpec

from clock import timer  # bench/clock.py, beside this file
from hf_client import DEFAULT_HF_PYTHON, HuggingFaceSide  # bench/hf_client.py, beside this file

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(block_size=256, n_layer=6, n_head=6, n_embd=384)
READS_PER_TIMING = 20  # on a GPU: sums per clock reading of streaming_read_bandwidth
TINY = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)  # --tiny: a smoke run of every code path


def build_model(vocab_size: int, device: str, shape: dict = SHAPE) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab_size, dropout=0.0, **shape)).to(device).eval()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def decode_precision(model: GPT) -> dict:
    """What our token loop computes in on the model's device, read off the Context that
    model.generate builds there: the weights' dtype, the autocast type (None where it
    runs without autocast) and the KV cache's dtype, as names ("float32", "bfloat16")."""
    context = Context(model, [[0]], 1, "exact")
    autocast = context.precision.dtype  # float32 means no autocast
    return {"device": str(context.tokens.device), "dtype": dtype_name(next(model.parameters()).dtype),
            "autocast": None if autocast == torch.float32 else dtype_name(autocast),
            "kv_cache": dtype_name(context.cache.keys.dtype)}


def describe_precision(precision: dict) -> str:
    """'float32 weights under bfloat16 autocast on cuda:0' and the like."""
    autocast = f" under {precision['autocast']} autocast" if precision["autocast"] else ", no autocast"
    cache = f", {precision['kv_cache']} KV cache" if "kv_cache" in precision else ""
    return f"{precision['dtype']} weights{autocast}{cache} on {precision['device']}"


def tokens_per_second(model, new_tokens: int, window: str, repeats: int, first_seed: int = 0) -> float:
    """The token loop (model, strategy, sampling), without stopping at end-of-text:
    random weights would end samples at random lengths. Each step's token is read back,
    as every reader of the loop (the events) does: on CUDA that waits for the step, as
    transformers' generate() does, instead of queueing the whole generation ahead."""
    clock = timer(next(model.parameters()).device)
    rates = []
    for repeat in range(first_seed, first_seed + repeats):
        started = clock()
        steps = 0
        for step in decode_steps(model, [[0]], DecodingSpec(), new_tokens, [repeat], window=window):
            int(step.tokens[0])
            steps += 1
        rates.append(steps / (clock() - started))
    return statistics.median(rates)


@torch.inference_mode()
def ms_per_token(model, context_length: int, cached: bool, repeats: int) -> float:
    """Median time of the step that reads a context of ``context_length`` tokens."""
    prompt = [i % 64 for i in range(context_length - 1)]
    clock = timer(next(model.parameters()).device)
    times = []
    for _ in range(max(repeats, 5) * 4):
        context = Context(model, [prompt], 1, "exact" if cached else "none")
        context.next_logits()  # prefill the first context_length - 1 tokens
        context.append(torch.tensor([1], device=context.tokens.device))
        started = clock()  # after the prefill has finished on the device
        context.next_logits()  # one step over context_length tokens
        times.append(clock() - started)
    return 1000 * statistics.median(times)


def start_transformers_side(python: str, model: GPT, folder: Path) -> HuggingFaceSide:
    """bench/hf_side.py holding a GPT2LMHeadModel with our model's weights, on our model's
    device, under the autocast our token loop uses there. The file holds CPU tensors (the
    other Python may have no CUDA); the probe's logits are ours in float32, no autocast."""
    weights = folder / f"weights_{model.config.vocab_size}.pt"
    device = next(model.parameters()).device
    probe = torch.randint(model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(probe.to(device))[0].cpu()
    state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state_dict": state, "probe": probe, "logits": logits}, weights)
    return HuggingFaceSide(python, weights, torch.get_num_threads(), str(device), decode_precision(model)["autocast"])


def bytes_per_decode_step(model: GPT, context: float, cache_dtype: torch.dtype = torch.float32) -> float:
    """Bytes a one-token decode step must read with ``context`` positions in the cache:
    every parameter once (named_parameters counts the tied embedding and LM head once,
    and the head reads all of it), except the position table, of which the step reads
    one row; plus the keys and values of ``context`` positions in every layer, in the
    cache's ``cache_dtype`` (float32, bfloat16 under CUDA's autocast)."""
    weights = sum(p[:1].nbytes if name == "wpe.weight" else p.nbytes for name, p in model.named_parameters())
    cfg = model.config
    return weights + 2 * cfg.n_layer * context * cfg.n_embd * cache_dtype.itemsize


def streaming_read_bandwidth(data: torch.Tensor, passes: int = 5) -> float:
    """Bytes/s of ``data.sum()`` (with torch's threads), median of ``passes`` after one
    untimed pass: a read that streams from memory when ``data`` is larger than the
    last-level cache, the same access pattern as a matrix-vector product's weights. On a
    GPU each timing covers READS_PER_TIMING sums, so that a read of a few MB (microseconds
    there) is not lost in the launch and the synchronisation around it."""
    clock = timer(data.device)
    reads = 1 if data.device.type == "cpu" else READS_PER_TIMING
    data.sum()
    times = []
    for _ in range(passes):
        started = clock()
        for _ in range(reads):
            data.sum()
        times.append((clock() - started) / reads)
    return data.nbytes / statistics.median(times)


def against_floor_and_transformers(python: str | None, vocabs: list[int], shape: dict, new_tokens: int,
                                   repeats: int, floor_bytes: int, device: torch.device) -> dict:
    """Our token loop, the streaming read of the floor and (with ``python``) transformers'
    generate(), alternating, one run each per repeat, for each vocabulary, all on ``device``."""
    results = {}
    data = torch.ones(floor_bytes // torch.float32.itemsize, device=device)
    mean_context = (new_tokens + 1) / 2  # step i of a one-token prompt attends to i + 1 positions
    with tempfile.TemporaryDirectory() as folder:
        for vocab in vocabs:
            model = build_model(vocab, device, shape)
            ours_precision = decode_precision(model)
            step_bytes = bytes_per_decode_step(model, mean_context, getattr(torch, ours_precision["kv_cache"]))
            step_sized = torch.ones(int(step_bytes) // torch.float32.itemsize, device=device)
            hf = start_transformers_side(python, model, Path(folder)) if python else None
            try:
                tokens_per_second(model, 8, "exact", 1)  # warm up every side
                if hf:
                    hf.tokens_per_second(8, 0)
                ours, theirs, bandwidths, cached = [], [], [], []
                for repeat in range(repeats):
                    ours.append(tokens_per_second(model, new_tokens, "exact", 1, first_seed=repeat))
                    if hf:
                        theirs.append(hf.tokens_per_second(new_tokens, repeat))
                    bandwidths.append(streaming_read_bandwidth(data))
                    cached.append(streaming_read_bandwidth(step_sized))
            finally:
                if hf:
                    hf.close()
            bandwidth, cached_bandwidth = statistics.median(bandwidths), statistics.median(cached)
            row = results[vocab] = {
                "ours": statistics.median(ours), "bytes_per_step": step_bytes,
                "bandwidth_bytes_per_s": bandwidth, "floor": bandwidth / step_bytes,
                "cached_bandwidth_bytes_per_s": cached_bandwidth, "cached_floor": cached_bandwidth / step_bytes,
                "runs": {"ours": ours, "bandwidth_bytes_per_s": bandwidths, "cached_bandwidth_bytes_per_s": cached},
                "transformers": statistics.median(theirs) if hf else None, "ours_precision": ours_precision,
            }
            line = (f"vocab {vocab}: ours {row['ours']:.0f} tokens/s, floor {row['floor']:.0f} ({step_bytes / 1e6:.1f} "
                    f"MB a step at {bandwidth / 1e9:.1f} GB/s; ours / floor {row['ours'] / row['floor']:.2f}), cached "
                    f"floor {row['cached_floor']:.0f} ({cached_bandwidth / 1e9:.1f} GB/s)")
            if hf:
                row["runs"]["transformers"] = theirs
                row["max_abs_logit_difference"] = hf.info["logit_difference"]
                row["transformers_side"] = hf.info  # its version, device, dtype, autocast, logit checks
                line += (f", transformers {row['transformers']:.0f} ({row['ours'] / row['transformers']:.2f}x; same "
                         f"weights: logits differ by at most {hf.info['logit_difference']:.2g})")
                line += (f"\n  ours: {describe_precision(ours_precision)}; transformers {hf.info['version']}: "
                         f"{describe_precision(hf.info)}")
                if hf.info["autocast"]:
                    line += (f" (its logits under autocast differ from ours in float32 by at most "
                             f"{hf.info['autocast_logit_difference']:.2g})")
            print(line, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=65, help="vocabulary size (65: tinyshakespeare's characters)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--hf-python", default=DEFAULT_HF_PYTHON, help="a Python with transformers for "
                        "the comparison with its generate(), a path or a command on PATH (default: $HF_PYTHON, "
                        "else .venv-hf/bin/python, made by make venv-hf); skipped with a note when there is none")
    parser.add_argument("--hf-vocabs", default="65,50304", help="vocabulary sizes of the comparison with the "
                        "floor and with transformers, comma-separated")
    parser.add_argument("--floor-mib", type=int, help="MiB of the streaming read that measures the bandwidth "
                        "(default 1024, --tiny 64): more than the last-level cache")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-32 model with block 32 and few "
                        "tokens: a smoke run of every measurement, not a measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sample_speed.json")
    args = parser.parse_args()
    shape = TINY if args.tiny else SHAPE
    if args.floor_mib is None:
        args.floor_mib = 64 if args.tiny else 1024
    if args.floor_mib < 1:
        parser.error(f"--floor-mib must be at least 1, got {args.floor_mib}")
    try:
        device = resolve_device(args.device)
    except UserError as error:
        parser.error(str(error))
    block = shape["block_size"]
    inside, past = block - 1, 2 * block - 12  # 255 and 500 for block 256

    model = build_model(args.vocab, device, shape)
    precision = decode_precision(model)
    print(f"our token loop: {describe_precision(precision)}", flush=True)
    tokens_per_second(model, 20, "exact", 1)  # warm up

    throughput = {}
    for new_tokens in (inside, past):
        for window in ("exact", "shift", "none"):
            if new_tokens == inside and window == "shift":
                continue  # inside the window, shift and exact run the same steps
            rate = tokens_per_second(model, new_tokens, window, args.repeats)
            throughput[f"{new_tokens}_{window}"] = rate
            print(f"{new_tokens} tokens, window={window:<5}: {rate:8.1f} tokens/s", flush=True)
    latency = {}
    for length in (block // 16, block // 2, block):
        latency[length] = {
            "cache": ms_per_token(model, length, True, args.repeats),
            "none": ms_per_token(model, length, False, args.repeats),
        }
        print(f"context {length:>3}: {latency[length]['cache']:6.2f} ms/token with the cache, "
              f"{latency[length]['none']:6.2f} without", flush=True)

    python = shutil.which(args.hf_python)  # a path that is an executable file, or a command on PATH
    if python is None:
        print(f"\nskipped the comparison with transformers: no Python at {args.hf_python} (make venv-hf makes "
              ".venv-hf with torch and transformers; or name one with --hf-python or $HF_PYTHON)")
    print()
    vocabs = [int(v) for v in args.hf_vocabs.split(",")]
    versus = against_floor_and_transformers(python, vocabs, shape, inside, args.repeats, args.floor_mib << 20, device)

    print("\n| measure | KV cache | no cache (recompute) | speed-up |\n|---|---|---|---|")
    for new_tokens, what in ((inside, "(inside the window)"), (past, "exact window"), (past, "shift window")):
        cached = throughput[f"{new_tokens}_{'shift' if 'shift' in what else 'exact'}"]
        plain = throughput[f"{new_tokens}_none"]
        print(f"| tokens/s, {new_tokens} new tokens {what} | {cached:.0f} | {plain:.0f} | {cached / plain:.1f}x |")
    for length, row in latency.items():
        print(f"| ms/token at context {length} | {row['cache']:.2f} | {row['none']:.2f} | "
              f"{row['none'] / row['cache']:.1f}x |")
    print("\n| vocabulary | ours, tokens/s | floor, tokens/s | ours / floor | cached floor, tokens/s | ours / cached "
          "floor | transformers generate(), tokens/s | ours / transformers |\n|---|---|---|---|---|---|---|---|")
    for vocab, row in versus.items():
        theirs = (f"{row['transformers']:.0f} | {row['ours'] / row['transformers']:.2f}x" if row["transformers"]
                  else "- | -")
        print(f"| {vocab:,} | {row['ours']:.0f} | {row['floor']:.0f} | {row['ours'] / row['floor']:.2f} | "
              f"{row['cached_floor']:.0f} | {row['ours'] / row['cached_floor']:.2f} | {theirs} |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": {**shape, "vocab_size": args.vocab}, "batch_size": 1, "dtype": precision["dtype"],
        "autocast": precision["autocast"], "kv_cache_dtype": precision["kv_cache"],
        "strategy": "sample (t=1)", "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
        "tokens_per_s": throughput, "ms_per_token": latency, "floor_mib": args.floor_mib,
        "versus_floor_and_transformers": versus,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
