"""Prompt datasets of the online methods (GRPO, RLOO, online DPO, PPO): preparation and sampling order.

:func:`prepare_prompt_dataset` turns any dataset with prompts into tokenized ``prompt_input_ids``
(every method calls it, so they accept the same datasets); :class:`RepeatedBlockSampler` hands the
prompts of one generation out again for every micro-step that generation serves.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from posttrain.errors import ConfigError


def prepare_prompt_dataset(
    dataset,
    tokenizer,
    max_prompt_length: int | None,
    num_proc: int | None,
    split: str,
    *,
    prompt_column_only: bool = False,
    template_kwargs: dict | None = None,
):
    """Tokenize the prompts of ``dataset`` into ``prompt_input_ids``, keeping every other column.

    Accepted: any map-style dataset with a ``prompt`` column (prompt-only, prompt-completion,
    preference...) or already tokenized ``prompt_input_ids``; unless ``prompt_column_only``, also
    conversations in ``messages`` (the prompt is everything before the last assistant turn) and
    tokenized ``input_ids`` alone. GRPO and RLOO ask for ``prompt_column_only``: as in TRL, their
    reward functions receive the dataset's ``prompt`` column, so anything else is a ``DataError``
    naming the columns found. ``split`` names the dataset in errors (``"train"``, ``"eval"``).
    ``template_kwargs``: extra chat-template variables for conversational prompts (``chat_template_kwargs``).
    """
    from posttrain.data.formats import DataFormat, validate_dataset
    from posttrain.data.load import describe_source
    from posttrain.data.tokenize import tokenize_prompts

    if not hasattr(dataset, "__len__") or not hasattr(dataset, "column_names"):
        raise ConfigError(
            f"the {split} dataset must be a map-style datasets.Dataset, got {type(dataset).__name__}",
            field="train_dataset", fix="load it without streaming, or build it with Dataset.from_list(...)",
        )
    columns = dataset.column_names
    if "prompt_input_ids" in columns:
        return dataset
    if "input_ids" in columns and "prompt" not in columns and not prompt_column_only:
        dataset = dataset.rename_column("input_ids", "prompt_input_ids")
        return dataset.remove_columns([c for c in ("attention_mask",) if c in dataset.column_names])
    source = describe_source(dataset, fallback=f"{split} dataset")
    if "messages" in columns and "prompt" not in columns and not prompt_column_only:
        validate_dataset(dataset, [DataFormat.CONVERSATIONAL], source=source)
        dataset = dataset.map(lambda row: {"prompt": conversation_prompt(row["messages"])}, remove_columns=["messages"])
    validate_dataset(dataset, [DataFormat.PROMPT_ONLY], source=source)  # any dataset with a `prompt` column
    return tokenize_prompts(dataset, tokenizer, max_prompt_length=max_prompt_length, num_proc=num_proc, source=source,
                            template_kwargs=template_kwargs)


def conversation_prompt(messages: list[dict]) -> list[dict]:
    """The messages before the last assistant turn (all of them when there is none)."""
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last_assistant]


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
