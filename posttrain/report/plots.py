"""Plots of a run's metrics (needs matplotlib: ``pip install posttrain[plots]``)."""

from __future__ import annotations

import os

from posttrain.report.metrics import read_metrics, series


def plot_metrics(run_dir: str, keys: list[str], output_path: str | None = None, title: str | None = None) -> str | None:
    """Plot ``keys`` of ``<run_dir>/metrics.jsonl`` against the step, one panel each; return the PNG path.

    Returns None (and plots nothing) when matplotlib is missing or no key has data.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(run_dir)
    panels = [(key, *series(records, key)) for key in keys]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for axis, (key, steps, values) in zip(axes[0], panels):
        axis.plot(steps, values, marker="." if len(values) < 40 else None)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output_path = output_path or os.path.join(run_dir, "metrics.png")
    fig.savefig(output_path, dpi=100)
    plt.close(fig)
    return output_path
