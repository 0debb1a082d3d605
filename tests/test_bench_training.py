"""Smoke tests of the training-side benchmarks: each runs its own main() with tiny
settings (its measurements still run in fresh processes, as in a real run) and writes
the JSON it promises, so a benchmark can never silently break."""

from __future__ import annotations

import json
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import prepare_memory  # noqa: E402
import train_speed  # noqa: E402


def test_train_speed_bench_runs_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "train_speed.json"
    assert train_speed.main(["--cases", "char-4x4x128", "--device", "cpu", "--steps", "1", "--window", "1",
                             "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert row["case"] == "char-4x4x128" and row["device"] == "cpu" and row["measured_steps"] == 1
    assert row["params_M"] == 0.81 and row["tokens_per_s"] > 0 and row["peak_memory_MiB"] > 0
    printed = capsys.readouterr().out
    assert "char-4x4x128" in printed and f"wrote {out}" in printed


def test_prepare_memory_bench_runs_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "prepare_memory.json"
    prepare_memory.main(["--size-mb", "1", "--tokenizer", "char", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["corpus_mb"] == 1 and set(report["runs"]) == {"char"}
    assert report["runs"]["char"]["peak_rss_mb"] >= report["import_floor_mb"] > 0
    assert f"wrote {out}" in capsys.readouterr().out
