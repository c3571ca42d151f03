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


# values a metric takes when nothing was learned: ln 2 for pairwise losses, 0.5 for pair accuracies
CHANCE_LEVELS = {
    "accuracy": 0.5, "rewards/accuracies": 0.5, "eval_accuracy": 0.5, "eval_rewards/accuracies": 0.5,
}


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with bias correction; the weight grows with the number of points."""
    if weight is None:
        weight = min(0.9, max(0.0, 1.0 - 8.0 / max(len(values), 1)))
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1.0 - weight) * value
        smoothed.append(average / (1.0 - weight**count) if weight > 0 else value)
    return smoothed


def plot_curves(records: list[dict], keys: list[str], output_path: str, *, title: str | None = None,
                chance: dict[str, float] | None = None) -> str | None:
    """One panel per key: raw points faint, a smoothed line over them, a dashed chance line where one
    exists, integer step ticks. Returns the PNG path, or None without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    chance = {**CHANCE_LEVELS, **(chance or {})}
    panels = [(key, *series(records, key)) for key in keys]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    columns = min(len(panels), 4)
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, (key, steps, values) in zip(axes.flat, panels):
        axis.plot(steps, values, marker=".", linestyle="none" if len(values) > 3 else "-", alpha=0.35,
                  color="#4C72B0", label="logged")
        if len(values) > 3:
            axis.plot(steps, smooth(values), color="#4C72B0", linewidth=2, label="smoothed")
        if key in chance:
            axis.axhline(chance[key], color="grey", linestyle="--", linewidth=1, label=f"chance ({chance[key]:g})")
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if key in chance:
            axis.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output_path, dpi=100)
    plt.close(fig)
    return output_path
