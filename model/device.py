"""Choosing the device and the number format: CPU and CUDA are both first-class.

``auto`` picks CUDA when present, then Apple's MPS, then the CPU. On CUDA, matrix
work runs under bf16 autocast where the GPU supports it, and under fp16 with a
gradient scaler otherwise (fp16's narrow range would let small gradients underflow).
The CPU and MPS run in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from model.errors import UserError


def resolve_device(name: str) -> torch.device:
    """Turn ``auto | cpu | cuda | cuda:N | mps`` into a torch.device that exists here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device {name!r} was asked for, but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' was asked for, but Apple's MPS backend is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def use_tensor_cores(device: torch.device) -> None:
    """Let float32 matmuls and convolutions on CUDA run as TF32 on tensor cores (Ampere and
    newer): a 10-bit mantissa for the products, float32 for the sums, several times faster.
    A process-wide PyTorch setting; nothing changes on other devices."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass(frozen=True)
class Precision:
    """The number format of the forward pass on a device."""

    device: torch.device
    dtype: torch.dtype  # what autocast computes in; float32 means no autocast

    @classmethod
    def for_device(cls, device: torch.device) -> Precision:
        if device.type != "cuda":
            return cls(device, torch.float32)
        bf16 = torch.cuda.is_bf16_supported()
        return cls(device, torch.bfloat16 if bf16 else torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Scales the loss so fp16 gradients do not underflow; a pass-through otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
