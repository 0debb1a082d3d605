"""sample.py export: a checkpoint -> a Hugging Face GPT-2 folder, read back by this
project's own folder loader and by transformers, with the tokenizer files, the refusals
and the atomic write."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sample
import train
from model import export as export_module
from model.bpe_trainer import train_bpe
from model.checkpoint import read_checkpoint, save_checkpoint
from model.config import Config, ModelConfig
from model.errors import UserError
from model.export import GPT2_ACTIVATIONS, export_gpt2_folder
from model.gpt import GPT
from model.pretrained import ACTIVATIONS, load_gpt2
from model.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer
from tests.conftest import HF_PYTHON, ROOT, TINY_TEXT, one_line_error, run_cli
from tests.gpt2_folders import TINY_VOCAB_SIZE, hf_config, pair_merges, write_folder, write_tokenizer
from tests.test_pretrained import finetune_args, tiny_gpt2, tiny_gpt2_dataset  # noqa: F401  (fixtures)


def gpt2_shaped(**changes) -> ModelConfig:
    values = dict(vocab_size=TINY_VOCAB_SIZE, block_size=16, n_layer=2, n_head=2, n_embd=16, position="learned",
                  activation="gelu_tanh")
    return ModelConfig(**{**values, **changes})


def write_checkpoint(path: Path, cfg: ModelConfig, tokenizer_state: dict, seed: int = 0) -> GPT:
    """A checkpoint of GPT(cfg) whose every weight is moved off its initial value (biases
    off 0, norms off 1), so a mix-up of names or a missing transpose shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    save_checkpoint(path, model=model, config=Config(model=cfg).to_dict(), tokenizer=tokenizer_state)
    return model


@pytest.fixture
def gpt2_tokenizer(tmp_path) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_folder(write_folder(tmp_path / "source", hf_config()))


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("changes", [{}, {"activation": "gelu"}, {"bias": False}, {"norm_eps": 1e-3},
                                     {"vocab_size": 320}])  # 320: padding rows past the tokenizer's 261
def test_export_then_load_gives_the_same_model(tmp_path, gpt2_tokenizer, changes):
    cfg = gpt2_shaped(**changes)
    model = write_checkpoint(tmp_path / "ckpt.pt", cfg, gpt2_tokenizer.state())
    export_gpt2_folder(read_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "hf")
    loaded, tokenizer = load_gpt2(tmp_path / "hf")
    assert tokenizer.state() == gpt2_tokenizer.state()
    idx = torch.randint(TINY_VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(loaded, idx), logits(model, idx))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_config_json_and_tensor_layout(tmp_path, gpt2_tokenizer):
    cfg = gpt2_shaped(dropout=0.1, norm_eps=1e-4)
    model = write_checkpoint(tmp_path / "ckpt.pt", cfg, gpt2_tokenizer.state())
    written = export_gpt2_folder(read_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "hf")
    assert written.files == ("config.json", "merges.txt", "model.safetensors", "vocab.json")
    assert written.tokenizer_note is None
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "architectures", "n_layer", "n_head", "n_embd", "n_positions",
                                   "vocab_size", "layer_norm_epsilon", "activation_function", "tie_word_embeddings",
                                   "resid_pdrop", "eos_token_id")} == {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_head": 2, "n_embd": 16,
        "n_positions": 16, "vocab_size": 261, "layer_norm_epsilon": 1e-4, "activation_function": "gelu_new",
        "tie_word_embeddings": True, "resid_pdrop": 0.1, "eos_token_id": 260}
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert len(tensors) == 3 + 1 + 2 * 12  # wte, wpe, ln_f weight + bias, 12 per layer; no lm_head (tied)
    # Conv1D: (in, out), x @ W + b; nn.Linear: (out, in)
    assert torch.equal(tensors["transformer.h.1.attn.c_attn.weight"], model.blocks[1].attn.qkv.weight.t())
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (16, 64)
    assert torch.equal(tensors["transformer.h.0.mlp.c_proj.bias"], model.blocks[0].mlp.proj.bias)
    assert torch.equal(tensors["transformer.wpe.weight"], model.wpe.weight)


def test_every_activation_reads_back_as_itself():
    assert {ours: ACTIVATIONS[name] for ours, name in GPT2_ACTIVATIONS.items()} == {"gelu": "gelu",
                                                                                  "gelu_tanh": "gelu_tanh"}


def test_tokenizer_files_are_those_of_the_source_folder(tmp_path, gpt2_tokenizer):
    write_checkpoint(tmp_path / "ckpt.pt", gpt2_shaped(), gpt2_tokenizer.state())
    export_gpt2_folder(read_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "hf")
    source = tmp_path / "source"
    assert (tmp_path / "hf" / "merges.txt").read_text() == (source / "merges.txt").read_text()
    assert json.loads((tmp_path / "hf" / "vocab.json").read_text()) == json.loads((source / "vocab.json").read_text())


@settings(max_examples=15, deadline=None)
@given(st.text(alphabet="ab cé\n", min_size=20, max_size=200), st.integers(258, 300))
def test_a_trained_bpe_writes_merges_that_read_back_as_the_same_ranks(text, vocab_size):
    tokenizer = BPETokenizer(train_bpe([text], vocab_size))
    vocab, merges = tokenizer.gpt2_files()
    lines = merges.splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + tokenizer.vocab_size - 257
    # GPT2Tokenizer.from_files checks that merge i makes token 256 + i, and gives the ranks back
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(vocab, encoding="utf-8")
        (Path(folder) / "merges.txt").write_text(merges, encoding="utf-8")
        read_back = GPT2Tokenizer.from_folder(folder)
    assert read_back.ranks == tokenizer.ranks and read_back.encode(text) == tokenizer.encode(text)


def test_ranks_without_a_merges_form_have_no_tokenizer_files():
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256  # neither "ab" nor "bc" is ranked below it: no merge of two tokens makes it
    with pytest.raises(UserError, match=r"token 256 \(b'abc'\) is not the merge of two tokens ranked below it"):
        BPETokenizer(ranks).gpt2_files()


def test_a_char_model_is_written_without_tokenizer_files(tmp_path):
    chars = CharTokenizer("abc \n")
    write_checkpoint(tmp_path / "ckpt.pt", gpt2_shaped(vocab_size=chars.vocab_size), chars.state())
    written = export_gpt2_folder(read_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert written.tokenizer_note.startswith("no vocab.json or merges.txt: the char tokenizer has no GPT-2 BPE form")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == chars.eot_id


def test_a_model_gpt2_cannot_represent_is_refused_naming_every_reason(tmp_path, gpt2_tokenizer):
    write_checkpoint(tmp_path / "ckpt.pt", gpt2_shaped(position="rope", norm="rmsnorm"), gpt2_tokenizer.state())
    with pytest.raises(UserError) as error:
        export_gpt2_folder(read_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "hf")
    assert str(error.value) == (f"{tmp_path / 'ckpt.pt'} has no Hugging Face GPT-2 form: position = 'rope' (GPT-2 "
                                "has a learned position table); norm = 'rmsnorm' (GPT-2 uses LayerNorm)")
    assert not (tmp_path / "hf").exists()


def test_an_untied_head_is_refused(tmp_path, gpt2_tokenizer):
    write_checkpoint(tmp_path / "ckpt.pt", gpt2_shaped(), gpt2_tokenizer.state())
    checkpoint = read_checkpoint(tmp_path / "ckpt.pt")
    checkpoint.weights["lm_head.weight"] = checkpoint.weights["wte.weight"] + 1
    with pytest.raises(UserError, match="an LM head that is not the token embedding"):
        export_gpt2_folder(checkpoint, tmp_path / "hf")


def test_a_folder_with_files_is_kept_unless_overwrite(tmp_path, gpt2_tokenizer):
    write_checkpoint(tmp_path / "ckpt.pt", gpt2_shaped(), gpt2_tokenizer.state())
    checkpoint = read_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "hf"
    out.mkdir()
    export_gpt2_folder(checkpoint, out)  # an empty folder is filled
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out .*/hf is not empty; pass --overwrite to replace it"):
        export_gpt2_folder(checkpoint, out)
    assert (out / "notes.txt").read_text() == "mine"
    export_gpt2_folder(checkpoint, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "hf", "source"]  # no staging left behind


def test_the_checkpoints_own_folder_and_a_file_are_refused(tmp_path, gpt2_tokenizer):
    write_checkpoint(tmp_path / "run" / "ckpt.pt", gpt2_shaped(), gpt2_tokenizer.state())
    checkpoint = read_checkpoint(tmp_path / "run" / "ckpt.pt")
    with pytest.raises(UserError, match=r"holds the checkpoint .*ckpt.pt itself"):
        export_gpt2_folder(checkpoint, tmp_path / "run", overwrite=True)
    with pytest.raises(UserError, match=r"is a file; name a folder"):
        export_gpt2_folder(checkpoint, tmp_path / "run" / "ckpt.pt")


def test_a_failed_write_leaves_the_old_folder_and_no_staging(tmp_path, gpt2_tokenizer, monkeypatch):
    write_checkpoint(tmp_path / "ckpt.pt", gpt2_shaped(), gpt2_tokenizer.state())
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "save_file", disk_full)
    with pytest.raises(UserError, match=r"could not write .*hf \(No space left on device\); nothing was changed"):
        export_gpt2_folder(read_checkpoint(tmp_path / "ckpt.pt"), out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "hf", "source"]


def test_an_unwritable_parent_is_one_line(tmp_path, gpt2_tokenizer):
    write_checkpoint(tmp_path / "ckpt.pt", gpt2_shaped(), gpt2_tokenizer.state())
    (tmp_path / "a file").write_text("")
    with pytest.raises(UserError, match=r"cannot write into .*a file \(File exists\)"):
        export_gpt2_folder(read_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "a file" / "hf")


def test_cli_writes_the_folder_and_says_what_it_wrote(tmp_path, gpt2_tokenizer, capsys):
    write_checkpoint(tmp_path / "ckpt.pt", gpt2_shaped(), gpt2_tokenizer.state())
    assert sample.main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out == (f"wrote {tmp_path / 'hf'}: config.json, merges.txt, model.safetensors, "
                                       "vocab.json\n")
    assert sample.main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")]) == 2
    assert one_line_error(capsys.readouterr().err).endswith("is not empty; pass --overwrite to replace it, or name "
                                                            "another folder")


def test_cli_refuses_a_folder_as_the_checkpoint_in_one_line(tmp_path):
    write_folder(tmp_path / "gpt2", hf_config())
    result = run_cli("sample.py", "export", str(tmp_path / "gpt2"), "--out", str(tmp_path / "hf"))
    assert one_line_error(result) == (f"error: {tmp_path / 'gpt2'} is a folder; export reads a .pt checkpoint "
                                      "written by train.py")


def test_export_after_a_two_step_finetune_of_a_gpt2_folder(tiny_gpt2, tiny_gpt2_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(finetune_args(tiny_gpt2, tiny_gpt2_dataset, out, "max_iters=2", "eval_interval=2")) == 0
    checkpoint = read_checkpoint(out / "last.pt")
    export_gpt2_folder(checkpoint, tmp_path / "hf")
    loaded, _ = load_gpt2(tmp_path / "hf")
    tuned = checkpoint.build_model().eval()
    idx = torch.randint(TINY_VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(loaded, idx), logits(tuned, idx))
    original, _ = load_gpt2(tiny_gpt2, block_size=16)
    assert not torch.equal(logits(original, idx), logits(tuned, idx))  # the fine-tune changed the weights
    capsys.readouterr()
    assert sample.main([str(tmp_path / "hf"), "--prompt", "hello", "--strategy", "greedy", "--max-new-tokens", "4",
                        "--device", "cpu"]) == 0
    folder_text = capsys.readouterr().out
    assert sample.main([str(out / "last.pt"), "--prompt", "hello", "--strategy", "greedy", "--max-new-tokens", "4",
                        "--device", "cpu"]) == 0
    assert capsys.readouterr().out == folder_text


# ------------------------------------------------------------------ transformers (in .venv-hf)

HF_CHECK = """
import json, sys, torch
from transformers import AutoTokenizer, GPT2LMHeadModel
folder, idx_path, out_path, text = sys.argv[1:5]
model = GPT2LMHeadModel.from_pretrained(folder).eval()
with torch.no_grad():
    logits = model(torch.load(idx_path)).logits
tokenizer = AutoTokenizer.from_pretrained(folder)
torch.save({"logits": logits, "ids": tokenizer(text)["input_ids"], "eos": tokenizer.eos_token_id}, out_path)
"""


# slow: the transformers import alone takes several seconds
@pytest.mark.slow
@pytest.mark.skipif(not HF_PYTHON.exists(), reason=f"no transformers venv at {HF_PYTHON}")
@pytest.mark.parametrize("changes, trained_bpe", [({}, False), ({"activation": "gelu", "bias": False}, False),
                                                  ({}, True)])
def test_transformers_reads_the_export_as_the_same_model_and_tokenizer(tmp_path, gpt2_tokenizer, changes,
                                                                       trained_bpe):
    tokenizer = BPETokenizer(train_bpe([TINY_TEXT], 300)) if trained_bpe else gpt2_tokenizer
    cfg = gpt2_shaped(**changes, vocab_size=320)  # padding rows past the tokenizer's ids
    model = write_checkpoint(tmp_path / "ckpt.pt", cfg, tokenizer.state())
    export_gpt2_folder(read_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "hf")
    idx = torch.randint(cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(3))
    torch.save(idx, tmp_path / "idx.pt")
    text = TINY_TEXT[:300] + "hello world, well hell\n  wheel  \u00e9t\u00e9 \u2013 done"
    result = subprocess.run([str(HF_PYTHON), "-c", HF_CHECK, str(tmp_path / "hf"), str(tmp_path / "idx.pt"),
                             str(tmp_path / "theirs.pt"), text], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    theirs = torch.load(tmp_path / "theirs.pt")
    difference = (theirs["logits"] - logits(model, idx)).abs().max().item()
    print(f"max logit difference, transformers' GPT2LMHeadModel of the export against ours: {difference:.3g}")
    assert difference < 1e-5
    assert theirs["ids"] == tokenizer.encode(text) and theirs["eos"] == tokenizer.eot_id


# slow: a GPT-2 small shape (124M parameters, 50,257 tokens) takes about 20 s and 2 GB
@pytest.mark.slow
@pytest.mark.skipif(not HF_PYTHON.exists(), reason=f"no transformers venv at {HF_PYTHON}")
def test_a_gpt2_small_shaped_export_reads_back_in_transformers(tmp_path):
    (tmp_path / "source").mkdir()
    write_tokenizer(tmp_path / "source", pair_merges(50_000))  # 50,257 ids, as GPT-2's
    tokenizer = GPT2Tokenizer.from_folder(tmp_path / "source")
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                      activation="gelu_tanh")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    save_checkpoint(tmp_path / "ckpt.pt", model=model, config=Config(model=cfg).to_dict(), tokenizer=tokenizer.state())
    export_gpt2_folder(read_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "hf")
    assert (tmp_path / "hf" / "merges.txt").read_text() == (tmp_path / "source" / "merges.txt").read_text()
    idx = torch.randint(cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    torch.save(idx, tmp_path / "idx.pt")
    result = subprocess.run([str(HF_PYTHON), "-c", HF_CHECK, str(tmp_path / "hf"), str(tmp_path / "idx.pt"),
                             str(tmp_path / "theirs.pt"), "hello world"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    theirs = torch.load(tmp_path / "theirs.pt")
    assert (theirs["logits"] - logits(model, idx)).abs().max().item() < 1e-5
    assert theirs["ids"] == tokenizer.encode("hello world")
