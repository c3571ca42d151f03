"""Turn lists of tokenized rows into batches of tensors.

Sequence boundaries without padding (measured with transformers 5.24, Qwen2, ``sdpa`` and
``eager``; see ``tests/data/test_collate.py``): given ``position_ids`` that restart at 0 and **no**
attention mask, transformers builds a block-diagonal causal mask from the position ids, so
tokens attend only within their own sequence and per-token log-probs equal those of a padded
batch. Two things silently break this, and both make sequences attend across boundaries:

- passing a 2-D ``attention_mask`` as well (the packing detection runs only when the mask is
  None), which is why the collators below send no attention mask with packed rows;
- a KV cache: the detection also runs only when there is no cache, and ``use_cache`` defaults
  to True in the model config, even in training mode. Every forward pass over packed or
  padding-free batches must pass ``use_cache=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from posttrain.errors import ConfigError, DataError

Row = dict[str, Any]


def _as_list(value: Any) -> list:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return list(value)


def _padded_length(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    length = max(lengths, default=0)
    if pad_to_multiple_of and length % pad_to_multiple_of:
        length += pad_to_multiple_of - length % pad_to_multiple_of
    return length


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    padding_value: int | float,
    *,
    side: str = "right",
    pad_to_multiple_of: int | None = None,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Stack variable-length sequences into one (B, L) tensor, padding on ``side``."""
    length = _padded_length([len(s) for s in sequences], pad_to_multiple_of)
    out = torch.full((len(sequences), length), padding_value, dtype=dtype)
    for row, sequence in enumerate(sequences):
        if len(sequence) == 0:
            continue
        values = torch.as_tensor(sequence, dtype=dtype)
        if side == "right":
            out[row, : len(sequence)] = values
        else:
            out[row, length - len(sequence) :] = values
    return out


def _require(rows: Sequence[Row], column: str, collator: str) -> None:
    if not rows:
        raise DataError(f"{collator} got an empty batch", fix="check the sampler and the dataset size")
    if column not in rows[0]:
        raise DataError(
            f"{collator} needs tokenized rows",
            expected=f"a '{column}' column",
            found=f"columns {sorted(rows[0])}",
            fix="tokenize the dataset with posttrain.data.tokenize first",
        )


class PaddingCollator:
    """Right-pad SFT rows into a batch.

    Returns ``input_ids`` (B, L) padded with ``pad_token_id``, ``attention_mask`` (B, L) and
    ``completion_mask`` (B, L) (all ones where a row has none; zero on padding).

    Rows that carry ``position_ids`` (packed rows) get them back, (B, L), and **no**
    ``attention_mask``: with one, transformers would let packed sequences attend to each other.
    Without one, right padding is harmless under causal attention (no real token follows a pad);
    padding positions are numbered 0, 1, ... as a sequence of their own.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ConfigError(
                "cannot pad batches: the tokenizer has no pad token",
                field="pad_token",
                fix="set tokenizer.pad_token (e.g. '<|endoftext|>', or its EOS token)",
            )
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        _require(rows, "input_ids", type(self).__name__)
        ids = [_as_list(r["input_ids"]) for r in rows]
        masks = [_as_list(r["completion_mask"]) if "completion_mask" in r else [1] * len(i) for r, i in zip(rows, ids)]
        batch = {
            "input_ids": pad_sequences(ids, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of),
            "completion_mask": pad_sequences(masks, 0, pad_to_multiple_of=self.pad_to_multiple_of),
        }
        if "position_ids" in rows[0]:
            length = batch["input_ids"].shape[1]
            positions = [
                _as_list(r["position_ids"]) + list(range(length - len(i))) for r, i in zip(rows, ids)
            ]
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        else:
            batch["attention_mask"] = pad_sequences(
                [[1] * len(i) for i in ids], 0, pad_to_multiple_of=self.pad_to_multiple_of
            )
        return batch


class PaddingFreeCollator:
    """Concatenate a batch's rows into one row, with no padding.

    Returns ``input_ids`` (1, N), ``position_ids`` (1, N) restarting at 0 at each sequence (a
    packed row's own ``position_ids`` are kept), ``completion_mask`` (1, N), and no attention mask.
    The model must be called with ``use_cache=False`` (see the module docstring).
    """

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        _require(rows, "input_ids", type(self).__name__)
        ids: list[int] = []
        positions: list[int] = []
        mask: list[int] = []
        for row in rows:
            row_ids = _as_list(row["input_ids"])
            ids += row_ids
            positions += _as_list(row["position_ids"]) if "position_ids" in row else list(range(len(row_ids)))
            mask += _as_list(row["completion_mask"]) if "completion_mask" in row else [1] * len(row_ids)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "completion_mask": torch.tensor([mask], dtype=torch.long),
        }


def _float_column(rows: Sequence[Row], column: str) -> torch.Tensor:
    return torch.tensor([float(r[column]) for r in rows], dtype=torch.float32)


class PreferenceCollator:
    """Batch preference pairs as one concatenated batch of 2B sequences.

    Rows 0..B-1 are prompt + chosen, rows B..2B-1 are prompt + rejected, right-padded:
    ``input_ids`` (2B, L), ``attention_mask`` (2B, L), ``completion_mask`` (2B, L) (1 on completion
    tokens). Also ``margin`` (B,) and precomputed ``ref_chosen_logps`` / ``ref_rejected_logps``
    (B,) as float32 when the rows have them.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        for column in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
            _require(rows, column, type(self).__name__)
        sequences, masks = [], []
        for side in ("chosen_input_ids", "rejected_input_ids"):
            for row in rows:
                prompt, completion = _as_list(row["prompt_input_ids"]), _as_list(row[side])
                sequences.append(prompt + completion)
                masks.append([0] * len(prompt) + [1] * len(completion))
        batch = {
            "input_ids": pad_sequences(sequences, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of),
            "attention_mask": pad_sequences([[1] * len(s) for s in sequences], 0, pad_to_multiple_of=self.pad_to_multiple_of),
            "completion_mask": pad_sequences(masks, 0, pad_to_multiple_of=self.pad_to_multiple_of),
        }
        for column in ("margin", "ref_chosen_logps", "ref_rejected_logps"):
            if column in rows[0]:
                batch[column] = _float_column(rows, column)
        return batch


class UnpairedPreferenceCollator:
    """Batch unpaired preference rows: ``input_ids`` (B, L) = prompt + completion, right-padded,
    ``attention_mask`` (B, L), ``completion_mask`` (B, L), ``label`` (B,) bool."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        for column in ("prompt_input_ids", "completion_input_ids", "label"):
            _require(rows, column, type(self).__name__)
        prompts = [_as_list(r["prompt_input_ids"]) for r in rows]
        completions = [_as_list(r["completion_input_ids"]) for r in rows]
        sequences = [p + c for p, c in zip(prompts, completions)]
        masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
        return {
            "input_ids": pad_sequences(sequences, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of),
            "attention_mask": pad_sequences([[1] * len(s) for s in sequences], 0, pad_to_multiple_of=self.pad_to_multiple_of),
            "completion_mask": pad_sequences(masks, 0, pad_to_multiple_of=self.pad_to_multiple_of),
            "label": torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool),
        }


class PromptCollator:
    """Batch prompts for generation: ``prompt_input_ids`` (B, P) left-padded (so every prompt ends
    where generation starts) and ``prompt_attention_mask`` (B, P). Every other column is passed
    through as a Python list, e.g. ``prompt`` and ``answer`` for reward functions."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Row]) -> dict[str, Any]:
        _require(rows, "prompt_input_ids", type(self).__name__)
        prompts = [_as_list(r["prompt_input_ids"]) for r in rows]
        batch: dict[str, Any] = {
            "prompt_input_ids": pad_sequences(
                prompts, self.pad_token_id, side="left", pad_to_multiple_of=self.pad_to_multiple_of
            ),
            "prompt_attention_mask": pad_sequences(
                [[1] * len(p) for p in prompts], 0, side="left", pad_to_multiple_of=self.pad_to_multiple_of
            ),
        }
        for column in rows[0]:
            if column != "prompt_input_ids":
                batch[column] = [r.get(column) for r in rows]
        return batch


def pad_rollout_to_multiple(rows: dict[str, Any], multiple: int, pad_token_id: int) -> dict[str, Any]:
    """Widen a rollout micro-batch so that its prompt and completion lengths are multiples of ``multiple``.

    ``prompt_ids``/``prompt_mask`` ``(B, P)`` are left-padded (prompts end where completions start);
    every ``(B, C)`` tensor aligned with ``completion_mask`` is right-padded: ids with ``pad_token_id``,
    anything else (masks, log-probs) with 0. The new positions are masked out, so every loss is
    unchanged; only the shapes become steadier (fewer recompilations on shape-specialising backends).
    """
    prompt_width = rows["prompt_ids"].shape[1]
    completion_width = rows["completion_mask"].shape[1]
    extra_prompt = _padded_length([prompt_width], multiple) - prompt_width
    extra_completion = _padded_length([completion_width], multiple) - completion_width
    padded = {}
    for name, value in rows.items():
        if not torch.is_tensor(value) or value.dim() != 2:
            padded[name] = value
        elif name in ("prompt_ids", "prompt_mask") and extra_prompt:
            fill = pad_token_id if name == "prompt_ids" else 0
            padded[name] = torch.nn.functional.pad(value, (extra_prompt, 0), value=fill)
        elif name not in ("prompt_ids", "prompt_mask") and value.shape[1] == completion_width and extra_completion:
            fill = pad_token_id if name == "completion_ids" else 0
            padded[name] = torch.nn.functional.pad(value, (0, extra_completion), value=fill)
        else:
            padded[name] = value
    return padded
