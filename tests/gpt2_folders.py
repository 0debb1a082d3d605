"""Synthetic Hugging Face GPT-2 folders for the tests and the bench smoke test: random
weights under GPT-2's own key names and shapes, a tiny byte-level BPE in GPT-2's
vocab.json/merges.txt format, and a plain GPT-2 forward written from those key names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def byte_symbols() -> dict[int, str]:
    """GPT-2's bytes_to_unicode table: printable bytes stand for themselves, the other 68
    get chr(256), chr(257), ... in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


# Four merges on top of the 256 bytes: "he", "ll", "hell", " w"; end-of-text is id 260.
TINY_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]
TINY_VOCAB_SIZE = 256 + len(TINY_MERGES) + 1


def write_tokenizer(folder: Path, merges=TINY_MERGES) -> None:
    """vocab.json + merges.txt: single bytes first (in GPT-2's order: by symbol), then one
    token per merge, then <|endoftext|>."""
    symbols = sorted(byte_symbols().values(), key=lambda s: (ord(s) >= 256, ord(s)))
    vocab = {s: i for i, s in enumerate(symbols)}
    for first, second in merges:
        vocab[first + second] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def pair_merges(count: int) -> list[tuple[str, str]]:
    """``count`` merges of two single bytes each (for a vocabulary of any size up to 65,792)."""
    symbols = [byte_symbols()[b] for b in range(256)]
    return [(symbols[i // 256], symbols[i % 256]) for i in range(count)]


def hf_config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=TINY_VOCAB_SIZE,
              activation="gelu_new", eps=1e-5) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": n_layer, "n_head": n_head,
            "n_embd": n_embd, "n_positions": n_positions, "n_ctx": n_positions, "vocab_size": vocab_size,
            "layer_norm_epsilon": eps, "activation_function": activation, "n_inner": None}


def hf_weights(config: dict, seed: int = 0, prefix: str = "transformer.", buffers: bool = True,
               lm_head: bool = False, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random weights in GPT-2's layout: Conv1D weights stored (in, out). Norm weights
    are drawn around 1 and every bias is non-zero, so a mix-up shows in the logits.
    ``scale`` multiplies every standard deviation."""
    g = torch.Generator().manual_seed(seed)
    L, C, V, T = config["n_layer"], config["n_embd"], config["vocab_size"], config["n_positions"]

    def rand(*shape, mean=0.0, std=0.1):
        return torch.randn(*shape, generator=g) * (std * scale) + mean

    w = {"wte.weight": rand(V, C, std=0.3), "wpe.weight": rand(T, C, std=0.3),
         "ln_f.weight": rand(C, mean=1.0), "ln_f.bias": rand(C)}
    for i in range(L):
        h = f"h.{i}."
        w |= {h + "ln_1.weight": rand(C, mean=1.0), h + "ln_1.bias": rand(C),
              h + "attn.c_attn.weight": rand(C, 3 * C, std=0.3), h + "attn.c_attn.bias": rand(3 * C),
              h + "attn.c_proj.weight": rand(C, C, std=0.3), h + "attn.c_proj.bias": rand(C),
              h + "ln_2.weight": rand(C, mean=1.0), h + "ln_2.bias": rand(C),
              h + "mlp.c_fc.weight": rand(C, 4 * C, std=0.3), h + "mlp.c_fc.bias": rand(4 * C),
              h + "mlp.c_proj.weight": rand(4 * C, C, std=0.3), h + "mlp.c_proj.bias": rand(C)}
        if buffers:
            w[h + "attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
            w[h + "attn.masked_bias"] = torch.tensor(-1e4)
    w = {prefix + k: v for k, v in w.items()}
    if lm_head:
        w["lm_head.weight"] = w[prefix + "wte.weight"].clone()
    return w


def write_folder(folder: Path, config: dict | None = None, weights: dict | None = None, fmt: str = "safetensors",
                 merges=TINY_MERGES, **weight_options) -> Path:
    """A complete folder: config.json, the weights (model.safetensors or pytorch_model.bin), the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    config = config or hf_config()
    weights = weights if weights is not None else hf_weights(config, **weight_options)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    else:
        torch.save(weights, folder / "pytorch_model.bin")
    write_tokenizer(folder, merges)
    return folder


def reference_logits(weights: dict[str, torch.Tensor], config: dict, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward, written from the Hugging Face key names, in float64."""
    w = {k.removeprefix("transformer."): v.double() for k, v in weights.items()}
    H, eps = config["n_head"], config["layer_norm_epsilon"]
    T = idx.size(1)

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], eps)

    def conv1d(x, name):  # Conv1D: x @ W + b with W stored (in, out)
        return x @ w[name + ".weight"] + w[name + ".bias"]

    def gelu(x):
        if config["activation_function"] == "gelu_new":
            return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    x = w["wte.weight"][idx] + w["wpe.weight"][:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(config["n_layer"]):
        h = f"h.{i}."
        q, k, v = conv1d(norm(x, h + "ln_1"), h + "attn.c_attn").chunk(3, dim=-1)
        q, k, v = (t.view(*t.shape[:2], H, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hs)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).masked_fill(~causal, -math.inf)
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = x + conv1d(attended, h + "attn.c_proj")
        x = x + conv1d(gelu(conv1d(norm(x, h + "ln_2"), h + "mlp.c_fc")), h + "mlp.c_proj")
    return norm(x, "ln_f") @ w["wte.weight"].t()
