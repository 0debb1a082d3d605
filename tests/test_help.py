"""Every script of the project answers --help with its usage, whatever is installed."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_cli

# bench/*.py: tests/test_bench_help.py
SCRIPTS = ["train.py", "sample.py", "data/prepare.py", "data/download.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    result = run_cli(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout
