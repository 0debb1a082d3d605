"""Loss curves of a training run, from its metrics.jsonl, as a PNG.

    python train.py --plot out/shakespeare_char      # writes out/shakespeare_char/loss.png

Top: the train and val loss of each evaluation, and the mean training loss of the steps
between evaluations. Bottom: the learning rate. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.errors import UserError


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in file order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no metrics file at {path}; train a model into that folder first")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}, line {number}: not a JSON record") from None
    if not records:
        raise UserError(f"{path} has no records yet; wait for the first evaluation")
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``run_dir``/metrics.jsonl into ``out`` (default ``run_dir``/loss.png); returns the path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("drawing loss curves needs matplotlib: pip install 'tinygpt[plot]' (or matplotlib)") from None

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [s for s, _ in points], [v for _, v in points]

    figure, (losses, rates) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for key, label, style in [
        ("loss", "training steps (mean since previous evaluation)", dict(color="0.6", linewidth=1)),
        ("train_loss", "train (evaluation)", dict(marker=".")),
        ("val_loss", "val (evaluation)", dict(marker=".")),
    ]:
        steps, values = series(key)
        if steps:
            losses.plot(steps, values, label=label, **style)
    best_steps, best_values = series("val_loss")
    if best_values:
        best = min(range(len(best_values)), key=best_values.__getitem__)
        losses.annotate(f"best val {best_values[best]:.4f}", (best_steps[best], best_values[best]),
                        textcoords="offset points", xytext=(0, 12), ha="center")
    losses.set_ylabel("cross-entropy loss (nats/token)")
    losses.legend()
    losses.grid(alpha=0.3)
    losses.set_title(str(run_dir))
    rates.plot(*series("lr"), color="tab:green")
    rates.set_ylabel("learning rate")
    rates.set_xlabel("step")
    rates.grid(alpha=0.3)
    figure.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
