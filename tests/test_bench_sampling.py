"""Smoke runs of the sampling benchmarks with tiny settings: a bench must never silently break."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import HF_PYTHON, ROOT, run_cli

sys.path.insert(0, str(ROOT / "bench"))
from hf_client import HuggingFaceSide  # noqa: E402  (bench/hf_client.py)


def test_sample_speed_runs_and_skips_transformers_without_its_venv(tmp_path):
    out = tmp_path / "sample_speed.json"
    result = run_cli("bench/sample_speed.py", "--tiny", "--repeats", "1", "--hf-python", str(tmp_path / "none"),
                     "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "skipped the comparison with transformers" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["versus_transformers"] is None
    assert set(saved["tokens_per_s"]) == {"31_exact", "31_none", "52_exact", "52_shift", "52_none"}
    assert all(rate > 0 for rate in saved["tokens_per_s"].values())


@pytest.mark.slow
@pytest.mark.skipif(not HF_PYTHON.exists(), reason=f"no transformers venv at {HF_PYTHON}")
def test_sample_speed_compares_with_transformers_on_the_same_weights(tmp_path):
    out = tmp_path / "sample_speed.json"
    result = run_cli("bench/sample_speed.py", "--tiny", "--repeats", "1", "--hf-python", str(HF_PYTHON),
                     "--hf-vocabs", "65", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    versus = json.loads(out.read_text())["versus_transformers"]["65"]
    assert versus["max_abs_logit_difference"] < 1e-4  # the GPT2LMHeadModel really holds our weights
    assert versus["ours"] > 0 and versus["transformers"] > 0


def test_decode_fast_path_runs_every_variant(tmp_path):
    out = tmp_path / "decode_fast_path.json"
    result = run_cli("bench/decode_fast_path.py", "--tiny", "--repeats", "1", "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())["results"]["2x2x32 v65"]
    assert set(row["tokens_per_s"]) == {"plain", "blocked, gated", "blocked, all", "blocked, no head",
                                        "layout", "layout + blocked", "bf16"}
    assert row["bf16"]["argmax_agreement"] > 0.5  # a bf16 copy of the same model, not another model


# A stand-in for the transformers venv's Python: it ignores the script it is given and
# speaks bench/hf_side.py's protocol, answering each request with TOKENS * 10 + THREADS.
FAKE_SIDE = """#!/bin/sh
echo '{"version": "fake", "load_peak_bytes": 1}'
while read tokens seed threads; do
    [ -z "$tokens" ] && exit 0
    echo $((tokens * 10 + threads))
done
"""


def test_hf_client_speaks_hf_sides_protocol(tmp_path):
    python = tmp_path / "python"
    python.write_text(FAKE_SIDE)
    python.chmod(0o755)
    side = HuggingFaceSide(str(python), tmp_path / "weights.pt", threads=2)
    assert side.info == {"version": "fake", "load_peak_bytes": 1}
    assert side.tokens_per_second(5, seed=0) == 52.0
    assert side.tokens_per_second(7, seed=1) == 72.0
    side.close()
    assert side.process.returncode == 0  # the empty line ended it


def test_hf_client_stops_with_a_message_when_the_side_does_not_start(tmp_path):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'No module named transformers' >&2\nexit 1\n")
    python.chmod(0o755)
    with pytest.raises(SystemExit, match="did not start under"):
        HuggingFaceSide(str(python), tmp_path / "weights.pt", threads=1)
