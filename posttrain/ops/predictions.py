"""Next-token predictions for evaluation metrics, from final hidden states.

``compute_metrics`` usually wants the model's most likely next token at each position, not its
logits: the argmax of ``h @ W.T`` is computed here a chunk of rows at a time, so an evaluation batch
never holds its full (N, V) logits. :func:`head_logits` is for the one case that needs them, a
user's ``preprocess_logits_for_metrics``.
"""

from __future__ import annotations

import torch

from posttrain.ops.logprobs import DEFAULT_CHUNK_SIZE, HeadTransform, _chunk_logits


@torch.no_grad()
def chunked_argmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    head: HeadTransform = HeadTransform(),
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``argmax_v logits[i, v]`` for hidden states ``hidden`` (N, d) and head ``weight`` (V, d): (N,) long.

    Peak extra memory is one (chunk_size, V) float32 block of logits.
    """
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    out = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        logits, _ = _chunk_logits(hidden[start : start + chunk_size], weight, bias, head)
        out[start : start + chunk_size] = logits.argmax(dim=-1)
    return out


@torch.no_grad()
def head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, head: HeadTransform = HeadTransform()
) -> torch.Tensor:
    """The full float32 logits ``(..., V)`` of hidden states ``(..., d)``, as the model's forward gives them."""
    logits, _ = _chunk_logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias, head)
    return logits.clone().reshape(*hidden.shape[:-1], weight.shape[0])  # the chunk buffer is reused: copy it out
