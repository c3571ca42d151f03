"""Attention over packed rows without a (tokens x tokens) mask.

A padding-free or packed batch is one row holding several sequences whose position ids restart at
0. With PyTorch's SDPA (transformers' default attention) transformers keeps each sequence to itself
by building a ``(1, 1, T, T)`` boolean mask: one byte per pair of tokens in the row (1 GB for a
32,768-token row, 16 GB at 131,072), and SDPA then computes every block of the ``T x T`` scores,
the masked-out ones included.

:data:`PACKED_SDPA` is an attention implementation registered with transformers that is SDPA
everywhere except on such a row: its mask function recognises the packed layout and hands the
attention layers the sequences' bounds (:class:`PackedSequences`) instead of a mask, and its
attention function runs transformers' own SDPA attention on each sequence alone (causal, no mask).
No ``T x T`` tensor exists and the work is the sum of the sequences' squared lengths rather than
the row's. Any other batch (padded, with a KV cache, sliding windows, one sequence) gets exactly
transformers' SDPA mask and attention.

The packed layout is read from the mask transformers composes (its packed-sequence, causal and any
other parts), evaluated at a few index pairs per sequence, so the check does not depend on how a
model passes position ids: a token attends to the one before it exactly when both are in one
sequence, the last token of a sequence sees its first, and nothing sees a later token or an earlier
sequence. A mask that fails any of these gets the full mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PACKED_SDPA = "posttrain_packed_sdpa"


@dataclass(frozen=True)
class PackedSequences:
    """Stands in for the attention mask of one packed row: ``(start, stop)`` of each sequence, in order."""

    bounds: tuple[tuple[int, int], ...]


def _is_causal_packing(mask_function, starts: list[int], length: int, device) -> bool:
    stops = starts[1:] + [length]
    zero = torch.zeros((), dtype=torch.long, device=device)
    first = torch.tensor(starts, device=device)
    last = torch.tensor(stops, device=device) - 1
    sees_first = mask_function(zero, zero, last, first)
    first_sees_last = mask_function(zero, zero, first, last)
    longer = last > first
    # the previous sequence's first token, for every sequence after the first
    sees_earlier = (mask_function(zero, zero, last[1:], first[:-1]) if len(starts) > 1
                    else torch.zeros(0, dtype=torch.bool))
    return bool(sees_first.all()) and not bool((first_sees_last & longer).any()) and not bool(sees_earlier.any())


def packed_sequence_bounds(mask_kwargs: dict) -> PackedSequences | None:
    """The sequences of a packed row described by the keyword arguments of a mask-interface call, or None."""
    if mask_kwargs.get("attention_mask") is not None or mask_kwargs.get("local_size") is not None:
        return None
    batch_size, q_length, kv_length = (mask_kwargs.get(name) for name in ("batch_size", "q_length", "kv_length"))
    mask_function = mask_kwargs.get("mask_function")
    offsets = (mask_kwargs.get("q_offset", 0), mask_kwargs.get("kv_offset", 0))
    if batch_size != 1 or mask_function is None or not isinstance(q_length, int) or q_length != kv_length:
        return None
    if q_length < 2 or any(not isinstance(offset, int) or offset != 0 for offset in offsets):
        return None
    if torch.compiler.is_compiling():
        return None  # the layout is read with data-dependent control flow
    device = mask_kwargs.get("device", "cpu")
    zero = torch.zeros((), dtype=torch.long, device=device)
    later = torch.arange(1, q_length, device=device)
    try:
        with torch.no_grad():
            continues = mask_function(zero, zero, later, later - 1)
            if not torch.is_tensor(continues) or continues.shape != later.shape or bool(continues.all()):
                return None  # one sequence: SDPA's own causal path needs no mask anyway
            starts = [0] + (torch.nonzero(~continues).flatten() + 1).tolist()
            if not _is_causal_packing(mask_function, starts, q_length, device):
                return None
    except (IndexError, RuntimeError, TypeError):
        return None  # a mask function that only works under vmap: transformers builds the mask as usual
    stops = starts[1:] + [q_length]
    return PackedSequences(tuple(zip(starts, stops)))


def packed_sdpa_mask(*args, **kwargs):
    """Mask interface of :data:`PACKED_SDPA`: the bounds of a packed row, otherwise transformers' SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    packed = None if args else packed_sequence_bounds(kwargs)
    return packed if packed is not None else sdpa_mask(*args, **kwargs)


def packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask, *args, **kwargs):
    """Attention interface of :data:`PACKED_SDPA`: transformers' SDPA attention, per sequence on a packed row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, PackedSequences):
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    if query.shape[-2] != attention_mask.bounds[-1][1] or key.shape[-2] != query.shape[-2]:
        raise RuntimeError(f"packed attention: {query.shape[-2]} queries and {key.shape[-2]} keys for a packed row "
                           f"of {attention_mask.bounds[-1][1]} tokens")
    kwargs.pop("is_causal", None)
    outputs = [
        sdpa_attention_forward(module, query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop], None,
                               *args, is_causal=True, **kwargs)[0]
        for start, stop in attention_mask.bounds
    ]
    return torch.cat(outputs, dim=1), None


PADDING_FREE_MIN_LENGTH = 2048
"""Padded batches at least this wide are run padding-free: below it, one SDPA call per row costs more than the mask."""


def padded_batch_as_packed_row(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                               position_ids: torch.Tensor | None):
    """A padded batch ``(B, L)`` as one packed row, for a model that attends with :data:`PACKED_SDPA`.

    Returns ``(input_ids (1, n), position_ids (1, n), attended (B, L) bool)``: the row holds the attended tokens
    in order (``input_ids[attended]``), each sequence's positions counting from 0. ``None`` where the batch is
    narrower than :data:`PADDING_FREE_MIN_LENGTH`, has no padding, a row with a hole, an empty row or positions
    that do not count from 0 at its first token, or the model attends otherwise. Each row then attends to itself
    alone, with no ``(B, 1, L, L)`` mask and no compute on padding.
    """
    if attention_mask is None or input_ids.dim() != 2 or input_ids.shape[1] < PADDING_FREE_MIN_LENGTH:
        return None
    from posttrain.models.lm_head import unwrap_model  # which imports this module

    if getattr(getattr(unwrap_model(model), "config", None), "_attn_implementation", None) != PACKED_SDPA:
        return None
    if getattr(model, "_is_prompt_learning", False) or bool(attention_mask.all()):
        return None
    attended = attention_mask.bool()
    lengths = attended.sum(1)
    first = attended.int().argmax(1)
    columns = torch.arange(attended.shape[1], device=attended.device)
    within = columns[None] - first[:, None]
    if bool((lengths == 0).any()) or not torch.equal((within >= 0) & (within < lengths[:, None]), attended):
        return None
    if position_ids is not None and not torch.equal(position_ids.expand_as(attended)[attended], within[attended]):
        return None
    return input_ids[attended][None], within[attended][None], attended


def padding_free_layout(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None, selected: torch.Tensor):
    """:func:`padded_batch_as_packed_row` for scoring the positions of ``selected`` ``(B, L - 1)``.

    Returns ``(input_ids (1, n), position_ids (1, n), index)`` where ``index`` gives, for each position of
    ``selected`` in order, its place in the packed row; ``None`` where the batch does not pack (see there) or
    a selected position is on padding.
    """
    packed = padded_batch_as_packed_row(model, input_ids, attention_mask, position_ids)
    if packed is None:
        return None
    packed_ids, packed_positions, attended = packed
    if not bool(attended[:, :-1][selected].all()):
        return None
    place = attended.flatten().cumsum(0).view_as(attended) - 1
    return packed_ids, packed_positions, place[:, :-1][selected]


def register_packed_sdpa() -> None:
    """Make :data:`PACKED_SDPA` known to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def use_packed_attention(*models: nn.Module | None) -> list[bool]:
    """Switch each model that attends with SDPA to :data:`PACKED_SDPA` (in place); per model, whether it now does.

    ``None`` entries are skipped (False). Models on another implementation (eager, flash attention, flex)
    keep it: flash attention already reads packed rows from their position ids without a mask.
    """
    from posttrain.models.lm_head import unwrap_model  # which imports this module

    switched = []
    for model in models:
        base = unwrap_model(model) if model is not None else None
        current = getattr(getattr(base, "config", None), "_attn_implementation", None)
        if current == "sdpa" and hasattr(base, "set_attn_implementation"):
            register_packed_sdpa()
            base.set_attn_implementation(PACKED_SDPA)
            current = PACKED_SDPA
        switched.append(current == PACKED_SDPA)
    return switched
