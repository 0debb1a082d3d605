"""Smoke runs of the sampling benchmarks with tiny settings: a bench must never silently break."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
import torch

from tests.conftest import HF_PYTHON, ROOT, run_cli

sys.path.insert(0, str(ROOT / "bench"))
import clock  # noqa: E402  (bench/clock.py)
import sample_speed  # noqa: E402  (bench/sample_speed.py)
from hf_client import HuggingFaceSide  # noqa: E402  (bench/hf_client.py)
from sample_speed import TINY, build_model, bytes_per_decode_step  # noqa: E402


def test_draw_speed_times_both_draws_on_each_vocabulary(tmp_path):
    out = tmp_path / "draw_speed.json"
    result = run_cli("bench/draw_speed.py", "--tiny", "--vocabs", "5,40", "--repeats", "2", "--out", str(out),
                     timeout=120)
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert [r["vocab"] for r in saved["results"]] == [5, 40] and saved["tiny"]
    for row in saved["results"]:
        assert set(row["ms_per_draw"]) == set(row["decode_tokens_per_s"]) == {"draw_tokens", "multinomial"}
        assert all(v > 0 for v in [*row["ms_per_draw"].values(), *row["decode_tokens_per_s"].values()])
        assert row["ratio"] == row["decode_tokens_per_s"]["draw_tokens"] / row["decode_tokens_per_s"]["multinomial"]
    assert "| 40 |" in result.stdout


def test_sample_speed_runs_and_skips_transformers_without_its_venv(tmp_path):
    out = tmp_path / "sample_speed.json"
    result = run_cli("bench/sample_speed.py", "--tiny", "--repeats", "1", "--hf-python", str(tmp_path / "none"),
                     "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "skipped the comparison with transformers" in result.stdout
    saved = json.loads(out.read_text())
    assert set(saved["tokens_per_s"]) == {"31_exact", "31_none", "52_exact", "52_shift", "52_none"}
    assert all(rate > 0 for rate in saved["tokens_per_s"].values())
    versus = saved["versus_floor_and_transformers"]
    assert set(versus) == {"65", "50304"} and saved["floor_mib"] == 64
    for vocab, row in versus.items():
        assert row["transformers"] is None  # the floor is measured without the transformers venv
        assert row["bytes_per_step"] == bytes_per_decode_step(build_model(int(vocab), "cpu", TINY), 16)  # 31 tokens
        for floor, bandwidth in (("floor", "bandwidth_bytes_per_s"), ("cached_floor", "cached_bandwidth_bytes_per_s")):
            assert row[bandwidth] > 0 and row[floor] == row[bandwidth] / row["bytes_per_step"]
        assert (f"| {int(vocab):,} | {row['ours']:.0f} | {row['floor']:.0f} | {row['ours'] / row['floor']:.2f} | "
                f"{row['cached_floor']:.0f} | {row['ours'] / row['cached_floor']:.2f} | - | - |") in result.stdout


def test_bytes_per_decode_step_counts_each_weight_once_and_the_context_cache():
    # 2 layers, width C = 32, vocabulary 65, learned positions, biases: per block two
    # LayerNorms (4C), qkv (3C^2 + 3C), attention projection (C^2 + C), fc (4C^2 + 4C)
    # and its projection (4C^2 + C); the tied embedding / head (65 C), one position row
    # (C), the final LayerNorm (2C). Keys and values: 2 x 2 layers x context x C floats.
    C, layers = 32, 2
    weights = layers * (12 * C * C + 13 * C) + 65 * C + C + 2 * C
    assert weights == 27_584
    model = build_model(65, "cpu", TINY)
    assert bytes_per_decode_step(model, 0) == 4 * weights
    assert bytes_per_decode_step(model, 16) == 4 * (weights + 2 * layers * 16 * C)
    assert bytes_per_decode_step(model, 8.5) == 4 * (weights + 2 * layers * 8.5 * C)  # a mean context
    # the bf16 KV cache of CUDA's autocast: 2 bytes a key or value, the weights still float32
    assert bytes_per_decode_step(model, 16, torch.bfloat16) == 4 * weights + 2 * (2 * layers * 16 * C)


def test_clock_waits_for_a_cuda_device_before_each_reading(monkeypatch):
    assert clock.timer(torch.device("cpu")) is time.perf_counter  # nothing to wait for
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: events.append(("synchronize", device)))
    monkeypatch.setattr(clock, "time", types.SimpleNamespace(perf_counter=lambda: events.append("read") or 7.5))
    device = torch.device("cuda", 1)
    read = clock.timer(device)
    assert events == []  # making the clock waits for nothing
    assert read() == 7.5 and read() == 7.5
    assert events == [("synchronize", device), "read", ("synchronize", device), "read"]


def test_decode_precision_is_what_the_token_loop_runs_in():
    # model/device.py: no autocast on the CPU; the KV cache then takes the weights' dtype
    model = build_model(65, "cpu", TINY)
    precision = sample_speed.decode_precision(model)
    assert precision == {"device": "cpu", "dtype": "float32", "autocast": None, "kv_cache": "float32"}
    assert sample_speed.describe_precision(precision) == "float32 weights, no autocast, float32 KV cache on cpu"
    bf16 = sample_speed.decode_precision(model.to(torch.bfloat16))
    assert bf16 == {"device": "cpu", "dtype": "bfloat16", "autocast": None, "kv_cache": "bfloat16"}
    theirs = {"device": "cuda:0", "dtype": "float32", "autocast": "bfloat16"}  # a transformers side's ready line
    assert sample_speed.describe_precision(theirs) == "float32 weights under bfloat16 autocast on cuda:0"


# A stand-in for the transformers venv's Python that answers its ready line with the
# arguments it was started with, then waits for the empty line that ends it.
ECHO_SIDE = r"""#!/bin/sh
echo "{\"argv\": \"$*\"}"
read line
"""


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_transformers_side_starts_on_our_device_under_our_autocast(tmp_path, monkeypatch, autocast):
    python = tmp_path / "python"
    python.write_text(ECHO_SIDE)
    python.chmod(0o755)
    model = build_model(65, "cpu", TINY)
    ours = sample_speed.decode_precision(model)
    # on CUDA the token loop runs under bf16 autocast: the side must be asked for the same
    monkeypatch.setattr(sample_speed, "decode_precision", lambda model: {**ours, "autocast": autocast})
    side = sample_speed.start_transformers_side(str(python), model, tmp_path)
    side.close()
    weights = tmp_path / "weights_65.pt"
    expected = f"{ROOT / 'bench' / 'hf_side.py'} {weights} --device cpu" + (f" --autocast {autocast}" if autocast else "")
    assert side.info == {"argv": expected}
    saved = torch.load(weights, weights_only=True)
    assert saved["config"]["vocab_size"] == 65 and saved["probe"].shape == (1, 16)
    assert all(tensor.device.type == "cpu" for tensor in saved["state_dict"].values())
    assert torch.equal(saved["state_dict"]["wte.weight"], model.state_dict()["wte.weight"])
    with torch.no_grad():
        assert torch.equal(saved["logits"], model(saved["probe"])[0])


@pytest.mark.slow
@pytest.mark.skipif(not HF_PYTHON.exists(), reason=f"no transformers venv at {HF_PYTHON}")
def test_sample_speed_compares_with_transformers_on_the_same_weights(tmp_path):
    out = tmp_path / "sample_speed.json"
    result = run_cli("bench/sample_speed.py", "--tiny", "--repeats", "1", "--hf-python", str(HF_PYTHON),
                     "--hf-vocabs", "65", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    versus = json.loads(out.read_text())["versus_floor_and_transformers"]["65"]
    assert versus["max_abs_logit_difference"] < 1e-4  # the GPT2LMHeadModel really holds our weights
    assert versus["ours"] > 0 and versus["transformers"] > 0
    side = versus["transformers_side"]  # both sides ran on the same device in the same precision
    assert versus["ours_precision"] == {"device": "cpu", "dtype": "float32", "autocast": None, "kv_cache": "float32"}
    assert (side["device"], side["dtype"], side["autocast"]) == ("cpu", "float32", None)
    assert "ours: float32 weights, no autocast, float32 KV cache on cpu; transformers " in result.stdout


@pytest.mark.slow  # starts transformers: about 10 s
@pytest.mark.skipif(not HF_PYTHON.exists(), reason=f"no transformers venv at {HF_PYTHON}")
def test_transformers_side_runs_generate_under_autocast(tmp_path):
    # what the side does on CUDA (bf16 autocast over float32 weights), here on the CPU
    model = build_model(65, "cpu", TINY)
    sample_speed.start_transformers_side(str(HF_PYTHON), model, tmp_path).close()
    side = HuggingFaceSide(str(HF_PYTHON), tmp_path / "weights_65.pt", threads=1, device="cpu", autocast="bfloat16")
    try:
        assert (side.info["device"], side.info["dtype"], side.info["autocast"]) == ("cpu", "float32", "bfloat16")
        assert side.info["logit_difference"] < 1e-4  # float32: the same weights
        # bf16 keeps 8 significant bits: the logits move, by about 2^-8 of their size
        assert 0 < side.info["autocast_logit_difference"] < 0.05
        assert side.tokens_per_second(8, seed=0) > 0
    finally:
        side.close()


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
