"""The CPU peak behind MFU: read from the core's widest vector instructions, so an
AVX-512 machine is not measured against half its peak (MFU over 100%)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import train
from model import perf

AVX512 = "processor\t: 0\ncpu MHz\t\t: 2600.000\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n"
AVX2 = "processor\t: 0\ncpu MHz\t\t: 3000.5\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_flops_per_cycle_follow_the_vector_width():
    assert perf.cpu_flops_per_cycle(AVX512) == (64, "avx512f")  # 2 FMA units x 16 lanes x 2
    assert perf.cpu_flops_per_cycle(AVX2) == (32, "avx2")  # 2 x 8 x 2
    assert perf.cpu_flops_per_cycle("flags\t: fpu sse2\n") == (16, "sse2")
    assert perf.cpu_flops_per_cycle("model name\t: something\n") is None
    assert perf.cpu_clock_hz(AVX2) == 3000.5e6


def test_the_cpu_peak_is_threads_times_clock_times_flops_per_cycle(monkeypatch):
    monkeypatch.setattr(perf, "_cpuinfo", lambda: AVX512)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(perf.os, "cpu_count", lambda: 4)
    flops, source = perf.peak_flops(torch.device("cpu"))
    assert flops == 2 * 2.6e9 * 64
    assert "2 threads x 2.60 GHz x 64 fp32 FLOP/cycle, avx512f" in source


def test_mfu_is_never_over_100_percent():
    run = SimpleNamespace(flops_per_token=100.0, peak_flops=1000.0, ddp=SimpleNamespace(world_size=1))
    assert train.mfu(run, 5.0) == 0.5
    assert train.mfu(run, 10.0) == 1.0
    assert train.mfu(run, 10.4) is None  # the peak estimate is wrong: no number rather than 104%
    assert train.mfu(SimpleNamespace(peak_flops=None), 5.0) is None
