"""The checkpoint format: round trip, atomic saves, clear errors for bad files."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from model.checkpoint import (
    FORMAT, Checkpoint, load_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint,
)
from model.config import ModelConfig
from model.errors import UserError
from model.gpt import GPT
from tests.conftest import one_line_error, tiny_config

CONFIG = {"model": vars(tiny_config()), "train": {}}
TOKENIZER = {"kind": "char", "chars": "abc"}


def save(path, model, **kwargs):
    save_checkpoint(path, model=model, config=CONFIG, tokenizer=TOKENIZER, **kwargs)


def test_round_trip_gives_identical_logits(tmp_path, tiny_model):
    optimizer = torch.optim.AdamW(tiny_model.parameters())
    save(tmp_path / "c.pt", tiny_model, optimizer=optimizer, step=7, best_val_loss=1.5)
    payload = load_checkpoint(tmp_path / "c.pt")
    loaded = model_from_checkpoint(payload).eval()
    idx = torch.randint(37, (2, 16))
    assert torch.equal(loaded(idx)[0], tiny_model(idx)[0])
    assert payload["step"] == 7 and payload["best_val_loss"] == 1.5 and payload["tokenizer"] == TOKENIZER


def test_read_checkpoint_gives_a_typed_frozen_value(tmp_path, tiny_model):
    save(tmp_path / "c.pt", tiny_model, step=7, best_val_loss=1.5, extra={"note": 1})
    checkpoint = read_checkpoint(tmp_path / "c.pt")
    assert isinstance(checkpoint, Checkpoint) and checkpoint.path == tmp_path / "c.pt"
    assert checkpoint.config.model == tiny_config() and isinstance(checkpoint.config.model, ModelConfig)
    assert (checkpoint.step, checkpoint.best_val_loss, checkpoint.tokenizer) == (7, 1.5, TOKENIZER)
    assert checkpoint.optimizer is None and checkpoint.extra == {"note": 1}
    idx = torch.randint(37, (2, 16))
    assert torch.equal(checkpoint.build_model().eval()(idx)[0], tiny_model(idx)[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        checkpoint.step = 8


def test_compiled_model_checkpoint_loads_into_a_plain_one(tmp_path, tiny_model):
    compiled = torch.compile(tiny_model)  # wrapping alone renames every parameter "_orig_mod.*"
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save(tmp_path / "c.pt", compiled)
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt")).eval()
    idx = torch.randint(37, (1, 8))
    assert torch.equal(loaded(idx)[0], tiny_model(idx)[0])


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "c.pt"
    save(path, tiny_model, step=1)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save(path, tiny_model, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_missing_truncated_and_foreign_files(tmp_path, tiny_model):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")

    good = tmp_path / "good.pt"
    save(good, tiny_model)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(truncated)

    text = tmp_path / "notes.pt"
    text.write_text("just some text")
    with pytest.raises(UserError, match="not a tinygpt checkpoint|truncated or corrupt"):
        load_checkpoint(text)

    other = tmp_path / "other.pt"
    torch.save({"state_dict": tiny_model.state_dict()}, other)
    with pytest.raises(UserError, match="not a tinygpt checkpoint"):
        load_checkpoint(other)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "x": Evil()}, evil)
    with pytest.raises(UserError, match="not a tinygpt checkpoint"):
        load_checkpoint(evil)

    raw_pickle = tmp_path / "pickle.pt"
    raw_pickle.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UserError):
        load_checkpoint(raw_pickle)


def test_weights_load_into_the_right_shape(tmp_path):
    model = GPT(tiny_config(n_layer=1))
    save_checkpoint(tmp_path / "c.pt", model=model, config={"model": vars(tiny_config(n_layer=1))}, tokenizer=TOKENIZER)
    assert model_from_checkpoint(load_checkpoint(tmp_path / "c.pt")).config.n_layer == 1


def spoil(payload: dict, damage: str) -> None:
    """Damage a checkpoint's payload the way a hand-edited or foreign file would be."""
    if damage.startswith("no "):
        del payload[damage.removeprefix("no ")]
    elif damage == "tokenizer None":
        payload["tokenizer"] = None
    elif damage == "unknown config key":
        payload["config"]["model"]["n_layers"] = payload["config"]["model"].pop("n_layer")
    elif damage == "config not matching weights":
        payload["config"]["model"]["n_layer"] = 3
    elif damage == "n_layer a string":
        payload["config"]["model"]["n_layer"] = "2"
    elif damage == "wider config":
        payload["config"]["model"]["n_embd"] = 32
    elif damage in ("nan", "inf"):
        payload["model"]["blocks.1.mlp.fc.weight"][0, 0] = float(damage)
    elif damage in WRONG_TYPES:
        part, value = WRONG_TYPES[damage]
        payload[part] = value


WRONG_TYPES = {  # damage -> (part, a value of the wrong type)
    "step a string": ("step", "7"), "step a bool": ("step", True), "step negative": ("step", -1),
    "best_val_loss a string": ("best_val_loss", "low"), "optimizer a list": ("optimizer", []),
    "extra None": ("extra", None), "tokenizer a string": ("tokenizer", "char"),
    "config a list": ("config", [1]),
}


DAMAGES = {  # damage -> what the one line must say
    "no model": "is not a whole checkpoint: it lacks model",
    "no config": "is not a whole checkpoint: it lacks config",
    "no tokenizer": "is not a whole checkpoint: it lacks tokenizer",
    "tokenizer None": "has no tokenizer state (its tokenizer is None)",
    "unknown config key": "config: unknown key model.n_layers; did you mean 'n_layer'?",
    "config not matching weights": "its config does not match its weights (missing blocks.2.ln_1.weight;",
    "wider config": "its config does not match its weights (wte.weight is (37, 16), the config needs (37, 32);",
    "nan": "has NaN or infinite weights (in blocks.1.mlp.fc.weight and maybe more)",
    "inf": "has NaN or infinite weights (in blocks.1.mlp.fc.weight and maybe more)",
    "step a string": "step must be a whole number >= 0, got '7'",
    "step a bool": "step must be a whole number >= 0, got True",
    "step negative": "step must be a whole number >= 0, got -1",
    "best_val_loss a string": "best_val_loss must be a number, got 'low'",
    "optimizer a list": "its optimizer state or extra is not a dict",
    "extra None": "its optimizer state or extra is not a dict",
    "tokenizer a string": "has no tokenizer state (its tokenizer is 'char')",
    "config a list": "its config is not a {'model': {...}, 'train': {...}} table",
    "n_layer a string": "config: model.n_layer must be an integer, got '2'",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_refused_on_load_naming_the_problem(damage, tmp_path, tiny_model):
    path = tmp_path / "c.pt"
    save(path, tiny_model)
    payload = torch.load(path, weights_only=True)
    spoil(payload, damage)
    torch.save(payload, path)
    for read in (load_checkpoint, read_checkpoint):
        with pytest.raises(UserError) as info:
            read(path)
        assert str(info.value).startswith(str(path)) and DAMAGES[damage] in str(info.value)
        assert "\n" not in str(info.value)


def damaged_run_checkpoint(source, out, damage: str):
    """A copy of a trained run's checkpoint as out/last.pt, damaged."""
    payload = torch.load(source, weights_only=True)
    if damage in ("nan", "inf"):
        next(iter(payload["model"].values())).view(-1)[0] = float(damage)
    else:
        spoil(payload, damage)
    out.mkdir()
    torch.save(payload, out / "last.pt")
    return out / "last.pt"


@pytest.mark.parametrize("damage", ["no tokenizer", "tokenizer None", "unknown config key", "config not matching weights",
                                    "nan", "step a string", "best_val_loss a string", "n_layer a string"])
def test_sample_and_resume_refuse_a_damaged_checkpoint_in_one_line(damage, tiny_checkpoint, tmp_path, capsys):
    import sample
    import train

    path = damaged_run_checkpoint(tiny_checkpoint, tmp_path / "run", damage)
    expected = DAMAGES[damage].split(" (in ")[0] if damage == "nan" else DAMAGES[damage].split(" (missing")[0]
    assert sample.main([str(path), "--max-new-tokens", "3", "--device", "cpu"]) == 2
    assert expected in one_line_error(capsys.readouterr().err)
    assert train.main(["--no-progress", "--resume", f"out_dir={tmp_path / 'run'}", "max_iters=70"]) == 2
    assert expected in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("key, value", [("train_seconds", "1.5"), ("evaluated", 1), ("scaler", None)])
def test_resume_refuses_a_wrong_typed_training_state_in_one_line(key, value, tiny_checkpoint, tmp_path, capsys):
    import train

    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["extra"][key] = value
    (tmp_path / "run").mkdir()
    torch.save(payload, tmp_path / "run" / "last.pt")
    assert train.main(["--no-progress", "--resume", f"out_dir={tmp_path / 'run'}", "max_iters=70"]) == 2
    assert one_line_error(capsys.readouterr().err).endswith(
        f"cannot resume: {tmp_path / 'run' / 'last.pt'} has a wrong {key} ({type(value).__name__})")


def test_a_save_that_cannot_be_written_is_one_line_and_keeps_the_file(tmp_path, tiny_model, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError (simulated here; the real
    full disk is in test_resume.py)."""
    path = tmp_path / "c.pt"
    save(path, tiny_model, step=1)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\nsecond line")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError) as info:
        save(path, tiny_model, step=2)
    message = str(info.value)
    assert message.startswith(f"could not save {path} ([enforce fail at inline_container.cc:603] . unexpected pos")
    assert message.endswith("MiB free there); the previous c.pt is kept") and "\n" not in message
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(tmp_path, monkeypatch):
    # rope weights do not depend on block_size, but its rotary table does: 10^9 positions
    # would be an 8 GB allocation, then a traceback. The shape is checked first.
    import model.memory

    rope = GPT(tiny_config(position="rope"))
    config = {**CONFIG, "model": {**dataclasses.asdict(rope.config), "block_size": 10**9}}
    save_checkpoint(tmp_path / "huge.pt", model=rope, config=config, tokenizer=TOKENIZER)
    monkeypatch.setattr(model.memory, "device_memory", lambda device: 4 * 2**30)
    with pytest.raises(UserError, match=r"huge.pt: the model .*block_size 1,000,000,000.* needs .* GiB of memory, "
                                        r"more than the 4.0 GiB of the cpu"):
        read_checkpoint(tmp_path / "huge.pt").build_model()
