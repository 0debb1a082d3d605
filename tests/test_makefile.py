"""The Makefile's targets, run by make itself with a stand-in for Python that only logs its
calls: what each target runs and in what order, without building a real venv."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

# Stands in for python3 and for .venv/bin/python: logs "start ARGS" and "end ARGS", makes
# `-m venv DIR` create DIR/bin/python (itself), makes train.py leave a best.pt, and takes a
# moment over each call so that calls make -j runs together overlap.
FAKE_PYTHON = """#!/bin/sh
echo "start $*" >> "{log}"
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "{fake}" "$3/bin/python"; fi
case "$*" in *train.py*) mkdir -p out/default && touch out/default/best.pt;; esac
sleep 0.1
echo "end $*" >> "{log}"
"""


def run_make(tmp_path: Path, *args: str) -> list[str]:
    """Run make in a copy of the project's Makefile and the files its setup reads; the log of calls."""
    project, log, fake = tmp_path / "project", tmp_path / "calls.log", tmp_path / "python3"
    project.mkdir(exist_ok=True)
    for name in ("Makefile", "constraints.txt", "pyproject.toml"):
        shutil.copy2(ROOT / name, project / name)  # keeps the mtimes make compares
    fake.write_text(FAKE_PYTHON.format(log=log, fake=fake))
    fake.chmod(0o755)
    log.write_text("")
    result = subprocess.run(["make", *args, f"PYTHON={fake}"], cwd=project, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def script(call: str) -> str:
    return call.split()[1]


def test_bench_sets_up_once_then_runs_the_demo_then_each_bench_under_make_j(tmp_path):
    calls = run_make(tmp_path, "-j2", "bench")
    assert [c for c in calls if c.startswith("start -m venv")] == ["start -m venv .venv"]
    assert len([c for c in calls if c.startswith("start -m pip")]) == 2  # setuptools, then the project
    started = [script(c) for c in calls if c.startswith("start") and not c.startswith("start -m")]
    assert started == ["data/prepare.py", "train.py", "sample.py", "bench/train_speed.py",
                       "bench/sample_speed.py", "bench/compare_speed.py", "bench/prepare_memory.py"]
    last_setup_end = max(i for i, c in enumerate(calls) if c.startswith("end -m pip"))
    assert last_setup_end < calls.index("start data/prepare.py")


def test_bench_with_a_checkpoint_and_a_venv_runs_only_the_benches(tmp_path):
    run_make(tmp_path, "bench")
    calls = run_make(tmp_path, "-j2", "bench")
    assert [script(c) for c in calls if c.startswith("start")] == [
        "bench/train_speed.py", "bench/sample_speed.py", "bench/compare_speed.py", "bench/prepare_memory.py"]


def test_venv_hf_makes_a_second_venv_with_transformers_at_the_pins_once(tmp_path):
    calls = run_make(tmp_path, "venv-hf")
    assert [c for c in calls if c.startswith("start")] == [
        "start -m venv .venv-hf", "start -m pip install --quiet -c constraints.txt torch transformers"]
    assert (tmp_path / "project" / ".venv-hf" / "bin" / "python").exists()
    assert run_make(tmp_path, "venv-hf") == []  # made: nothing runs again
