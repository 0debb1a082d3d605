"""How fast training runs compared with what the hardware could do: MFU.

Model FLOPs utilisation is the arithmetic the model needs per second, divided by the
device's peak. The arithmetic per trained token (forward and backward) is estimated as
in the PaLM paper (Chowdhery et al. 2022, appendix B):

    6 * N                      every weight takes part in one multiply-add (2 FLOPs) in
                               the forward pass and two in the backward pass
    + 12 * n_layer * T * C     attention scores (q.k) and the weighted sum of values,
                               over a context of T = block_size positions, C = n_embd

N counts the weights that multiply: all parameters except the learned position table
(a lookup). The token embedding stays in because it is tied to the LM head, a matmul.
Causal masking would halve the attention term; like PaLM we do not take that saving.
"""

from __future__ import annotations

import os

import torch

from model.config import ModelConfig

# Dense bf16 tensor-core peaks (no sparsity) of common data-centre GPUs, from the
# vendors' data sheets, in FLOP/s. Matched against torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,  # fp16: V100 has no bf16, training runs in fp16 there
    "T4": 65e12,  # fp16, likewise
}

# float32 FLOPs per cycle of one CPU core, by the widest vector instructions it has: two
# fused multiply-add units x float32 lanes x 2 FLOPs. AVX-512 cores (Intel server parts)
# do 2 x 16 x 2 = 64; AVX2 cores 2 x 8 x 2 = 32; older SSE cores 2 x 4 x 2 = 16. Reading
# it from the flags keeps the peak from being half the truth on AVX-512 machines, which
# made MFU read over 100%. (Cores with one AVX-512 unit do 32: MFU there reads low, never high.)
CPU_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32), ("sse2", 16))


def flops_per_token(cfg: ModelConfig, num_params: int) -> float:
    """Training FLOPs (forward + backward) per token; ``num_params`` as GPT.num_params()."""
    multiplying = num_params - (cfg.block_size * cfg.n_embd if cfg.position == "learned" else 0)
    return 6 * multiplying + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def cpu_clock_hz(cpuinfo: str | None = None) -> float | None:
    """The clock /proc/cpuinfo reports for the first core (Linux), or None where unknown."""
    for line in (cpuinfo if cpuinfo is not None else _cpuinfo()).splitlines():
        if line.startswith("cpu MHz"):
            try:
                return float(line.split(":")[1]) * 1e6
            except ValueError:
                return None
    return None


def cpu_flops_per_cycle(cpuinfo: str | None = None) -> tuple[int, str] | None:
    """float32 FLOPs per cycle of one core and the instruction set it was read from
    (`CPU_FLOPS_PER_CYCLE`), from /proc/cpuinfo's flags; None where unknown."""
    for line in (cpuinfo if cpuinfo is not None else _cpuinfo()).splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return next(((flops, name) for name, flops in CPU_FLOPS_PER_CYCLE if name in flags), None)
    return None


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> tuple[float | None, str]:
    """One device's peak FLOP/s for MFU, and how it was found (for the run's header line).

    ``override_tflops`` > 0 wins. A CUDA GPU is looked up in GPU_PEAK_FLOPS; the CPU is
    threads x clock x `cpu_flops_per_cycle` (float32). None when unknown: MFU is then not shown.
    """
    if override_tflops > 0:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (train.peak_tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"{flops / 1e12:g} TFLOP/s ({name}, dense bf16/fp16 data sheet)"
        return None, f"unknown for {name}; set train.peak_tflops"
    if device.type == "cpu":
        clock, per_cycle = cpu_clock_hz(), cpu_flops_per_cycle()
        threads = min(torch.get_num_threads(), os.cpu_count() or 1)
        if clock is None or per_cycle is None:
            return None, "unknown CPU clock or vector width; set train.peak_tflops"
        flops = threads * clock * per_cycle[0]
        return flops, (
            f"{flops / 1e9:.0f} GFLOP/s ({threads} threads x {clock / 1e9:.2f} GHz x "
            f"{per_cycle[0]} fp32 FLOP/cycle, {per_cycle[1]})"
        )
    return None, f"unknown for {device.type}; set train.peak_tflops"
