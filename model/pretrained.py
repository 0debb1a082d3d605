"""A local Hugging Face GPT-2 folder -> GPT + GPT-2 tokenizer, without transformers.

The folder is what ``huggingface-cli download openai-community/gpt2`` (or a git clone
of the model repository) writes:

    config.json                         the shape (n_layer, n_head, n_embd, n_positions, ...)
    model.safetensors or                the weights, read with the safetensors package, or
      pytorch_model.bin                 with torch.load(weights_only=True)
    vocab.json, merges.txt              GPT-2's byte-level BPE (see tokenizer.GPT2Tokenizer)

Every GPT-2 size (gpt2, -medium, -large, -xl) and distilgpt2 has this layout. The
network is this project's GPT with learned positions, biases, tied embeddings, GELU's
tanh approximation (GPT-2's "gelu_new") and config.json's LayerNorm epsilon.

Weight names differ from ours in three ways: they may start with ``transformer.``
(GPT2LMHeadModel saves them so, GPT2Model without); GPT-2's linear layers are "Conv1D"
modules that store their weight as (in, out), the transpose of nn.Linear's; and the
files may hold the attention's causal-mask buffers (``attn.bias``, ``attn.masked_bias``)
and the tied ``lm_head.weight``, which carry no information here.

Memory: the model is built on the meta device (no storage, no random init) and each
tensor, as it is read, becomes its parameter, so the peak stays near one copy of the
weights (bench/gpt2_speed.py measures it). Before that, a shape too large for the
device's memory is refused from config.json alone (model/memory.py).
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.config import ModelConfig
from model.errors import UserError
from model.gpt import GPT
from model.memory import check_model_memory
from model.tokenizer import GPT2_MERGES_FILE, GPT2_VOCAB_FILE, GPT2Tokenizer, read_json_object

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"

# config.json's activation_function -> ModelConfig.activation. gelu_new and
# gelu_pytorch_tanh are the same formula, GELU's tanh approximation.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

# Entries of a Hugging Face GPT-2 file that are not parameters of our model.
_IGNORED = re.compile(r"(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)")

# GPT-2's module names -> ours, inside layer N (h.N. -> blocks.N.) and outside the layers
# (the same names). Read in both directions: loading here, exporting in model/export.py.
LAYER_MODULES = {"ln_1": "ln_1", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "ln_2": "ln_2",
                 "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
TOP_MODULES = ("wte", "wpe", "ln_f")
# GPT-2's linear layers are "Conv1D" modules: their weight is stored (in, out), nn.Linear's transposed.
CONV1D_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_PARAMETER = re.compile(r"(?:(h|blocks)\.(\d+)\.)?(.+)\.(weight|bias)")


def is_gpt2_folder(path: str | Path) -> bool:
    """Whether ``path`` names a folder (a model folder, not a checkpoint file)."""
    return Path(path).is_dir()


def check_folder(folder: str | Path) -> None:
    """Raise one UserError naming every file the folder lacks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"GPT-2 folder not found: {folder}")
    missing = [name for name in (CONFIG_FILE, GPT2_VOCAB_FILE, GPT2_MERGES_FILE) if not (folder / name).is_file()]
    if not (folder / SAFETENSORS_FILE).is_file() and not (folder / TORCH_FILE).is_file():
        missing.append(f"{SAFETENSORS_FILE} (or {TORCH_FILE})")
    if missing:
        raise UserError(f"{folder} is not a complete Hugging Face GPT-2 folder: it lacks {', '.join(missing)}")


def gpt2_config(folder: str | Path, block_size: int | None = None) -> ModelConfig:
    """The ModelConfig that config.json describes; ``block_size`` below n_positions crops
    the position table (a shorter context, e.g. for fine-tuning on a CPU)."""
    path = Path(folder) / CONFIG_FILE
    hf = read_json_object(path)
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise UserError(f"{path}: model_type {model_type!r} is not GPT-2; only GPT-2 models (gpt2, gpt2-medium, "
                        "gpt2-large, gpt2-xl, distilgpt2) load here")
    shape = {}
    for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
        shape[key] = _positive_int(hf, key, path)
    n_positions = _positive_int(hf, "n_positions" if "n_positions" in hf else "n_ctx", path)
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise UserError(f"{path}: activation_function {activation!r} is not supported "
                        f"(known: {', '.join(ACTIVATIONS)})")
    if hf.get("n_inner") not in (None, 4 * shape["n_embd"]):
        raise UserError(f"{path}: n_inner {hf['n_inner']} is not 4 x n_embd, the MLP width of this GPT")
    for key, expected in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, expected) != expected:
            raise UserError(f"{path}: {key} = {hf[key]} changes the attention; only {key} = {expected} is supported")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise UserError(f"{path}: layer_norm_epsilon must be a number, got {eps!r}")
    if block_size is not None and block_size > n_positions:
        raise UserError(f"block_size {block_size} exceeds the {n_positions} positions of the model in {folder}")
    cfg = ModelConfig(
        **shape, block_size=block_size or n_positions, bias=True, position="learned", norm="layernorm",
        norm_eps=float(eps), activation=ACTIVATIONS[activation], dropout=0.0,
    )
    cfg.validate()
    return cfg


def _positive_int(hf: dict, key: str, path: Path) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def load_gpt2(
    folder: str | Path, *, block_size: int | None = None, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[GPT, GPT2Tokenizer]:
    """The GPT and the tokenizer of a Hugging Face GPT-2 folder (the model in eval mode).

    Every problem with the folder (a missing file, another architecture, weights that do
    not fit config.json, a damaged file, a tokenizer larger than vocab_size) is a one-line
    UserError; nothing is written.
    """
    folder = Path(folder)
    check_folder(folder)
    cfg = gpt2_config(folder, block_size)
    tokenizer = GPT2Tokenizer.from_folder(folder)
    # A larger vocab_size is padding (train.py's vocab_multiple; an exported checkpoint
    # keeps it): the decoding never samples those ids (decoding.mask_vocab_padding).
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{folder}: {GPT2_VOCAB_FILE} and {GPT2_MERGES_FILE} make {tokenizer.vocab_size:,} tokens "
                        f"but {CONFIG_FILE} says vocab_size {cfg.vocab_size:,}")
    return load_gpt2_weights(folder, cfg, device=device, dtype=dtype), tokenizer


def load_gpt2_weights(
    folder: Path, cfg: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> GPT:
    """Build GPT(cfg) without storage or initialisation and give it the folder's weights.

    Each tensor is read in pieces of at most CHUNK_BYTES straight into its parameter
    (transposed, cropped, cast on the way), so memory holds the weights once plus one
    piece. The memory the model needs and the file's number of layers are checked first:
    even on the meta device, building 10^5 layers takes minutes."""
    source = _weight_file(folder)
    check_model_memory(cfg, device, dtype, str(folder / CONFIG_FILE))
    names, tensors = _tensors(source)
    _check_layers(names, cfg, source)
    with torch.device("meta"):
        model = GPT(cfg)
    shapes = {name: p.shape for name, p in model.named_parameters()}  # the tied head is wte.weight
    state: dict[str, torch.Tensor] = {}
    for hf_name, entry in tensors:
        name, transpose = _our_name(hf_name)
        if name is None:
            continue
        if name not in shapes:
            raise UserError(f"{source.name}: {hf_name} is not a weight of a GPT-2 model; "
                            "the weights belong to another model")
        state[name] = _read_parameter(entry, transpose, shapes[name], hf_name, source.name, cfg, device, dtype)
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise UserError(f"{source.name} has no weight for {missing[0]} ({len(missing)} missing)")
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, assign=True)
    model.lm_head.weight = model.wte.weight  # one tensor, as GPT ties them
    return model.eval()


_LAYER = re.compile(r"(?:transformer\.)?h\.(\d+)\..*")


def _check_layers(names: list[str], cfg: ModelConfig, source: Path) -> None:
    """The weight file must hold config.json's n_layer layers, h.0 to h.{n_layer - 1}."""
    layers, wanted = {int(m.group(1)) for m in map(_LAYER.fullmatch, names) if m}, set(range(cfg.n_layer))
    missing, extra = sorted(wanted - layers), sorted(layers - wanted)
    if missing:
        raise UserError(f"{source.name} has no weights for layer h.{missing[0]} ({len(missing):,} of the "
                        f"{cfg.n_layer:,} layers of {CONFIG_FILE} missing); the weights belong to another model")
    if extra:
        raise UserError(f"{source.name} holds layer h.{extra[0]}, beyond the n_layer {cfg.n_layer:,} of "
                        f"{CONFIG_FILE}; the weights belong to another model")


def _our_name(hf_name: str) -> tuple[str | None, bool]:
    """(our parameter name or None for an entry to skip, whether it is a Conv1D weight)."""
    name = hf_name.removeprefix("transformer.")
    if _IGNORED.fullmatch(name):
        return None, False
    match = _PARAMETER.fullmatch(name)
    if match and match[1] == "h" and match[3] in LAYER_MODULES:
        return (f"blocks.{match[2]}.{LAYER_MODULES[match[3]]}.{match[4]}",
                match[3] in CONV1D_MODULES and match[4] == "weight")
    if match and match[1] is None and match[3] in TOP_MODULES:
        return name, False
    return f"<unknown {hf_name}>", False


_HF_MODULES = {ours: theirs for theirs, ours in LAYER_MODULES.items()}


def gpt2_name(name: str) -> tuple[str, bool]:
    """The inverse of reading a folder: our parameter name (not the tied lm_head.weight)
    -> (its name in a GPT2LMHeadModel file, whether it is stored transposed as a Conv1D
    weight). A KeyError for a name GPT-2 has no place for."""
    match = _PARAMETER.fullmatch(name)
    if match and match[1] == "blocks" and match[3] in _HF_MODULES:
        module = _HF_MODULES[match[3]]
        return f"transformer.h.{match[2]}.{module}.{match[4]}", module in CONV1D_MODULES and match[4] == "weight"
    if match and match[1] is None and match[3] in TOP_MODULES:
        return f"transformer.{name}", False
    raise KeyError(name)


CHUNK_BYTES = 2**20  # how much of a tensor is read at once


class _Entry:
    """One tensor of a weight file: its shape, whether it is floating-point, and a reader
    of its rows start:stop."""

    def __init__(self, shape: tuple[int, ...], floating: bool, read_rows: Callable[[int, int], torch.Tensor]):
        self.shape, self.floating, self.read_rows = shape, floating, read_rows


def _read_parameter(
    entry: _Entry, transpose: bool, shape: torch.Size, hf_name: str, file_name: str, cfg: ModelConfig,
    device: str | torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    """The file's tensor as our parameter: (out, in) for Conv1D weights (which store
    (in, out)), the first block_size positions only, ``dtype`` on ``device``, in memory
    of its own (never a view of the mapped file: training writes to parameters)."""
    file_shape = entry.shape
    if hf_name.endswith("wpe.weight") and len(file_shape) == 2 and file_shape[0] > cfg.block_size:
        file_shape = (cfg.block_size, *file_shape[1:])  # a shorter context keeps the first positions
    wanted = (shape[1], shape[0]) if transpose else tuple(shape)
    if tuple(file_shape) != wanted:
        raise UserError(f"{file_name}: {hf_name} has shape {tuple(entry.shape)} but {CONFIG_FILE} "
                        f"(n_embd {cfg.n_embd}, vocab_size {cfg.vocab_size}) implies {wanted}")
    if not entry.floating:
        raise UserError(f"{file_name}: {hf_name} does not hold floating-point weights")
    parameter = torch.empty(shape, dtype=dtype, device=device)
    target = parameter.t() if transpose else parameter  # file rows are the target's rows
    rows = file_shape[0]
    row_bytes = max(1, target[0].numel() * 4) if target.dim() > 1 else 4
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        rows_read = entry.read_rows(start, stop)
        if not torch.isfinite(rows_read).all():  # caught here, not as NaN logits in sample or score
            raise UserError(f"{file_name}: {hf_name} holds NaN or infinite weights (in rows {start} to {stop - 1})")
        target[start:stop].copy_(rows_read)
    return parameter


def _weight_file(folder: Path) -> Path:
    """model.safetensors, or else pytorch_model.bin (check_folder made sure one is there)."""
    path = folder / SAFETENSORS_FILE
    return path if path.is_file() else folder / TORCH_FILE


def _tensors(path: Path) -> tuple[list[str], Iterator[tuple[str, _Entry]]]:
    """The names of the weight file's tensors, and (name, entry) for each of them."""
    if path.name == SAFETENSORS_FILE:
        try:
            with safe_open(str(path), framework="pt") as f:
                described = [(name, tuple(s.get_shape()), s.get_dtype())
                             for name, s in ((name, f.get_slice(name)) for name in f.keys())]
        except SafetensorError as e:
            raise UserError(f"{path} is truncated or not a safetensors file ({_first_line(e)})") from None
        return [name for name, _, _ in described], _safetensor_entries(path, described)
    state = _load_state(path)
    return list(state), _popped_entries(state)


def _safetensor_entries(path: Path, described: list[tuple[str, tuple[int, ...], str]]) -> Iterator[tuple[str, _Entry]]:
    for name, shape, dtype in described:
        reader = (lambda start, stop, name=name: _read_safetensor_rows(path, name, start, stop))
        yield name, _Entry(shape, dtype in _FLOAT_DTYPES, reader)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """pytorch_model.bin's dict of tensors, read with torch.load(weights_only=True)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} is not a plain dict of tensors: torch.load(weights_only=True) refuses it "
                        f"({_first_line(e)})") from None
    except Exception as e:  # arbitrary bytes fail in many ways (zip, EOF, OS errors)
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a plain dict of tensors (it holds a {type(state).__name__} of other things)")
    return state


def _popped_entries(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, _Entry]]:
    for name in list(state):
        tensor = state.pop(name)  # dropped once copied: the loaded file shrinks as the model grows
        yield name, _Entry(tuple(tensor.shape), tensor.is_floating_point(),
                           lambda start, stop, tensor=tensor: tensor[start:stop] if tensor.dim() else tensor)
        del tensor


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _read_safetensor_rows(path: Path, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of one tensor, through a mapping of the file that is closed right
    after: the pages of an open mapping count towards the process's memory, so reading a
    whole file through one mapping would hold a second copy of the weights."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice(name)[start:stop]
    except SafetensorError as e:
        raise UserError(f"{path} is truncated or damaged at {name} ({_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
