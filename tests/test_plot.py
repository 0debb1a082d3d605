"""model/plot.py: charts are files, drawn without touching the process's matplotlib state."""

from __future__ import annotations

import json
import math

import pytest

from model.plot import plot_run
from model.plot import plot_comparison

PNG = b"\x89PNG\r\n\x1a\n"


def test_charts_leave_the_backend_and_pyplot_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    records = [{"step": s, "lr": 1e-3, "loss": 2.0 - s / 10, "train_loss": 2.0 - s / 10, "val_loss": 2.1 - s / 10}
               for s in (0, 5, 10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = [{"strategy": "human", "perplexity": 9.0, "distinct_2": 0.8},
            {"strategy": "greedy", "perplexity": 2.0, "distinct_2": 0.1},
            {"strategy": "top-p:p=0.9", "perplexity": math.nan, "distinct_2": 0.7}]
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # as a notebook or an application might have chosen
    try:
        open_figures = plt.get_fignums()
        assert plot_run(tmp_path).read_bytes()[:8] == PNG
        assert plot_comparison(rows, tmp_path / "chart.png") is True
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == open_figures  # no pyplot figure made or closed
    finally:
        matplotlib.use(before)
    assert (tmp_path / "chart.png").read_bytes()[:8] == PNG
