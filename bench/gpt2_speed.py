"""GPT-2 on the CPU: sampling speed against Hugging Face transformers, load memory, bf16.

    python bench/gpt2_speed.py [--threads 2] [--new-tokens 200] [--repeats 3]
                               [--hf-python PYTHON] [--out bench/results/gpt2_speed.json]

A GPT-2 124M-shaped folder (12 layers, 12 heads, width 768, 1024 positions, 50,257
tokens) is written with random weights (speed does not depend on what they say) in the
Hugging Face layout, and loaded by both sides from the same files. Batch 1, one-token
prompt, plain sampling (t=1, no truncation), exactly --new-tokens tokens:

* tokens/s of sample.py's token loop (model.generate.decode_steps) against
  transformers' ``generate()`` with its KV cache, run in a separate Python that has
  transformers (--hf-python, default $HF_PYTHON, else .venv-hf/bin/python in the
  checkout, made by make venv-hf; skipped with a note when there is none). The two sides
  alternate, --repeats times each; medians are reported.
* peak RSS while loading the folder (model.pretrained.load_gpt2, tokenizer included), in
  a fresh process: the high-water mark minus the RSS before loading, against the size
  of the fp32 weights (target: at most 1.3x).
* the same token loop, written out with a bf16 KV cache, with fp32 and with bf16 weights,
  and how far the bf16 logits are from the fp32 ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the synthetic-folder writer lives with the tests

from model.generate import decode_steps  # noqa: E402
from model.gpt import KVCache  # noqa: E402
from model.pretrained import load_gpt2  # noqa: E402
from model.strategy import DecodingSpec  # noqa: E402
from hf_client import DEFAULT_HF_PYTHON, HuggingFaceSide  # noqa: E402  (bench/hf_client.py, beside this file)
from tests.gpt2_folders import hf_config, hf_weights, pair_merges, write_folder  # noqa: E402

# Runs in a fresh process of this project: the peak memory of loading the folder.
LOAD_PROBE = r"""
import json, sys, torch
from model.pretrained import load_gpt2
def vm(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
before = vm("VmRSS")
model, tokenizer = load_gpt2(sys.argv[1])
print(json.dumps({"load_peak_bytes": vm("VmHWM") - before, "after_bytes": vm("VmRSS") - before}))
"""


def write_random_gpt2(folder: Path, n_layer: int, n_head: int, n_embd: int, vocab: int, positions: int) -> dict:
    config = hf_config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=positions, vocab_size=vocab)
    # scale 0.1: standard deviations near GPT-2's own (0.02-0.03), so logits have a realistic size
    write_folder(folder, config, hf_weights(config, scale=0.1, buffers=False), merges=pair_merges(vocab - 257))
    return config


def our_tokens_per_second(model, new_tokens: int, seed: int) -> float:
    """sample.py's token loop, without stopping at end-of-text (random weights would end at random)."""
    started = time.perf_counter()
    steps = sum(1 for _ in decode_steps(model, [[0]], DecodingSpec(), new_tokens, [seed]))
    return steps / (time.perf_counter() - started)


@torch.inference_mode()
def plain_loop_tokens_per_second(model, new_tokens: int, seed: int, dtype: torch.dtype) -> float:
    """The loop written out (cache in ``dtype``, multinomial sampling), for fp32 and bf16 weights alike."""
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache(model.config, 1, new_tokens + 1, "cpu", dtype)
    token = torch.zeros(1, 1, dtype=torch.long)
    started = time.perf_counter()
    for _ in range(new_tokens):
        logits, _ = model(token, cache=cache, last_only=True)
        token = torch.multinomial(logits[:, -1].float().softmax(-1), 1, generator=generator)
    return new_tokens / (time.perf_counter() - started)


@torch.inference_mode()
def bf16_logit_difference(fp32_model, bf16_model, vocab: int, length: int = 64) -> dict:
    idx = torch.randint(vocab, (1, length), generator=torch.Generator().manual_seed(3))
    exact, _ = fp32_model(idx)
    approx, _ = bf16_model(idx)
    approx = approx.float()
    return {"max_abs": (approx - exact).abs().max().item(), "logit_std": exact.std().item(),
            "top1_agreement": (approx.argmax(-1) == exact.argmax(-1)).float().mean().item()}


def wait_until_idle(pid: int, quiet_s: float = 0.5, timeout_s: float = 60.0) -> float:
    """Wait until process ``pid`` uses no CPU for ``quiet_s`` (its threads keep spinning for
    a while after generate() returns, which would slow the next measurement of ours);
    returns the seconds waited."""
    def cpu_ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime of all its threads

    started = time.perf_counter()
    last, quiet_since = cpu_ticks(), time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        time.sleep(0.1)
        now = cpu_ticks()
        if now != last:
            last, quiet_since = now, time.perf_counter()
        elif time.perf_counter() - quiet_since >= quiet_s:
            break
    return time.perf_counter() - started


def load_memory(folder: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(folder)], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin"})
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=12, help="layers (GPT-2 124M: 12)")
    parser.add_argument("--n-head", type=int, default=12, help="attention heads (12)")
    parser.add_argument("--n-embd", type=int, default=768, help="width (768)")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary (50257), at least 257")
    parser.add_argument("--positions", type=int, default=1024, help="position table (1024)")
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--hf-python", default=DEFAULT_HF_PYTHON,
                        help="a Python with transformers installed (default: $HF_PYTHON, else .venv-hf/bin/python, "
                        "made by make venv-hf); '' or a missing path skips the comparison")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpt2_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="gpt2_bench_") as tmp:
        folder = Path(tmp) / "gpt2"
        write_random_gpt2(folder, args.n_layer, args.n_head, args.n_embd, args.vocab, args.positions)
        model, _ = load_gpt2(folder)
        weight_bytes = sum(p.numel() for p in model.parameters()) * 4
        memory = load_memory(folder, args.threads)
        print(f"load: peak RSS +{memory['load_peak_bytes'] / 2**20:.0f} MiB for {weight_bytes / 2**20:.0f} MiB of "
              f"fp32 weights ({memory['load_peak_bytes'] / weight_bytes:.2f}x)", flush=True)

        hf = None
        if args.hf_python and Path(args.hf_python).is_file():
            hf = HuggingFaceSide(args.hf_python, folder, args.threads)
        else:
            print(f"note: no transformers comparison (no Python at --hf-python {args.hf_python!r})")
        our_tokens_per_second(model, 5, 0)  # warm up
        ours, theirs = [], []
        for repeat in range(args.repeats):  # alternate the sides so both see the same machine
            ours.append(our_tokens_per_second(model, args.new_tokens, repeat))
            if hf is not None:
                theirs.append(hf.tokens_per_second(args.new_tokens, repeat))
                wait_until_idle(hf.process.pid)
            print(f"run {repeat + 1}: ours {ours[-1]:.1f} tokens/s" +
                  (f", transformers {theirs[-1]:.1f}" if theirs else ""), flush=True)
        hf_info = hf.info if hf is not None else None
        if hf is not None:
            hf.close()

        bf16_model, _ = load_gpt2(folder, dtype=torch.bfloat16)
        difference = bf16_logit_difference(model, bf16_model, args.vocab, min(64, args.positions))
        plain_fp32, plain_bf16 = [], []
        for repeat in range(args.repeats):
            plain_fp32.append(plain_loop_tokens_per_second(model, args.new_tokens, repeat, torch.float32))
            plain_bf16.append(plain_loop_tokens_per_second(bf16_model, args.new_tokens, repeat, torch.bfloat16))

    results = {
        "ours_tokens_per_s": statistics.median(ours),
        "transformers_tokens_per_s": statistics.median(theirs) if theirs else None,
        "speedup": statistics.median(ours) / statistics.median(theirs) if theirs else None,
        "runs": {"ours": ours, "transformers": theirs, "plain_fp32": plain_fp32, "plain_bf16": plain_bf16},
        "fp32_weight_bytes": weight_bytes, "load_peak_bytes": memory["load_peak_bytes"],
        "load_peak_ratio": memory["load_peak_bytes"] / weight_bytes,
        "transformers_load_peak_bytes": hf_info["load_peak_bytes"] if hf_info else None,
        "transformers_version": hf_info["version"] if hf_info else None,
        "plain_fp32_tokens_per_s": statistics.median(plain_fp32),
        "plain_bf16_tokens_per_s": statistics.median(plain_bf16),
        "bf16_logits": difference,
    }
    MiB = 2**20
    print("\n| measure | value |\n|---|---|")
    print(f"| tokens/s, our token loop (fp32) | {results['ours_tokens_per_s']:.1f} |")
    if theirs:
        print(f"| tokens/s, transformers {hf_info['version']} generate() with cache (fp32) | "
              f"{results['transformers_tokens_per_s']:.1f} |")
        print(f"| speed-up | {results['speedup']:.2f}x |")
    print(f"| load peak RSS / fp32 weights | {memory['load_peak_bytes'] / MiB:.0f} / {weight_bytes / MiB:.0f} MiB = "
          f"{results['load_peak_ratio']:.2f}x |")
    if hf_info:
        print(f"| transformers from_pretrained peak RSS | {hf_info['load_peak_bytes'] / MiB:.0f} MiB |")
    print(f"| tokens/s, written-out loop, fp32 / bf16 weights | {results['plain_fp32_tokens_per_s']:.1f} / "
          f"{results['plain_bf16_tokens_per_s']:.1f} |")
    print(f"| bf16 logits: max abs difference (logit std), top-1 agreement | {difference['max_abs']:.3f} "
          f"({difference['logit_std']:.3f}), {difference['top1_agreement']:.1%} |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd, "vocab_size": args.vocab,
                  "n_positions": args.positions},
        "batch_size": 1, "new_tokens": args.new_tokens, "strategy": "sample (t=1)", "threads": args.threads,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
        **results,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
