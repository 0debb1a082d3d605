"""Shared fixtures: a tiny model configuration, a tiny prepared corpus, a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import Config, ModelConfig, load_config

# The tensors in these tests are tiny: one thread is faster than two fighting over
# them, and keeps the suite quick on a shared two-core machine.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
# The Python with transformers for the comparisons with Hugging Face: $HF_PYTHON, else the
# checkout's .venv-hf (make venv-hf). The tests that need it skip when it is absent.
HF_PYTHON = Path(os.environ.get("HF_PYTHON") or ROOT / ".venv-hf" / "bin" / "python")

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog.\n"
    "A small model learns the shape of the text it reads, one character at a time.\n"
    "Sphinx of black quartz, judge my vow!\n"
) * 40


def run_cli(*args: str, cwd: Path = ROOT, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the project's command-line tools as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout
    )


def one_line_error(result_or_stderr) -> str:
    """The single ``error: ...`` line a command printed on stderr (no traceback, nothing else);
    for a finished process, also that it exited with status 2."""
    stderr = getattr(result_or_stderr, "stderr", result_or_stderr)
    if hasattr(result_or_stderr, "returncode"):
        assert result_or_stderr.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def records(out: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_run_overrides(data_dir: Path, out_dir: Path, *more: str) -> list[str]:
    """Overrides for a very small, fast CPU run on the tiny char dataset; ``more`` come last, so they win."""
    return [
        f"data_dir={data_dir}", f"out_dir={out_dir}", "device=cpu", "block_size=16", "n_layer=2", "n_head=2",
        "n_embd=16", "batch_size=8", "learning_rate=1e-2", "min_lr=1e-3", *more,
    ]


def tiny_run(data_dir: Path, out_dir: Path, *more: str) -> Config:
    """The config of a very small, fast run on the tiny char dataset (6 steps)."""
    return load_config(None, tiny_run_overrides(data_dir, out_dir, "max_iters=6", "eval_interval=3", "eval_iters=2",
                                                "warmup_iters=2", *more))


def run_args(data_dir: Path, out_dir: Path, *more: str) -> list[str]:
    """train.py's arguments for a tiny run without a progress bar."""
    return ["--no-progress", *tiny_run_overrides(data_dir, out_dir, "eval_iters=1", "warmup_iters=3", *more)]


TIMING_KEYS = {"tokens_per_s", "mfu", "train_seconds", "elapsed_s"}  # metrics.jsonl fields that depend on the clock


def without_timing(lines: list[dict]) -> list[dict]:
    """metrics.jsonl records without the fields that differ between two runs of the same training."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in lines]


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def tiny_model():
    from model.gpt import GPT

    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tiny_corpus, tmp_path_factory) -> Path:
    """A char-level dataset prepared from TINY_TEXT (in-process, no progress bars)."""
    sys.path.insert(0, str(ROOT / "data"))
    from prepare import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare([str(tiny_corpus)], out, "char", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    """A checkpoint of a tiny model trained for a few steps on the tiny dataset."""
    from model.config import load_config
    from train import train

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [
        f"data_dir={tiny_dataset}", f"out_dir={out}", "block_size=32", "n_layer=2", "n_head=2", "n_embd=32",
        "batch_size=8", "max_iters=60", "eval_interval=30", "eval_iters=2", "warmup_iters=5", "learning_rate=1e-2",
        "min_lr=1e-3",
    ])
    train(cfg, progress=False)
    return out / "best.pt"


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """(model, tokenizer) of the tiny checkpoint, once per test module."""
    from model.checkpoint import load_for_generation

    return load_for_generation(tiny_checkpoint, torch.device("cpu"))[:2]


@pytest.fixture
def two_threads():
    """torch on two threads for one test (the suite runs on one, above), then back: the
    multi-core paths a user's machine takes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
