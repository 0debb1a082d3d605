"""Smoke tests of the training-side benchmarks: each runs its own main() with tiny
settings (its measurements still run in fresh processes, as in a real run) and writes
the JSON it promises, so a benchmark can never silently break."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import prepare_memory  # noqa: E402
import train_speed  # noqa: E402


@pytest.mark.slow  # trains both loops of the bench for a few steps each: 5-7 s
def test_train_speed_bench_compares_the_loops_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "train_speed.json"
    assert train_speed.main(["--cases", "char-4x4x128", "--device", "cpu", "--steps", "1", "--window", "1",
                             "--repeats", "1", "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert row["case"] == "char-4x4x128" and row["device"] == "cpu" and row["measured_steps"] == 1
    assert row["params_M"] == 0.81 and row["peak_memory_MiB"] > 0 and row["plain_peak_memory_MiB"] > 0
    assert row["runs_tokens_per_s"] == {"ours": [row["tokens_per_s"]], "plain": [row["plain_tokens_per_s"]]}
    assert row["tokens_per_s"] > 0 and row["plain_tokens_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["tokens_per_s"] / row["plain_tokens_per_s"], abs=1e-3)
    tokens_per_step = row["batch_size"] * row["block_size"]
    assert row["ms_per_step"] == pytest.approx(1000 * tokens_per_step / row["tokens_per_s"], abs=0.01)
    printed = capsys.readouterr().out
    assert "char-4x4x128" in printed and f"{row['ratio']:.3f}" in printed and f"wrote {out}" in printed


def test_train_speed_profile_phases_add_up_to_the_step(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert train_speed.main(["--profile", "--cases", "nanogpt-4x4x128", "--device", "cpu", "--steps", "5",
                             "--window", "2", "--optimizer", "muon", "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert row["optimizer"] == "muon" and row["measured_steps"] == 5 and row["step_ms"] > 0
    assert list(row["phases_ms"]) == list(train_speed.PHASES) and min(row["phases_ms"].values()) > 0
    assert row["phases_sum_ms"] == pytest.approx(sum(row["phases_ms"].values()), abs=1e-2)
    # The phases are the step taken apart: together they are about one whole step, not
    # more (a phase counted twice: about 2x) and not much less (the optimizer step left
    # out: about 0.45x with Muon); the bounds leave room for a busy machine.
    assert 0.6 * row["step_ms"] <= row["phases_sum_ms"] <= 1.5 * row["step_ms"] + 1
    assert "backward" in capsys.readouterr().out


def test_train_speed_bench_refuses_bad_settings(capsys):
    assert train_speed.main(["--cases", "char-4x4x128", "--steps", "10", "--window", "3"]) == 2
    assert train_speed.main(["--repeats", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == ["error: --steps (10) must be a multiple of --window (3)", "error: --repeats must be >= 1, got 0"]


@pytest.mark.slow  # prepares a corpus in child processes: about 3 s
def test_prepare_memory_bench_runs_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "prepare_memory.json"
    prepare_memory.main(["--size-mb", "1", "--tokenizer", "char", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["corpus_mb"] == 1 and set(report["runs"]) == {"char"}
    assert report["runs"]["char"]["peak_rss_mb"] >= report["import_floor_mb"] > 0
    assert f"wrote {out}" in capsys.readouterr().out
