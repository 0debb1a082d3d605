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

# A CPU core with two 256-bit fused multiply-add units (AVX2; also AMD Zen 4's AVX-512)
# finishes 2 units x 8 float32 lanes x 2 FLOPs = 32 FLOPs per cycle.
CPU_FLOPS_PER_CYCLE = 32


def flops_per_token(cfg: ModelConfig, num_params: int) -> float:
    """Training FLOPs (forward + backward) per token; ``num_params`` as GPT.num_params()."""
    multiplying = num_params - (cfg.block_size * cfg.n_embd if cfg.position == "learned" else 0)
    return 6 * multiplying + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def cpu_clock_hz() -> float | None:
    """The clock /proc/cpuinfo reports for the first core (Linux), or None where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) * 1e6
    except (OSError, ValueError):
        pass
    return None


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> tuple[float | None, str]:
    """One device's peak FLOP/s for MFU, and how it was found (for the run's header line).

    ``override_tflops`` > 0 wins. A CUDA GPU is looked up in GPU_PEAK_FLOPS; the CPU is
    threads x clock x CPU_FLOPS_PER_CYCLE (float32). None when unknown: MFU is then not shown.
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
        clock = cpu_clock_hz()
        threads = min(torch.get_num_threads(), os.cpu_count() or 1)
        if clock is None:
            return None, "unknown CPU clock; set train.peak_tflops"
        flops = threads * clock * CPU_FLOPS_PER_CYCLE
        return flops, (
            f"{flops / 1e9:.0f} GFLOP/s ({threads} threads x {clock / 1e9:.2f} GHz x "
            f"{CPU_FLOPS_PER_CYCLE} fp32 FLOP/cycle)"
        )
    return None, f"unknown for {device.type}; set train.peak_tflops"
