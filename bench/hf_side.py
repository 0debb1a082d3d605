"""The Hugging Face side of bench/sample_speed.py and bench/gpt2_speed.py, run by the
Python of a separate venv that has transformers (never a dependency of the project).

    .venv-hf/bin/python bench/hf_side.py WEIGHTS.pt [--device cuda] [--autocast bfloat16]  # bench/sample_speed.py
    .venv-hf/bin/python bench/hf_side.py FOLDER                                          # bench/gpt2_speed.py

(.venv-hf is made by `make venv-hf`; $HF_PYTHON names another Python with transformers.)

WEIGHTS.pt holds {"config": ModelConfig fields, "state_dict": our GPT's weights, "probe":
token ids, "logits": our logits for them}: this builds a GPT2LMHeadModel with the same
weights (exact GELU, LayerNorm eps 1e-5, as our model). FOLDER is a Hugging Face GPT-2
folder, loaded with from_pretrained. The model is moved to --device (default cpu) in
float32; with --autocast, generate() runs under torch.autocast in that type, as our
token loop does on CUDA. Either way it prints one JSON line when ready: transformers'
version, the device, the weights' dtype and the autocast type it runs with, the peak
host memory the load added, and (for WEIGHTS.pt) the largest difference of its float32
logits from ours on the probe, and of its logits under --autocast when given. Then it answers one line per request on stdin, "TOKENS
SEED THREADS", with the tokens/s of one ``generate()`` call (its KV cache on, plain
sampling at temperature 1, no end-of-text stop, batch 1, from a one-token prompt), timed
by bench/clock.py's clock, which waits for a CUDA device before each reading; an empty
line ends it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from clock import timer  # bench/clock.py, beside this file (standard library only)

AUTOCAST_TYPES = ("bfloat16", "float16")

# torch and transformers are imported after the arguments are read, so that --help
# answers in a Python that has neither.


def gpt2_from(saved: dict) -> GPT2LMHeadModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = saved["config"]
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg["vocab_size"], n_positions=cfg["block_size"], n_embd=cfg["n_embd"], n_layer=cfg["n_layer"],
        n_head=cfg["n_head"], activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    ))
    ours = saved["state_dict"]
    theirs = {"transformer.wte.weight": ours["wte.weight"], "transformer.wpe.weight": ours["wpe.weight"],
              "transformer.ln_f.weight": ours["ln_f.weight"], "transformer.ln_f.bias": ours["ln_f.bias"]}
    for i in range(cfg["n_layer"]):
        a, b = f"blocks.{i}.", f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            theirs[b + norm + ".weight"], theirs[b + norm + ".bias"] = ours[a + norm + ".weight"], ours[a + norm + ".bias"]
        # GPT-2's Conv1D stores (in, out): our nn.Linear weights transposed
        for mine, hf in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                         ("mlp.proj", "mlp.c_proj")):
            theirs[b + hf + ".weight"] = ours[a + mine + ".weight"].t().contiguous()
            theirs[b + hf + ".bias"] = ours[a + mine + ".bias"]
    missing, unexpected = model.load_state_dict(theirs, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")]
    if missing or unexpected:
        raise SystemExit(f"weights do not map: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def autocast_on(device, autocast: str | None) -> contextlib.AbstractContextManager:
    """torch.autocast on ``device`` in the dtype named ``autocast``; nothing when None."""
    import torch

    return torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()


def tokens_per_second(model: GPT2LMHeadModel, new_tokens: int, seed: int, autocast: str | None = None) -> float:
    """Tokens/s of one generate() call on the model's device, under ``autocast`` (a torch
    dtype name) when given; seeding torch seeds the CUDA generators too."""
    import torch

    torch.manual_seed(seed)
    device = model.device
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    clock = timer(device)
    started = clock()
    with autocast_on(device, autocast):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             use_cache=True, eos_token_id=None, pad_token_id=0)
    elapsed = clock() - started
    assert out.size(1) == 1 + new_tokens, out.shape
    return new_tokens / elapsed


def memory(key: str) -> int:
    """Bytes of this process's VmRSS (resident now) or VmHWM (peak resident)."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="WEIGHTS.pt written by bench/sample_speed.py, or a Hugging Face "
                        "GPT-2 folder (bench/gpt2_speed.py)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N")
    parser.add_argument("--autocast", choices=AUTOCAST_TYPES, help="run generate() under torch.autocast in this "
                        "type over the float32 weights (default: none, float32 throughout)")
    args = parser.parse_args()
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"error: {error} in {sys.executable}; run this under a Python that has torch and "
                         "transformers (make venv-hf makes .venv-hf/bin/python)") from None
    serve(args.source, args.device, args.autocast)


def serve(source: Path, device: str = "cpu", autocast: str | None = None) -> None:
    """Load ``source`` onto ``device``, print the ready line, then answer requests on stdin
    until an empty line."""
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    with torch.inference_mode():
        before = memory("VmRSS")
        checks = {}
        if source.is_dir():
            model = GPT2LMHeadModel.from_pretrained(source, dtype=torch.float32).eval().to(device)
        else:
            saved = torch.load(source, weights_only=True)
            model = gpt2_from(saved).to(device)
            # without autocast: the probe checks that the weights map, in float32
            probe = saved["probe"].to(model.device)
            checks["logit_difference"] = (model(probe).logits.cpu() - saved["logits"]).abs().max().item()
            if autocast:  # and under the autocast generate() runs with: how far that moves the logits
                with autocast_on(model.device, autocast):
                    logits = model(probe).logits.float().cpu()
                checks["autocast_logit_difference"] = (logits - saved["logits"]).abs().max().item()
        ready = {"version": transformers.__version__, "device": str(model.device),
                 "dtype": str(model.dtype).removeprefix("torch."), "autocast": autocast, **checks,
                 "load_peak_bytes": memory("VmHWM") - before}
        print(json.dumps(ready), flush=True)
        for line in sys.stdin:
            if not line.strip():
                break
            new_tokens, seed, threads = (int(x) for x in line.split())
            torch.set_num_threads(threads)
            print(f"{tokens_per_second(model, new_tokens, seed, autocast):.6f}", flush=True)


if __name__ == "__main__":
    main()
