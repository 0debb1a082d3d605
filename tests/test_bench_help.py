"""Every benchmark answers --help: a usage line, exit status 0, no traceback, even where an
optional dependency it drives (transformers, for bench/hf_side.py) is not installed."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_cli

SCRIPTS = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "bench").glob("*.py"))


def test_there_are_bench_scripts_to_check():
    assert "bench/hf_side.py" in SCRIPTS and "bench/sample_speed.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_answers_help(script):
    result = run_cli(script, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("usage: "), result.stdout
