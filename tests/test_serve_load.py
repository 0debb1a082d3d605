"""bench/serve_load.py: a smoke run in the default suite, the real load as a slow test.
Both run the server as its own process on 127.0.0.1 with the tiny checkpoint."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import serve_load  # noqa: E402


def run_bench(checkpoint, tmp_path, *flags: str) -> dict:
    out = tmp_path / "serve_load.json"
    assert serve_load.main([str(checkpoint), "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())


def check_every_request_served_or_refused(load: dict) -> None:
    assert load["errors"] == 0, load["error_samples"]
    assert load["served"] > 0
    assert load["running_after"] == 0 and load["waiting_after"] == 0


@pytest.mark.slow  # starts a server and runs every client count of the bench: 4-5 s
def test_load_bench_smoke(tiny_checkpoint, tmp_path):
    result = run_bench(tiny_checkpoint, tmp_path, "--clients", "3", "--seconds", "0.5", "--rate-clients", "1",
                       "--rate-seconds", "0.3", "--max-tokens", "16", "--abandon-every", "2",
                       "--settle-seconds", "0")
    check_every_request_served_or_refused(result["load"])
    assert result["load"]["abandoned"] > 0
    assert result["rates"][0]["tokens"] > 0 and result["rates"][0]["errors"] == []
    assert result["library_tokens_per_s"] > 0
    assert result["server_exit_code"] == 0


@pytest.mark.slow
def test_fifty_streaming_clients_for_thirty_seconds(tiny_checkpoint, tmp_path):
    result = run_bench(tiny_checkpoint, tmp_path, "--clients", "50", "--seconds", "30", "--rate-clients", "1,8",
                       "--rate-seconds", "3", "--max-concurrent", "4", "--max-waiting", "8")
    load = result["load"]
    check_every_request_served_or_refused(load)
    assert load["refused_503"] > 0  # 50 clients > 4 running + 8 waiting: the queue is bounded
    assert load["abandoned"] > 0
    assert load["idle_after_s"] < 5  # nothing goes on once the clients are gone
    assert load["rss_end_mib"] < load["rss_start_mib"] * 1.25 + 20
    assert result["server_exit_code"] == 0
