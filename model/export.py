"""A checkpoint of this project -> a Hugging Face GPT-2 folder: the inverse of model/pretrained.py.

The folder is what transformers' ``GPT2LMHeadModel.from_pretrained(folder)`` reads, and
what this project reads back as any GPT-2 folder (``sample.py FOLDER``, ``init_from``):

    config.json          GPT2Config's fields: the shape, layer_norm_epsilon, activation_function,
                         the dropout rates, tied embeddings, the end-of-text id
    model.safetensors    the weights under GPT2LMHeadModel's names (``transformer.h.N...``),
                         the four Conv1D weights of each layer transposed to (in, out); no
                         ``lm_head.weight``, which transformers ties to ``transformer.wte.weight``
    vocab.json,          the tokenizer, when it is a byte-level BPE with GPT-2's split
      merges.txt         pattern (a GPT-2 folder's own, or one trained by data/prepare.py)

GPT-2 has learned absolute positions, LayerNorm and GELU (exact or tanh), and its head
is the token embedding: a model with rotary positions, RMSNorm or an untied head has
no GPT-2 form and is refused. A model without biases is exported with zero biases, which
compute the same. A char or named tiktoken tokenizer has no vocab.json and merges.txt:
the config and weights are still written (transformers loads the model; its inputs are
token ids), and `Export.tokenizer_note` says why the tokenizer files are missing.

The folder is written into a staging folder beside it and renamed into place at the
end, so an interrupted export leaves no half folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.checkpoint import Checkpoint, fsync_path
from model.config import ModelConfig
from model.errors import UserError
from model.gpt import GPT
from model.pretrained import CONFIG_FILE, SAFETENSORS_FILE, gpt2_name
from model.tokenizer import GPT2_MERGES_FILE, GPT2_VOCAB_FILE, BPETokenizer, Tokenizer, tokenizer_from_state

# ModelConfig.activation -> config.json's activation_function (pretrained.ACTIVATIONS reads it back).
GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


@dataclasses.dataclass(frozen=True)
class Export:
    """What `export_gpt2_folder` wrote: the folder, its files, and why the tokenizer files
    are missing (None when they were written)."""

    folder: Path
    files: tuple[str, ...]
    tokenizer_note: str | None


def gpt2_problems(checkpoint: Checkpoint) -> list[str]:
    """What transformers' GPT-2 cannot represent in this checkpoint's model (empty: nothing)."""
    cfg = checkpoint.config.model
    problems = []
    if cfg.position != "learned":
        problems.append(f"position = {cfg.position!r} (GPT-2 has a learned position table)")
    if cfg.norm != "layernorm":
        problems.append(f"norm = {cfg.norm!r} (GPT-2 uses LayerNorm)")
    if cfg.activation not in GPT2_ACTIVATIONS:
        problems.append(f"activation = {cfg.activation!r} (GPT-2 has {', '.join(GPT2_ACTIVATIONS)})")
    weights = checkpoint.weights
    if not torch.equal(weights["lm_head.weight"], weights["wte.weight"]):
        problems.append("an LM head that is not the token embedding (GPT-2 ties them)")
    return problems


def gpt2_config_json(cfg: ModelConfig, eot_id: int) -> dict:
    """config.json for GPT2Config: the model's shape, with n_positions = block_size (the
    position table it has), vocab_size as the weights have it (padding rows included),
    and the model's dropout as GPT-2's three rates (attention weights, residual, embeddings
    are the three places this GPT applies it)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": GPT2_ACTIVATIONS[cfg.activation],
        "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "use_cache": True, "torch_dtype": "float32",
    }


def gpt2_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights under GPT2LMHeadModel's names, float32, each in memory of its own
    (safetensors stores no views): Conv1D weights transposed, the tied head left out, and
    zero biases where the model has none (GPT-2 always has them). ``weights`` is not changed."""
    with torch.device("meta"):  # the names and shapes of the same model with biases
        shapes = {name: t.shape for name, t in GPT(dataclasses.replace(cfg, bias=True)).state_dict().items()}
    exported = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight":
            continue
        hf_name, transpose = gpt2_name(name)
        tensor = weights[name].float() if name in weights else torch.zeros(shape)
        exported[hf_name] = (tensor.t() if transpose else tensor).contiguous().clone()
    return exported


def tokenizer_files(tokenizer: Tokenizer) -> tuple[dict[str, str], str | None]:
    """({file name: text} of vocab.json and merges.txt, None), or ({}, why there are none)."""
    if not isinstance(tokenizer, BPETokenizer):  # char, or a named tiktoken encoding
        return {}, (f"no {GPT2_VOCAB_FILE} or {GPT2_MERGES_FILE}: the {tokenizer.name} tokenizer has no GPT-2 BPE "
                    "form; transformers loads the model, which takes token ids")
    try:
        vocab, merges = tokenizer.gpt2_files()
    except UserError as error:
        return {}, f"no {GPT2_VOCAB_FILE} or {GPT2_MERGES_FILE}: {error}"
    return {GPT2_VOCAB_FILE: vocab, GPT2_MERGES_FILE: merges}, None


def export_gpt2_folder(checkpoint: Checkpoint, out: str | Path, *, overwrite: bool = False) -> Export:
    """Write ``checkpoint`` as a Hugging Face GPT-2 folder ``out`` (see the module docstring).

    A one-line UserError, before anything is written, for a model GPT-2 cannot represent
    (every reason at once), an ``out`` that is a file, holds the checkpoint itself, or is
    a folder with files in it (unless ``overwrite``: then it is replaced as a whole, after
    the new folder is complete). A failed write (a full disk) leaves ``out`` as it was.
    """
    problems = gpt2_problems(checkpoint)
    if problems:
        raise UserError(f"{checkpoint.path} has no Hugging Face GPT-2 form: {'; '.join(problems)}")
    out = Path(out)
    _check_target(out, checkpoint.path, overwrite)
    tokenizer = tokenizer_from_state(checkpoint.tokenizer)
    cfg = checkpoint.config.model
    texts, note = tokenizer_files(tokenizer)
    texts = {CONFIG_FILE: json.dumps(gpt2_config_json(cfg, tokenizer.eot_id), indent=2) + "\n", **texts}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export.tmp", dir=out.parent))
    except OSError as error:
        raise UserError(f"cannot write into {out.parent} ({error.strerror or error})") from None
    try:
        save_file(gpt2_weights(checkpoint.weights, cfg), str(staging / SAFETENSORS_FILE), metadata={"format": "pt"})
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        for path in staging.iterdir():
            fsync_path(path)
        _replace_folder(staging, out)
    except OSError as error:
        raise UserError(f"could not write {out} ({error.strerror or error}); nothing was changed there") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Export(out, tuple(sorted([SAFETENSORS_FILE, *texts])), note)


def _check_target(out: Path, checkpoint_path: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder to write")
    if out.is_dir() and checkpoint_path.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--out {out} holds the checkpoint {checkpoint_path} itself; name another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it, or name another folder")


def _replace_folder(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is moved aside first and deleted
    only once the new one is in place."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old)  # onto the empty folder just made
        try:
            os.replace(staging, out)
        except OSError:
            os.replace(old, out)  # put it back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)  # onto a missing or empty folder
    fsync_path(out.parent)
