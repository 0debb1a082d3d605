"""Train a GPT on a prepared dataset.

    python train.py --config configs/default.toml [KEY=VALUE ...]

The loop, as a story: read the dataset's meta and memory-map its splits; build the
model from the config (vocab size from the data); AdamW with weight decay on the 2-D
weights only; each iteration sample a batch, compute the loss, back-propagate, clip
the gradient norm, step at the learning rate of a linear-warmup-then-cosine
schedule. Every ``eval_interval`` iterations measure train and val loss on held-out
batches, append them to metrics.jsonl, and save ``last.pt`` (and ``best.pt`` when val
improved).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import save_checkpoint
from model.config import Config, TrainConfig, load_config
from model.data import check_split_length, get_batch, open_split, read_meta
from model.device import Precision, resolve_device
from model.errors import UserError
from model.gpt import GPT


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak over ``warmup_iters``, then cosine decay to ``min_lr``."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, decaying only matrices (weights of Linear/Embedding), never biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )


@torch.no_grad()
def estimate_loss(
    model: GPT, splits: dict[str, np.ndarray], cfg: Config, device: torch.device, precision: Precision
) -> dict[str, float]:
    """Mean loss over ``eval_iters`` batches per split. The batches come from their own
    generator, seeded the same way every time, so evaluations compare like with like and
    never disturb the training batches."""
    model.eval()
    losses = {}
    for split, tokens in splits.items():
        generator = torch.Generator().manual_seed(cfg.train.seed + 1)
        total = 0.0
        for _ in range(cfg.train.eval_iters):
            x, y = get_batch(tokens, cfg.train.batch_size, cfg.model.block_size, generator)
            with precision.autocast():
                _, loss = model(x.to(device), y.to(device))
            total += loss.item()
        losses[split] = total / cfg.train.eval_iters
    model.train()
    return losses


def resolve_vocab_size(cfg: Config, meta: dict) -> Config:
    """The model's vocabulary comes from the dataset; a config that names another is an error."""
    data_vocab = int(meta["vocab_size"])
    if cfg.model.vocab_size not in (0, data_vocab):
        raise UserError(
            f"model.vocab_size is {cfg.model.vocab_size} but the dataset's tokenizer has {data_vocab} tokens; "
            "leave model.vocab_size at 0 to take it from the data"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data_vocab))


def train(cfg: Config, *, progress: bool = True) -> dict:
    """Run one training job; returns the final losses and where the checkpoints are."""
    tc = cfg.train
    device = resolve_device(tc.device)
    meta = read_meta(tc.data_dir)
    cfg = resolve_vocab_size(cfg, meta)
    splits = {split: open_split(tc.data_dir, split, meta) for split in ("train", "val")}
    for split, tokens in splits.items():
        check_split_length(tokens, cfg.model.block_size, split)

    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)
    optimizer = make_optimizer(model, tc, device)
    precision = Precision.for_device(device)
    scaler = precision.grad_scaler()
    batch_generator = torch.Generator().manual_seed(tc.seed)
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    tokens_per_iter = tc.batch_size * cfg.model.block_size

    def checkpoint(name: str, step: int, best_val: float) -> None:
        save_checkpoint(
            out_dir / name, model=model, optimizer=optimizer, config=cfg.to_dict(),
            tokenizer=meta["tokenizer"], step=step, best_val_loss=best_val,
        )

    log = tqdm.write if progress else print
    log(
        f"model: {model.num_params() / 1e6:.2f}M parameters, {cfg.model.n_layer} layers, "
        f"{cfg.model.n_head} heads, width {cfg.model.n_embd}, context {cfg.model.block_size}, "
        f"vocab {cfg.model.vocab_size} | data: {len(splits['train']):,} train / {len(splits['val']):,} val tokens "
        f"| device {device} ({str(precision.dtype).removeprefix('torch.')})"
    )
    best_val = float("inf")
    losses = {}
    bar = tqdm(range(tc.max_iters + 1), desc="train", unit="it", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    for step in bar:
        if step % tc.eval_interval == 0 or step == tc.max_iters:
            losses = estimate_loss(model, splits, cfg, device, precision)
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step, "lr": learning_rate_at(step, tc), "train_loss": losses["train"],
                "val_loss": losses["val"], "tokens_per_s": window_tokens / elapsed if window_tokens else None,
                "elapsed_s": time.perf_counter() - started,
            }
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log(f"step {step:>6}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if step > 0:
                if losses["val"] < best_val:
                    best_val = losses["val"]
                    checkpoint("best.pt", step, best_val)
                checkpoint("last.pt", step, best_val)
            window_start, window_tokens = time.perf_counter(), 0
        if step == tc.max_iters:
            break

        lr = learning_rate_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(splits["train"], tc.batch_size, cfg.model.block_size, batch_generator)
        with precision.autocast():
            _, loss = model(x.to(device), y.to(device))
        scaler.scale(loss).backward()
        if tc.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += tokens_per_iter
        rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}", refresh=False)
    bar.close()
    log(f"saved {out_dir / 'best.pt'} (best val loss {best_val:.4f}) and {out_dir / 'last.pt'}")
    return {"train_loss": losses["train"], "val_loss": losses["val"], "best_val_loss": best_val, "out_dir": str(out_dir)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a GPT on a dataset prepared by data/prepare.py.",
        epilog="Overrides: KEY=VALUE with KEY as section.field or field, e.g. "
        "model.n_layer=6 max_iters=500 learning_rate=3e-4 device=cpu",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML file with [model] and [train] tables "
                        "(default: the built-in defaults, the same as configs/default.toml)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps (overrides train.device)")
    parser.add_argument("--no-progress", action="store_true", help="print plain lines instead of a progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied in order")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    try:
        cfg = load_config(args.config, overrides)
        train(cfg, progress=not args.no_progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
