"""The optimisers of a training run, built from the config and driven as one.

``optimizer = "adamw"``: AdamW for every parameter, weight decay on the matrices
(weights of Linear and Embedding layers) only, never on biases or norms.

``optimizer = "muon"``: Muon (momentum, then the update orthogonalised by a
Newton-Schulz iteration, Jordan et al. 2024) for the hidden matrices, the 2-D weights
inside the Transformer blocks; AdamW, as above, for the rest: the token and position
embeddings, the (tied) head, biases and norms, for which Muon is not meant. Muon is
PyTorch's torch.optim.Muon, with one choice added: the number type of its
Newton-Schulz iteration (see MuonWithPrecision).

Each parameter group remembers its peak learning rate, and the schedule sets every
group to peak x the same factor, so both optimisers warm up and decay together.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from model.config import TrainConfig

PEAK_LR = "peak_lr"  # the key under which each param group keeps its peak learning rate


def hidden_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The 2-D weights inside the Transformer blocks (attention and MLP projections)."""
    return [p for p in model.blocks.parameters() if p.requires_grad and p.dim() == 2]


def adamw(params: list[torch.Tensor], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW decaying only the matrices. The fused kernel (one launch for all parameters)
    on CUDA. On the CPU the multi-tensor ("foreach") one, which measured faster there than
    the fused one and which PyTorch does not pick by itself on the CPU."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
        **({"fused": True} if device.type == "cuda" else {"foreach": True}),
    )


class MuonWithPrecision(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in ``ns_dtype``.

    torch's Muon always orthogonalises in bfloat16: fast where the hardware multiplies
    bfloat16 matrices natively (GPUs, recent server CPUs), several times slower than
    float32 on CPUs that only emulate it (most laptops). The step here is torch's,
    written out so the number type can be chosen: the same state (one momentum buffer
    per matrix), the same hyper-parameters, and with ``ns_dtype=torch.bfloat16`` the
    same result bit for bit (tests/test_optim.py checks it against torch.optim.Muon).
    Unlike torch's, ``step`` takes no closure (training here never passes one).
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **settings):
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonWithPrecision.step takes no closure")
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                momentum = state["momentum_buffer"]
                momentum.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(momentum, group["momentum"]) if group["nesterov"] else momentum
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * shape_factor(group["adjust_lr_fn"], param.shape))


def orthogonalise(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz iteration towards U V^T (U S V^T = matrix): each step maps every
    singular value s to a s + b s^3 + c s^5, which, from s <= 1 (the matrix divided by
    its Frobenius norm), pushes all of them into roughly [0.7, 1.2]. The iteration runs
    on the wide orientation, so its Gram matrix is the smaller one."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, polynomial, x, beta=a)  # a X + (b G + c G^2) X
    return x.T if tall else x


def shape_factor(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """How Muon scales its learning rate for a matrix of ``shape`` (rows, columns)."""
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return math.sqrt(max(1, rows / columns))  # "original" (Keller Jordan's)


def muon(params: list[torch.Tensor], cfg: TrainConfig, device: torch.device) -> MuonWithPrecision:
    return MuonWithPrecision(
        params, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay,
        adjust_lr_fn=cfg.muon_adjust_lr, ns_dtype=muon_ns_dtype(cfg.muon_precision, device),
    )


def muon_ns_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``muon_precision``: "auto" is bfloat16 on CUDA (native there, as torch's Muon
    assumes) and float32 elsewhere (a CPU may have no bfloat16 matrix unit)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, precision)


class Optimizers:
    """One or more torch optimisers over disjoint parameters, stepped, zeroed, saved and
    loaded together (the gradient scaler is passed in, as it serves all of them)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group[PEAK_LR] = group["lr"]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        """Every group's learning rate to its peak x ``factor`` (the schedule's position)."""
        for group in self.param_groups:
            group["lr"] = group[PEAK_LR] * factor

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        """Divide the gradients by the fp16 loss scale (a no-op when the scaler is off)."""
        for optimizer in self.optimizers.values():
            scaler.unscale_(optimizer)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        """Step every optimiser through the scaler (which skips a step with inf/NaN
        gradients under fp16), then update the scale once."""
        for optimizer in self.optimizers.values():
            scaler.step(optimizer)
        scaler.update()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Load states saved by state_dict; they must come from the same optimisers. The
        peak learning rates stay this run's (the config's), not the saved ones."""
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"optimizer state is for {', '.join(sorted(state)) or 'nothing'}, "
                f"this run uses {', '.join(sorted(self.optimizers))}"
            )
        peaks = [group[PEAK_LR] for group in self.param_groups]
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])
        for group, peak in zip(self.param_groups, peaks):
            group[PEAK_LR] = peak


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """The optimisers ``cfg.optimizer`` names over ``model``'s trainable parameters
    (a GPT: it must have ``blocks``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return Optimizers({"adamw": adamw(params, cfg, device)})
    matrices = hidden_matrices(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in params if id(p) not in chosen]
    return Optimizers({"adamw": adamw(rest, cfg, device), "muon": muon(matrices, cfg, device)})
