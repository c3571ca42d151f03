"""A Markdown report of a run: the stage table, and plots of each stage's metrics."""

from __future__ import annotations

import os
from typing import Any

from posttrain.report.plots import plot_metrics

# what to plot per stage, when present in its metrics.jsonl
STAGE_METRICS = {
    "sft": ["loss", "mean_token_accuracy"],
    "reward": ["loss", "accuracy", "margin"],
    "ppo": ["objective/scores", "objective/kl", "loss/policy"],
    "grpo": ["reward", "kl", "completions/mean_length"],
    "rloo": ["reward", "kl"],
    "dpo": ["loss", "rewards/accuracies", "rewards/margins"],
}


def write_demo_report(output_dir: str, results: list[Any], *, task: str, eval_table: str | None = None) -> str:
    """Write ``<output_dir>/report.md``; ``results`` have name, model_dir, seconds, accuracy ({split: value}), extra."""
    lines = ["# posttrain demo report", "", f"Task: `{task}`. Accuracy is greedy exact match on every held-out "
             "(test) problem and on every training problem.", "",
             "| stage | held-out accuracy | train-problem accuracy | time (s) | notes |", "|---|---|---|---|---|"]
    for r in results:
        test = f"{r.accuracy['test']:.1%}" if r.accuracy else "-"
        train = f"{r.accuracy['train']:.1%}" if r.accuracy else "-"
        notes = ", ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in r.extra.items()
                          if v is not None)
        lines.append(f"| {r.name} | {test} | {train} | {r.seconds:.0f} | {notes} |")
    lines.append("")
    if eval_table:
        lines += ["## Every stage side by side (`posttrain eval`)", "",
                  "Greedy accuracy on every held-out problem with its 95% interval; the reward model's mean score "
                  "of each model's answers and their win rate against SFT's; preference accuracy on held-out pairs "
                  "(the reward model's own, and each policy's implicit reward against SFT). Details: `eval/eval.md`.",
                  "", eval_table, "", "![eval](eval/eval.png)", ""]
    for r in results:
        keys = STAGE_METRICS.get(r.name)
        if not keys:
            continue
        png = plot_metrics(r.model_dir, keys, os.path.join(output_dir, f"{r.name}.png"), title=r.name)
        if png:
            lines += [f"## {r.name}", "", f"![{r.name} metrics]({os.path.basename(png)})", ""]
    path = os.path.join(output_dir, "report.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path
