"""data/download.py and `make shakespeare`'s download: one line for any failure, nothing
half-written, and the file only when its checksum matches (file:// URLs: no network)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

from tests.conftest import ROOT, one_line_error

sys.path.insert(0, str(ROOT / "data"))
from download import main  # noqa: E402


def test_a_matching_file_is_written_and_a_bad_one_is_not(tmp_path, capsys):
    source = tmp_path / "source.txt"
    source.write_bytes(b"to be, or not to be\n")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "copy.txt"
    assert main([source.as_uri(), "0" * 64, str(out)]) == 2
    assert "has SHA-256 " + digest in one_line_error(capsys.readouterr().err) and not out.exists()
    assert main([(tmp_path / "missing.txt").as_uri(), digest, str(out)]) == 2
    assert "could not download" in one_line_error(capsys.readouterr().err) and not out.exists()
    assert main([source.as_uri(), digest.upper(), str(out)]) == 0
    assert out.read_bytes() == source.read_bytes() and list(tmp_path.glob("*.part")) == []


def test_make_shakespeare_offline_says_one_line(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "data" / "download.py", tmp_path / "data")
    result = subprocess.run(["make", "--no-print-directory", "-s", "data/tinyshakespeare.txt",
                             f"SHAKESPEARE_URL={(tmp_path / 'offline').as_uri()}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "make shakespeare SHAKESPEARE=path/to/tinyshakespeare.txt" in errors[0]
    assert not (tmp_path / "data" / "tinyshakespeare.txt").exists()
