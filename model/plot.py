"""Charts as PNG files: the loss curves of a training run, a comparison of decoding
strategies, a sweep's quality-diversity frontiers, and the one helper every chart is
drawn through.

    python train.py --plot out/shakespeare_char      # writes out/shakespeare_char/loss.png

Needs matplotlib (the ``plot`` extra). A chart is drawn on its own
`matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so drawing one
leaves the process's backend and pyplot's figures alone (a notebook keeps its inline
plots).
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

from model.errors import UserError

DPI = 120


class MatplotlibMissing(UserError):
    """A chart was asked for, and matplotlib is not installed."""


def save_chart(path: str | Path, draw: Callable[[Any], None], what: str, **figure_options: Any) -> Path:
    """Make a Figure (``figure_options`` as for `matplotlib.figure.Figure`, e.g. figsize),
    let ``draw(figure)`` fill it, and write it to ``path`` as a PNG; returns the path.

    Raises `MatplotlibMissing` (a UserError naming ``what`` needs it, e.g. "drawing loss
    curves") when matplotlib cannot be imported.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(f"{what} needs matplotlib: pip install 'tinygpt[plot]' (or matplotlib)") from None
    figure = Figure(**figure_options)
    FigureCanvasAgg(figure)
    draw(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return Path(path)


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
    """Draw ``run_dir``/metrics.jsonl into ``out`` (default ``run_dir``/loss.png); returns the path.

    Top: the train and val loss of each evaluation, and the mean training loss of the
    steps between evaluations. Bottom: the learning rate.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out) if out is not None else run_dir / "loss.png"
    return save_chart(out, lambda figure: _draw_run(figure, records, str(run_dir)), "drawing loss curves",
                      figsize=(8, 6))


def _draw_run(figure, records: list[dict[str, Any]], title: str) -> None:
    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [s for s, _ in points], [v for _, v in points]

    losses, rates = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
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
    losses.set_title(title)
    rates.plot(*series("lr"), color="tab:green")
    rates.set_ylabel("learning rate")
    rates.set_xlabel("step")
    rates.grid(alpha=0.3)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "", human: str = "human") -> bool:
    """A strategy comparison's chart: distinct-2 against perplexity, one point per row,
    told apart by colour and marker in a legend (labels next to points collide when
    strategies are close); the row whose strategy is ``human`` is a black star with guide
    lines through it. Returns False (and writes nothing) without matplotlib."""
    try:
        save_chart(path, lambda figure: _draw_comparison(figure, rows, title, human), "the comparison chart",
                   figsize=(8, 4.5))
    except MatplotlibMissing:
        return False
    return True


def _draw_comparison(figure, rows: Sequence[dict[str, Any]], title: str, human: str) -> None:
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax = figure.subplots()
    markers = "osD^vP<>Xhp"
    strategies = [row for row in rows if row["strategy"] != human]
    for i, row in enumerate(strategies):
        # hollow markers of different shapes: strategies that land on the same point stay visible
        ax.scatter([row["perplexity"]], [row["distinct_2"]], s=70, marker=markers[i % len(markers)],
                   facecolors="none", edgecolors=f"C{i % 10}", linewidths=1.6, label=row["strategy"], zorder=2)
    for row in rows:
        if row["strategy"] == human:
            x, y = row["perplexity"], row["distinct_2"]
            ax.scatter([x], [y], marker="*", s=280, color="black", label="human (validation text)", zorder=3)
            ax.axvline(x, color="black", linestyle=":", linewidth=1)
            ax.axhline(y, color="black", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 3, 5)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("perplexity of the text under the model (log scale)")
    ax.set_ylabel("distinct-2 (higher = more diverse)")
    ax.set_title(title or "decoding strategies: diversity against perplexity", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.grid(True, which="both", alpha=0.3)


def plot_frontier(summary, path: str | Path, title: str = "") -> bool:
    """A sweep's chart (``summary`` a `model.sweep.SweepSummary`): one panel, diversity
    across and quality up (a loss, so the good corner is bottom right). Each family's
    settings are faint hollow markers; its Pareto frontier is a line through them with
    filled markers; the human text is a black star with guide lines at its diversity
    (where matched diversity is read) and quality. Returns False (and writes nothing)
    without matplotlib."""
    try:
        save_chart(path, lambda figure: _draw_frontier(figure, summary, title), "the frontier chart",
                   figsize=(8, 5))
    except MatplotlibMissing:
        return False
    return True


def _draw_frontier(figure, summary, title: str) -> None:
    ax = figure.subplots()
    markers = "osD^vP<>Xhp"
    by_label = {(s["family"], s["label"]): s for s in summary.settings}
    for i, family in enumerate(summary.families):
        colour, marker = f"C{i % 10}", markers[i % len(markers)]
        mine = [s for s in summary.settings if s["family"] == family["family"]]
        ax.scatter([s["diversity"] for s in mine], [s["quality"] for s in mine], marker=marker, s=30,
                   facecolors="none", edgecolors=colour, alpha=0.45, linewidths=1)
        front = [by_label[(family["family"], label)] for label in family["frontier"]]
        ax.plot([s["diversity"] for s in front], [s["quality"] for s in front], color=colour, marker=marker,
                markersize=6, linewidth=1.6, label=family["family"])
    human = summary.human
    ax.scatter([human["diversity"]], [human["quality"]], marker="*", s=280, color="black",
               label="human (validation text)", zorder=3)
    ax.axvline(human["diversity"], color="black", linestyle=":", linewidth=1)
    ax.axhline(human["quality"], color="black", linestyle=":", linewidth=1)
    ax.set_xlabel(f"diversity: {summary.diversity_name} (higher = more diverse)")
    ax.set_ylabel(f"quality: {summary.quality_name} (lower = better)")
    ax.set_title(title or "decoding strategies: quality-diversity frontiers", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False,
              title="frontier per family", title_fontsize=8)
    ax.grid(True, alpha=0.3)
