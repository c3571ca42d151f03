"""How a preference batch's 2B sequences go through the model: padded, padding-free, or one at a time.

The padded batch ``(2B, L)`` is the default layout. When its rows differ in length, transformers
builds a ``(2B, 1, L, L)`` boolean attention mask for SDPA (one byte per entry: 2 GB for two
32,768-token rows) and every padding token costs activations. Two ways around it:

* padding-free (:class:`PaddingFreePreferenceCollator`): one row of concatenated sequences told
  apart by their position ids. transformers then builds a ``(1, 1, N, N)`` mask over all N tokens
  for SDPA (it needs FlashAttention's variable-length kernel to build none), so on the SDPA path it
  holds more mask, not less.
* one sequence at a time (:func:`per_sequence_token_logps`): each sequence runs alone, unpadded, as
  a ``(1, n)`` batch with no attention mask, so SDPA applies its own causal mask (``is_causal``) and
  no ``T x T`` tensor exists; the backward also recomputes (with ``activation_offloading``) one
  sequence's layer at a time. The per-token values are put back in the padded ``(2B, L-1)`` layout.
"""

from __future__ import annotations

from typing import Callable

import torch

from posttrain.models.lm_head import TokenLogps

# rows at least this long run one sequence at a time when ``per_sequence_forward`` is left unset:
# there a (1, n) forward is as efficient as a batched one and the L x L mask is >= 4 MB per row
PER_SEQUENCE_MIN_LENGTH = 2048


def wants_per_sequence_forward(setting: bool | None, batch: dict[str, torch.Tensor]) -> bool:
    """Whether a padded preference batch runs one sequence at a time: ``setting`` when given, else
    rows of at least :data:`PER_SEQUENCE_MIN_LENGTH` tokens. Padding-free batches never do."""
    if "sequence_mask" in batch:
        return False
    if setting is not None:
        return setting
    return batch["input_ids"].shape[1] >= PER_SEQUENCE_MIN_LENGTH


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """(row index, its present-token mask (1, L)) for each row of a padded batch."""
    for row in range(input_ids.shape[0]):
        present = attention_mask[row : row + 1].bool() if attention_mask is not None else torch.ones_like(
            input_ids[row : row + 1], dtype=torch.bool)
        yield row, present


def per_sequence_values(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
    fill: float | bool = 0.0,
) -> torch.Tensor:
    """``score`` run on each row alone, its per-target values put back into the padded layout.

    ``score(input_ids (1, n), completion_mask (1, n))`` returns ``(1, n-1)`` values aligned with
    ``input_ids[:, 1:]`` for the row's n present tokens; the result is ``(R, L-1)`` like a padded
    forward's, with ``fill`` on padding and on the first token of each row.
    """
    rows = []
    for row, present in _rows(input_ids, attention_mask):
        values = score(input_ids[row : row + 1][present].unsqueeze(0),
                       completion_mask[row : row + 1][present].unsqueeze(0))
        rows.append(rows_from_flat(values, present.long(), fill))
    return torch.cat(rows)


def per_sequence_token_logps(
    score: Callable[[torch.Tensor, torch.Tensor], TokenLogps],
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> TokenLogps:
    """:class:`TokenLogps` of a padded batch ``(R, L)`` from ``score`` run on each row alone.

    ``score(input_ids (1, n), completion_mask (1, n))`` is e.g. :func:`~posttrain.models.lm_head.token_logps`
    with no attention mask; the fields come back ``(R, L-1)`` as the padded forward gives them. The
    router loss of a Mixture-of-Experts model is not additive over rows, so callers keep such models
    on the batched path.
    """
    fields: dict[str, list[torch.Tensor]] = {"logps": [], "mask": [], "entropy": [], "argmax_match": []}
    fills = {"logps": 0.0, "mask": False, "entropy": 0.0, "argmax_match": False}
    for row, present in _rows(input_ids, attention_mask):
        values = score(input_ids[row : row + 1][present].unsqueeze(0), completion_mask[row : row + 1][present].unsqueeze(0))
        for name in fields:
            fields[name].append(rows_from_flat(getattr(values, name), present.long(), fills[name]))
    return TokenLogps(**{name: torch.cat(parts) for name, parts in fields.items()})


class PaddingFreePreferenceCollator:
    """The 2B sequences of a preference batch concatenated into one row, with no padding.

    Returns ``input_ids``, ``completion_mask``, ``position_ids`` (restarting at 0 at each sequence),
    all (1, N), and ``sequence_mask`` (2B, L): where each token sits in the padded layout, so
    per-token results can be put back into rows (:func:`rows_from_flat`). No attention mask: the
    model separates the sequences by their position ids (needs ``use_cache=False``, which
    :func:`~posttrain.models.lm_head.forward_hidden_states` passes).
    """

    def __init__(self, padded) -> None:
        self.padded = padded

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        batch = self.padded(rows)
        present = batch.pop("attention_mask").bool()
        lengths = present.sum(-1).tolist()
        batch["input_ids"] = batch["input_ids"][present].unsqueeze(0)
        batch["completion_mask"] = batch["completion_mask"][present].unsqueeze(0)
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        batch["sequence_mask"] = present.long()
        return batch


def rows_from_flat(values: torch.Tensor, sequence_mask: torch.Tensor, fill: float | bool) -> torch.Tensor:
    """Per-token values of a padding-free row, (1, N-1) aligned with ``input_ids[:, 1:]``, put back
    into the padded layout (R, L-1) given by ``sequence_mask`` (R, L); padding gets ``fill``.

    Token 0 of the row is never a target, so it gets ``fill`` too.
    """
    per_token = torch.cat([values.new_full((1,), fill), values[0]])
    rows = values.new_full(sequence_mask.shape, fill).masked_scatter(sequence_mask.bool(), per_token)
    return rows[:, 1:]
