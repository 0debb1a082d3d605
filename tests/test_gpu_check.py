"""bench/gpu_check.sh: its CPU run (--cpu) goes through every step, the transformers
comparison among them when a Python with transformers is there, and it stops with a
one-line error before any work when the interpreter lacks a module the project needs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import HF_PYTHON, ROOT, SHAKESPEARE


def gpu_check(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bench/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def cpu_run() -> subprocess.CompletedProcess:
    """One --cpu run for the tests below, with the transformers venv of the tests when it exists."""
    if not SHAKESPEARE.exists():
        pytest.skip(f"needs {SHAKESPEARE.name} in ../shared/data")
    return gpu_check("--cpu", HF_PYTHON=str(HF_PYTHON))


@pytest.mark.slow  # trains two small models and runs three benches: about 30 s
def test_gpu_check_runs_through_on_the_cpu(cpu_run):
    assert cpu_run.returncode == 0, cpu_run.stderr[-2000:]
    assert "the same tokens as plain decoding: {'plain': True, 'draft': True, 'prompt lookup': True}" in cpu_run.stdout
    assert "== done" in cpu_run.stdout


@pytest.mark.slow  # the same run as above
@pytest.mark.skipif(not HF_PYTHON.exists(), reason=f"no transformers venv at {HF_PYTHON}")
def test_gpu_check_compares_with_transformers_on_the_cpu(cpu_run):
    assert cpu_run.returncode == 0, cpu_run.stderr[-2000:]
    assert "skips the comparison" not in cpu_run.stdout
    # the line sample_speed.py prints when both sides ran on the same weights, and what each ran in
    assert "; same weights: logits differ by at most " in cpu_run.stdout
    assert "ours: float32 weights, no autocast, float32 KV cache on cpu; transformers " in cpu_run.stdout
    assert ": float32 weights, no autocast on cpu" in cpu_run.stdout


def test_gpu_check_stops_when_the_python_lacks_a_dependency(tmp_path):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'tiktoken'\" >&2\nexit 1\n")
    python.chmod(0o755)
    text = tmp_path / "text.txt"
    text.write_text("hello\n")
    result = gpu_check("--cpu", timeout=30, PYTHON=str(python), SHAKESPEARE=str(text))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["ModuleNotFoundError: No module named 'tiktoken'",
                                          f"error: {python} lacks a module the project needs (above); use a Python "
                                          "with its dependencies"]
    assert "==" not in result.stdout  # no step started


def test_gpu_check_refuses_an_unknown_flag():
    result = gpu_check("--gpu", timeout=30)
    assert result.returncode == 2 and "usage: bench/gpu_check.sh [--cpu] [--steps N]" in result.stderr
