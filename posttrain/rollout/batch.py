"""The result of a rollout, and the padding helpers the engines share."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from posttrain.errors import ConfigError, DataError


@dataclass
class RolloutBatch:
    """Completions sampled for a batch of prompts, ``group_size`` per prompt.

    ``N = num_prompts * group_size`` rows, ordered prompt-major: rows ``g*G .. g*G+G-1`` all come
    from prompt ``g``. Tensors live on the device the engine generated on.

    Attributes:
        prompt_ids: ``(N, P)`` long, left-padded with the pad token.
        prompt_mask: ``(N, P)`` long, 1 on real prompt tokens.
        completion_ids: ``(N, C)`` long, right-padded with the pad token; ``C`` is the longest
            completion in the batch (at most ``max_completion_length``).
        completion_mask: ``(N, C)`` long, 1 on generated tokens up to and including the EOS token or
            the last token of a stop string, 0 after.
        is_truncated: ``(N,)`` bool, True when the row hit ``max_completion_length`` without EOS or a stop string.
        prompt_index: ``(N,)`` long, which input prompt each row came from.
        group_size: completions per prompt (``num_generations``).
        sampler_logps: ``(N, C)`` float32 or None: the sampler's log-prob of each generated token under the
            distribution it drew from (after temperature, top-k/top-p/min-p), 0 on padding; NaN where the
            sampler gave none. Only engines asked for them fill it in.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    is_truncated: torch.Tensor
    prompt_index: torch.Tensor
    group_size: int
    sampler_logps: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_prompts(self) -> int:
        return self.num_rows // self.group_size

    @property
    def completion_lengths(self) -> torch.Tensor:
        """``(N,)`` long: generated tokens per row (EOS / stop tokens included)."""
        return self.completion_mask.sum(dim=1)

    @property
    def prompt_completion_ids(self) -> torch.Tensor:
        """``(N, P + C)``: prompt and completion side by side, the input of a log-prob forward pass."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def prompt_completion_mask(self) -> torch.Tensor:
        """``(N, P + C)``: the attention mask matching :attr:`prompt_completion_ids`."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def completion_token_lists(self) -> list[list[int]]:
        """The generated tokens of each row as plain lists (mask applied), as reward functions receive them."""
        lengths = self.completion_lengths.tolist()
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), lengths)]

    def decode_completions(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row's generated tokens (mask applied) to text."""
        return tokenizer.batch_decode(self.completion_token_lists(), skip_special_tokens=skip_special_tokens)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """A copy with every tensor moved to ``device``."""
        moved = {
            f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name))
            for f in fields(self)
        }
        return RolloutBatch(**moved)


def normalize_prompts(
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
    pad_token_id: int,
    prompt_mask: torch.Tensor | None = None,
) -> list[list[int]]:
    """Turn the accepted prompt forms into a list of token-id lists without padding.

    Accepted: a list of lists of ints; a 1-D tensor (one prompt); a 2-D tensor, with ``prompt_mask``
    (1 = real token) or, without one, leading ``pad_token_id`` tokens are taken as left padding.
    """
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids.unsqueeze(0)
            prompt_mask = None if prompt_mask is None else prompt_mask.reshape(1, -1)
        if prompt_ids.dim() != 2:
            raise DataError(
                "prompt_ids must be a 1-D or 2-D tensor of token ids",
                column="prompt_ids",
                expected="shape (num_prompts, prompt_length)",
                found=f"shape {tuple(prompt_ids.shape)}",
            )
        rows = prompt_ids.tolist()
        if prompt_mask is not None:
            masks = prompt_mask.tolist()
            prompts = [[t for t, m in zip(row, mask) if m] for row, mask in zip(rows, masks)]
        else:
            prompts = []
            for row in rows:
                start = 0
                while start < len(row) and row[start] == pad_token_id:
                    start += 1
                prompts.append(row[start:])
    else:
        prompts = []
        for index, row in enumerate(prompt_ids):
            if isinstance(row, torch.Tensor):
                row = row.tolist()
            if isinstance(row, (str, bytes)) or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in row):
                raise DataError(
                    "a prompt must be a list of token ids",
                    row=index,
                    column="prompt_ids",
                    expected="list[int]",
                    found=row,
                    fix="tokenize prompts first, e.g. tokenizer(text)['input_ids']",
                )
            prompts.append([int(t) for t in row])
    if not prompts:
        raise DataError("no prompts to generate from", column="prompt_ids", expected="at least one prompt", found="[]")
    for index, row in enumerate(prompts):
        if not row:
            raise DataError(
                "a prompt is empty; a causal model needs at least one token to continue from",
                row=index,
                column="prompt_ids",
                fix="drop empty prompts or give the model a start token",
            )
    return prompts


def left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to a ``(B, P)`` ids tensor and its ``(B, P)`` 0/1 mask."""
    width = max(len(row) for row in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, row in enumerate(prompts):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: list[list[int]], pad_token_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to a ``(B, C)`` ids tensor and its ``(B, C)`` 0/1 mask (``C >= 1``)."""
    width = max([len(row) for row in rows] + [1])
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def check_num_generations(num_generations: int) -> None:
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ConfigError(
            f"num_generations must be a positive integer, got {num_generations!r}",
            field="num_generations",
            fix="ask for at least one completion per prompt",
        )
