"""Learned absolute position tables: a clear error before a sequence runs past the last one.

GPT-2 and its relatives look each position up in a table of ``n_positions`` rows. A longer sequence
is not truncated or extrapolated: ``nn.Embedding`` fails deep in the forward with "index out of
range in self", after the run has started (models with rotary or ALiBi positions have no table
and run past ``max_position_embeddings`` as they were built to). Here the trainers check their
tokenized rows against the table before training, naming the row and its length, and every forward
of a trained model checks the positions it is given, so that a rollout or an evaluation batch that
is too long stops with the same explanation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from posttrain.errors import DataError

# names transformers gives a learned absolute position table (GPT-2, GPT-Neo, GPT-BigCode: ``wpe``)
POSITION_TABLE_NAMES = frozenset({"wpe", "position_embeddings", "embed_positions"})


def learned_position_table(model: nn.Module | None) -> tuple[str, nn.Embedding] | None:
    """The learned position table of ``model`` (its name and module), or None.

    Only a plain ``nn.Embedding`` counts: its forward takes the position ids themselves. Subclasses
    (OPT's and BioGPT's add an offset and take the attention mask) are left alone.
    """
    if model is None:
        return None
    for name, module in model.named_modules():
        if type(module) is nn.Embedding and name.rsplit(".", 1)[-1] in POSITION_TABLE_NAMES:
            return name, module
    return None


def _model_name(model: nn.Module) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__


class PositionLimitCheck:
    """A forward pre-hook for a position table: positions at or past its length are a :class:`DataError`.

    A class rather than a closure, so that a model carrying it can still be pickled (``torch.save(model)``).
    """

    def __init__(self, model_name: str, table_name: str, positions: int) -> None:
        self.model_name, self.table_name, self.positions = model_name, table_name, positions

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or args[0].numel() == 0:
            return
        last = int(args[0].max())
        if last >= self.positions:
            raise DataError(
                f"a sequence reaches position {last}, past the {self.positions} learned positions of "
                f"{self.model_name} ({self.table_name}): a batch, a rollout or an evaluation row is longer than the "
                f"model can encode",
                expected=f"at most {self.positions} tokens per sequence", found=str(last + 1),
                fix=f"cap the length at {self.positions}: --max_length (and --max_prompt_length / "
                    f"--max_completion_length for prompts and generations)",
            )


def guard_position_table(model: nn.Module | None) -> int | None:
    """Install :class:`PositionLimitCheck` on ``model``'s learned position table (once); the table's length,
    or None when the model has none."""
    found = learned_position_table(model)
    if found is None:
        return None
    name, table = found
    if not any(isinstance(hook, PositionLimitCheck) for hook in table._forward_pre_hooks.values()):
        table.register_forward_pre_hook(PositionLimitCheck(_model_name(model), name, table.num_embeddings))
    return table.num_embeddings


def _rows(dataset: Any, columns: Sequence[str], batch_size: int = 1024) -> Iterable[tuple[int, dict[str, list]]]:
    """(first row index, a batch of ``columns``) over a map-style dataset."""
    selected = dataset.select_columns(list(columns))
    for start in range(0, len(selected), batch_size):
        yield start, selected[start : start + batch_size]


def row_sequences(columns: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """The sequences a tokenized row holds, as the token columns each is made of: a preference pair's
    prompt + chosen and prompt + rejected, one ``input_ids``, or a prompt to sample from
    (``prompt_input_ids`` alone); none for untokenized rows."""
    if all(name in columns for name in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")):
        return ("prompt_input_ids", "chosen_input_ids"), ("prompt_input_ids", "rejected_input_ids")
    if "chosen_input_ids" in columns and "rejected_input_ids" in columns:
        return ("chosen_input_ids",), ("rejected_input_ids",)
    if "input_ids" in columns:
        return (("input_ids",),)
    return (("prompt_input_ids",),) if "prompt_input_ids" in columns else ()


def check_rows_fit_positions(model: nn.Module, dataset: Any, *, source: str, completion_tokens: int = 0,
                             completion_field: str = "max_completion_length") -> None:
    """Raise a :class:`DataError` naming the first row of ``dataset`` with a sequence longer than ``model``'s
    learned position table; nothing for a model without one, untokenized rows or a dataset that is not
    map-style (a stream). Rows are checked as the trainer prepared them (truncated, dropped, packed); a
    ``seq_lengths`` column (packed rows) gives the sequences' own lengths, since positions restart at each.

    ``completion_tokens``: for prompts that are sampled from (``prompt_input_ids`` alone), the most tokens a
    rollout appends (``completion_field`` names the setting), so that a prompt whose longest completion
    would run past the table is named before the first rollout rather than in the middle of one.
    """
    found = learned_position_table(model)
    if found is None or not hasattr(dataset, "select_columns") or not hasattr(dataset, "__len__"):
        return
    table_name, table = found
    positions = table.num_embeddings
    columns = dataset.column_names
    packed = "seq_lengths" in columns
    sequences = row_sequences(columns)
    if not (packed or sequences):
        return
    sampled_prompts = not packed and sequences == (("prompt_input_ids",),)
    wanted = ["seq_lengths"] if packed else sorted({name for sequence in sequences for name in sequence})
    for start, batch in _rows(dataset, wanted):
        for offset in range(len(batch[wanted[0]])):
            if sampled_prompts:
                prompt_length = len(batch["prompt_input_ids"][offset])
                if prompt_length + completion_tokens > positions:
                    raise _prompt_error(model, table_name, positions, prompt_length, completion_tokens,
                                        completion_field, source=source, row=start + offset)
                continue
            if packed:
                candidates = [("a sequence packed in this row", "seq_lengths", max(batch["seq_lengths"][offset], default=0))]
            else:
                # each sequence named by its last column: the completion of a pair, or input_ids
                candidates = [("the row" if len(sequences) == 1 else "a sequence of this pair", sequence[-1],
                         sum(len(batch[name][offset]) for name in sequence)) for sequence in sequences]
            for what, column, length in candidates:
                if length > positions:
                    raise DataError(
                        f"{what} is {length} tokens long; {_model_name(model)} has {positions} learned positions "
                        f"({table_name}) and cannot encode position {positions} or past it",
                        source=source, row=start + offset, column=column, expected=f"at most {positions} tokens",
                        found=str(length),
                        fix=f"set --max_length {positions} (longer rows are then truncated), or shorten or drop the row",
                    )


def _prompt_error(model: nn.Module, table_name: str, positions: int, prompt_length: int, completion_tokens: int,
                  completion_field: str, *, source: str, row: int) -> DataError:
    """The error for a prompt whose longest rollout would not fit the position table, with a fix that works."""
    fixes = []
    if completion_tokens < positions:
        fixes.append(f"set --max_prompt_length {positions - completion_tokens} (longer prompts then keep their end)")
    if prompt_length < positions:
        fixes.append(f"lower --{completion_field} to {positions - prompt_length}")
    fix = ", ".join(fixes + ["or drop the row"]) if fixes else "drop the row"
    return DataError(
        f"the prompt is {prompt_length} tokens long and a completion may add {completion_tokens} "
        f"({completion_field}); {_model_name(model)} has {positions} learned positions ({table_name}), so a rollout "
        f"from this prompt would run past them",
        source=source, row=row, column="prompt_input_ids", expected=f"prompt + {completion_field} <= {positions}",
        found=f"{prompt_length} + {completion_tokens} = {prompt_length + completion_tokens}", fix=fix,
    )
