"""A faster one-token step on a multi-core CPU, without touching the caller's model.

A decode step multiplies one token's vector by every weight matrix, so its speed is
the speed of reading the weights from memory, and PyTorch's CPU kernel for a one-row
product reads them with one core. Split the matrix into column blocks, one per
thread, and compute them as one batched product: every core then reads its share.

``for_decoding(model)`` returns the model to run the token loop with: on a CPU with
more than one thread, a shallow copy of it whose large Linear layers take that path;
otherwise the model itself. The copy shares every parameter and buffer with the model
(nothing is copied, moved or re-laid-out), so the caller's model is left exactly as
it was, and its values are those of nn.Linear up to float rounding. Small matrices
keep the plain product: for them the batched product's fixed cost is larger than
what the second core saves (bench/decode_fast_path.py measures both).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_WEIGHT = 1 << 18  # elements: a smaller matrix keeps the plain product
MAX_ROWS = 16  # beyond this the ordinary matrix product already keeps every core busy


class BlockedLinear(nn.Module):
    """A Linear layer computed as ``parts`` column blocks when given a few rows without
    gradients; the wrapped layer itself otherwise (training, prefill of a long prompt)."""

    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        self.linear = linear
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.numel() > MAX_ROWS * self.linear.in_features:
            return self.linear(x)
        rows = x.reshape(-1, self.linear.in_features)
        return blocked_linear(rows, self.linear.weight, self.linear.bias, self.parts).view(*x.shape[:-1], -1)


def blocked_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """rows (R, in) @ weight.T (+ bias) for weight (out, in), as ``parts`` column blocks
    in one batched product, without copying the weight. When ``parts`` does not divide
    out, the last out % parts columns are one plain product."""
    out, inp = weight.shape
    even = out - out % parts
    blocks = weight[:even].view(parts, even // parts, inp).transpose(1, 2)  # (parts, in, block), a view
    stacked = rows.expand(parts, *rows.shape)  # (parts, R, in), no copy
    if bias is None:
        y = torch.bmm(stacked, blocks)
    else:
        y = torch.baddbmm(bias[:even].view(parts, 1, -1), stacked, blocks)
    y = y.transpose(0, 1).reshape(rows.size(0), even)  # (R, even)
    if even == out:
        return y
    rest = F.linear(rows, weight[even:], None if bias is None else bias[even:])
    return torch.cat([y, rest], dim=1)


def for_decoding(model: nn.Module, min_weight: int = MIN_WEIGHT) -> nn.Module:
    """The model to decode with: a shallow copy whose nn.Linear layers of at least
    ``min_weight`` weight elements run blocked, when the model is on a CPU and torch
    uses more than one thread and at least one layer is that large; the model itself
    otherwise. The copy shares the parameters, so it sees later changes to them."""
    parts = torch.get_num_threads()
    linear_layers = [m for m in model.modules() if type(m) is nn.Linear]
    if (parts < 2 or not linear_layers or linear_layers[0].weight.device.type != "cpu"
            or not any(m.weight.numel() >= min_weight and m.weight.is_contiguous() for m in linear_layers)):
        return model
    return _copy_with_blocks(model, parts, min_weight)


def _copy_with_blocks(module: nn.Module, parts: int, min_weight: int) -> nn.Module:
    if type(module) is nn.Linear:
        large = module.weight.numel() >= min_weight and module.weight.is_contiguous()
        return BlockedLinear(module, parts) if large else module
    clone = copy.copy(module)  # a new object over the same parameter and buffer dicts
    clone._modules = {name: _copy_with_blocks(child, parts, min_weight) if child is not None else None
                      for name, child in module._modules.items()}
    return clone
