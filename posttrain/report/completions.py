"""The completions an online trainer sampled, as people read them: ``completions.jsonl`` in the output
directory, a plain-text table printed at each log, and a ``wandb`` table when wandb is a reporter.

A row is a dict: ``prompt``, ``completion``, ``rewards`` (per reward function), ``reward`` (the
weighted total), ``advantage``, and any column a reward function added with ``log_extra``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

COMPLETIONS_FILE = "completions.jsonl"


def append_completion_rows(output_dir: str, step: int, rows: list[dict[str, Any]]) -> None:
    """Append one JSON line per row, ``{"step": step, **row}``, to ``output_dir/completions.jsonl``."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, COMPLETIONS_FILE), "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"step": step, **row}, default=str) + "\n")


#: The keys of a completions-table row; any other key is a column a reward function added with ``log_extra``.
COMPLETION_ROW_KEYS = ("step", "prompt", "completion", "rewards", "reward", "advantage")


class CompletionsLog:
    """Keeps the rows of the latest generation; at each log, appends them to ``completions.jsonl`` and prints a table."""

    FILE = COMPLETIONS_FILE

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def replace(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def flush(self, output_dir: str | None, step: int, max_printed: int | None, report_to: list[str] | None = None,
              *, unique_prompts: bool = False) -> None:
        """Append every row to the file; print (and log to wandb) the table, one row per distinct prompt
        when ``unique_prompts`` (TRL's ``log_unique_prompts``)."""
        if not self.rows:
            return
        if output_dir:
            append_completion_rows(output_dir, step, self.rows)
        table = first_row_per_prompt(self.rows) if unique_prompts else self.rows
        shown = table if max_printed is None else table[:max_printed]
        print(format_completions_table(shown, title=f"completions at step {step}"))
        if report_to and "wandb" in report_to:
            log_wandb_table(table, step)
        self.rows = []


def first_row_per_prompt(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first row of each distinct prompt (compared by its text), in order."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = str(row.get("prompt"))
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def format_completions_table(rows: list[dict[str, Any]], *, title: str = "completions", width: int = 48) -> str:
    """A plain-text table: prompt, completion, each reward, total reward and advantage (texts shortened)."""
    if not rows:
        return f"{title}: (none)"
    reward_names = list(rows[0].get("rewards", {}))
    extra_names = [name for name in rows[0] if name not in COMPLETION_ROW_KEYS]
    header = ["prompt", "completion", *reward_names, *extra_names, "reward", "advantage"]

    def short(text: Any) -> str:
        text = str(text).replace("\n", "\\n")
        return text if len(text) <= width else text[: width - 1] + "…"

    def number(value: Any) -> str:
        return "None" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    lines = [[short(r["prompt"]), short(r["completion"]), *[number(r["rewards"][n]) for n in reward_names],
              *[short(r.get(n)) for n in extra_names], number(r.get("reward")), number(r.get("advantage"))] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    render = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([title, render(header), rule, *(render(line) for line in lines)])


def log_wandb_table(rows: list[dict[str, Any]], step: int) -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    extra_names = [name for name in rows[0] if name not in COMPLETION_ROW_KEYS]
    columns = ["step", "prompt", "completion", *rows[0]["rewards"], *extra_names, "reward", "advantage"]
    data = [[step, r["prompt"], r["completion"], *r["rewards"].values(), *[r.get(n) for n in extra_names], r["reward"],
             r["advantage"]] for r in rows]
    wandb.log({"completions": wandb.Table(columns=columns, data=data)})


def prompt_text(prompt: Any) -> str:
    """A readable one-string form of a prompt: the string itself, or ``role: content`` lines of a conversation."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def nan_to_none(value: float) -> float | None:
    """None for NaN (a row no reward function scored), the value otherwise: what the table and JSON show."""
    return None if math.isnan(value) else value
