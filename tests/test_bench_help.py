"""Every benchmark answers --help: a usage line, exit status 0, no traceback, even where an
optional dependency it drives (transformers, for bench/hf_side.py) is not installed.

One fresh Python runs every script's --help in turn, each as ``__main__`` with its own
folder first on the import path and the working folder not on it (as ``python
bench/NAME.py`` has it: ``-P``), and reports, per script, the exit status and what the
script printed. After each script the import path is put back as it was and the project's own modules
(the checkout's) are unloaded, so no script can lean on what an earlier one imported or
added to the path; torch and the other libraries stay loaded, imported once instead of
once a script, which keeps this a second or two."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_cli

SCRIPTS = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "bench").glob("*.py"))

RUN_EACH_HELP = r"""
import contextlib, io, json, os, runpy, sys, traceback
import torch
scripts, path, modules = sys.argv[1:], sys.path[:], set(sys.modules)
root = os.getcwd() + os.sep
results = {}
for script in scripts:
    out, err, status = io.StringIO(), io.StringIO(), 0
    sys.argv = [script, "--help"]
    sys.path[:] = [os.path.abspath(os.path.dirname(script))] + path
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            traceback.print_exc()
            status = 1
    sys.path[:] = path
    for name in set(sys.modules) - modules:  # the project's own (model, sample, bench modules)
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(root):
            del sys.modules[name]
    results[script] = {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def helps() -> dict:
    result = run_cli("-P", "-c", RUN_EACH_HELP, *SCRIPTS, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_there_are_bench_scripts_to_check():
    assert "bench/hf_side.py" in SCRIPTS and "bench/sample_speed.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_answers_help(script, helps):
    result = helps[script]
    assert result["status"] == 0, result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert result["stdout"].startswith("usage: "), result["stdout"]
