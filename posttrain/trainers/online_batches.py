"""Pieces of the online loop that do not need a trainer: prompt sampling in repeated blocks, batch
assembly and trimming, completion log-probs, and the completions table."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Sampler

from posttrain.models.lm_head import token_logps

logger = logging.getLogger("posttrain")


class RepeatedBlockSampler(Sampler[int]):
    """Prompt indices in blocks of ``block_size``, each block yielded ``repeats`` times in a row.

    With a dataloader of batch size ``block_size // num_processes``, each process receives its own
    share of a block (accelerate deals consecutive batches out round-robin), and the same share
    again for every micro-step the generation serves. A trailing partial block is dropped; the order
    of epoch ``e`` is a permutation seeded by ``seed + e``, identically on every process, so a run
    resumed in a later epoch (the Trainer calls :meth:`set_epoch`) sees the order it would have seen.
    """

    def __init__(self, num_rows: int, block_size: int, repeats: int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.num_rows, self.block_size, self.repeats, self.shuffle = num_rows, block_size, repeats, shuffle
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator) if self.shuffle else torch.arange(self.num_rows)
        order = order.tolist()
        for start in range(0, self.num_rows - self.block_size + 1, self.block_size):
            block = order[start : start + self.block_size]
            for _ in range(self.repeats):
                yield from block

    def __len__(self) -> int:
        return (self.num_rows // self.block_size) * self.block_size * self.repeats


# ----------------------------------------------------------------------------- tensors of a rollout


def prompt_completion_inputs(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs for prompt + completion rows: ids, attention mask, positions, and the target mask.

    Positions count real tokens only, so a left-padded prompt starts at 0, as during sampling.
    ``targets`` marks the completion tokens (the positions whose log-probs a loss reads).
    """
    input_ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)
    attention_mask = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    targets = torch.cat([torch.zeros_like(rows["prompt_mask"]), rows["completion_mask"]], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "targets": targets}


def completion_token_logps(
    model: nn.Module,
    rows: dict[str, torch.Tensor],
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    logps_fn: Callable | None = None,
    share_prompt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``(B, C)`` of the completion tokens (zero on padding), and entropies if asked.

    ``logps_fn`` replaces :func:`posttrain.models.lm_head.token_logps` (e.g. a reference policy's).
    Differentiable when autograd is on. With ``share_prompt``, completions of the same prompt share
    one forward over it.
    """
    inputs = prompt_completion_inputs(rows)
    compute = logps_fn or token_logps
    kwargs = {"with_entropy": True} if with_entropy else {}
    result = compute(
        model, inputs["input_ids"], inputs["targets"], inputs["attention_mask"], inputs["position_ids"],
        temperature=temperature, chunk_size=chunk_size,
        prompt_width=rows["prompt_ids"].shape[1] if share_prompt else None, **kwargs,
    )
    start = rows["prompt_ids"].shape[1] - 1  # logps[:, t] scores token t + 1
    entropy = result.entropy[:, start:] if with_entropy else None
    return result.logps[:, start:], entropy


def trim_padding(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop prompt columns that are padding in every row and completion columns past the longest completion."""
    prompt_mask, completion_mask = rows["prompt_mask"], rows["completion_mask"]
    used_prompt = prompt_mask.any(dim=0).nonzero()
    first = int(used_prompt[0]) if used_prompt.numel() else prompt_mask.shape[1] - 1
    width = max(int(completion_mask.sum(dim=1).max()), 1) if completion_mask.numel() else 1
    trimmed = {}
    for name, value in rows.items():
        if name in ("prompt_ids", "prompt_mask"):
            value = value[:, first:]
        elif torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == completion_mask.shape[1]:
            value = value[:, :width]
        trimmed[name] = value
    return trimmed


def split_into_micro_batches(
    rows: dict[str, torch.Tensor], num_parts: int, generator: torch.Generator | None = None
) -> list[dict[str, torch.Tensor]]:
    """Shuffle the rows (when a generator is given) and cut them into ``num_parts`` equal micro-batches."""
    num_rows = next(iter(rows.values())).shape[0]
    order = torch.randperm(num_rows, generator=generator) if generator is not None else torch.arange(num_rows)
    size = num_rows // num_parts
    parts = []
    for part in range(num_parts):
        index = order[part * size : (part + 1) * size]
        parts.append(trim_padding({name: value[index.to(value.device)] for name, value in rows.items()}))
    return parts


# ----------------------------------------------------------------------------- the completions table


#: The keys of a completions-table row; any other key is a column a reward function added with ``log_extra``.
COMPLETION_ROW_KEYS = ("step", "prompt", "completion", "rewards", "reward", "advantage")


class CompletionsLog:
    """Keeps the rows of the latest generation; at each log, appends them to ``completions.jsonl`` and prints a table."""

    FILE = "completions.jsonl"

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def replace(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def flush(self, output_dir: str | None, step: int, max_printed: int | None, report_to: list[str] | None = None) -> None:
        if not self.rows:
            return
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, self.FILE), "a", encoding="utf-8") as handle:
                for row in self.rows:
                    handle.write(json.dumps({"step": step, **row}, default=str) + "\n")
        shown = self.rows if max_printed is None else self.rows[:max_printed]
        print(format_completions_table(shown, title=f"completions at step {step}"))
        if report_to and "wandb" in report_to:
            _log_wandb_table(self.rows, step)
        self.rows = []


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


def _log_wandb_table(rows: list[dict[str, Any]], step: int) -> None:
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


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


# ----------------------------------------------------------------------------- the trainer


@dataclass
class ScoredRollout:
    """Completions of one generation batch with their rewards; rows prompt-major, ``group_size`` per prompt."""

    rows: dict[str, torch.Tensor]
    prompts: list[Any]
    completions: list[Any]
    rewards_per_function: torch.Tensor  # (N, F), NaN where a function returned None
    rewards: torch.Tensor  # (N,) weighted total
    reward_names: list[str]
    group_size: int
    extra_columns: dict[str, list[Any]] = field(default_factory=dict)  # reward functions' log_extra, one value per row
    logged_metrics: dict[str, list[float]] = field(default_factory=dict)  # reward functions' log_metric, one per call
