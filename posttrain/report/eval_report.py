"""What ``posttrain eval`` writes: a printed table, ``eval.json``, ``eval.md`` and ``eval.png``.

The input is one dict per model (``{"model": name, "figures": {column: {mean, low, high, n}},
"samples": [...]}``); every figure is a mean with a 95% interval.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _cell(figure: dict[str, float] | None, percent: bool) -> str:
    if not figure or figure.get("mean") is None or math.isnan(figure["mean"]):
        return "-"
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    mean, low, high = (figure.get(k, float("nan")) for k in ("mean", "low", "high"))
    if math.isnan(low) or low == high:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def columns_of(results: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for result in results:
        for column in result["figures"]:
            seen.setdefault(column, None)
    return list(seen)


def rate_columns_of(results: list[dict[str, Any]]) -> set[str]:
    """Columns whose figures are rates (shown in percent): those marked ``rate`` by the evaluation."""
    return {column for result in results for column, figure in result["figures"].items() if figure.get("rate")}


def format_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per model, one column per figure (rates in %, with 95% intervals)."""
    columns = columns_of(results)
    rate_columns = rate_columns_of(results)
    header = ["model"] + [f"{c} (%)" if c in rate_columns else c for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [result["model"]] + [_cell(result["figures"].get(c), c in rate_columns) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sample_text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)


def write_eval_outputs(output_dir: str, results: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, str]:
    """Write ``eval.json``, ``eval.md`` and (with matplotlib) ``eval.png``; return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, "eval.json"), "md": os.path.join(output_dir, "eval.md")}
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump({"settings": settings, "results": results}, handle, indent=2, default=str)
    table = format_table(results)
    lines = ["# Evaluation", "", table, "",
             "Rates are in percent with a 95% interval in brackets (Wilson's for rates, normal for means). "
             "On a small set each problem moves a rate by 100/n points.", ""]
    for result in results:
        if result.get("samples"):
            lines += [f"## Samples: {result['model']}", ""]
            for sample in result["samples"]:
                lines.append(f"- prompt: `{_sample_text(sample['prompt'])[-120:]}`  ")
                lines.append(f"  completion: `{_sample_text(sample['completion'])[:200]}`"
                             + (f"  (answer {sample['answer']})" if "answer" in sample else ""))
            lines.append("")
    with open(paths["md"], "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    plot = plot_eval(results, os.path.join(output_dir, "eval.png"))
    if plot:
        paths["png"] = plot
    return paths


def plot_eval(results: list[dict[str, Any]], output_path: str) -> str | None:
    """One panel per figure: a bar per model with its 95% interval; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    columns = [c for c in columns_of(results)
               if any(not math.isnan(r["figures"].get(c, {}).get("mean", float("nan"))) for r in results)]
    if not columns:
        return None
    rate_columns = rate_columns_of(results)
    per_row = min(3, len(columns))
    rows = (len(columns) + per_row - 1) // per_row
    width = max(3.2, 0.9 * len(results) + 1.5)
    fig, axes = plt.subplots(rows, per_row, figsize=(width * per_row, 3.6 * rows), squeeze=False)
    for axis in axes.flat[len(columns):]:
        axis.set_visible(False)
    names = [r["model"] for r in results]
    for axis, column in zip(axes.flat, columns):
        scale = 100.0 if column in rate_columns else 1.0
        means, below, above = [], [], []
        for result in results:
            figure = result["figures"].get(column, {})
            mean = figure.get("mean", float("nan")) * scale
            low, high = figure.get("low", float("nan")) * scale, figure.get("high", float("nan")) * scale
            means.append(mean)
            below.append(0.0 if math.isnan(low) else max(0.0, mean - low))
            above.append(0.0 if math.isnan(high) else max(0.0, high - mean))
        axis.bar(range(len(names)), means, yerr=[below, above], capsize=4, color="#4C72B0")
        for position, mean in enumerate(means):
            if not math.isnan(mean):
                axis.annotate(f"{mean:.1f}" if column in rate_columns else f"{mean:.3g}", (position, mean),
                              textcoords="offset points", xytext=(6, 3), fontsize=8)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_title(column + (" (%)" if column in rate_columns else ""))
        if column in rate_columns:
            axis.set_ylim(0, 100)
            if column.startswith(("win_rate", "preference_accuracy")):
                axis.axhline(50, color="grey", linestyle="--", linewidth=1, label="chance")
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(output_path, dpi=100)
    plt.close(fig)
    return output_path
