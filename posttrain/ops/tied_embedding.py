"""An embedding lookup that shares its (V, d) gradient with the tied output head.

When a model ties its embeddings (``lm_head.weight is embed_tokens.weight``), a training step sends
two gradients to one (V, d) matrix: the chunked head's dense ``dL/dW`` and the lookup's. The
lookup's backward (``nn.Embedding``) builds a second dense (V, d) matrix, zeros with the looked-up
rows added in, and autograd holds both until it sums them: two copies of the largest tensor of a
big-vocabulary model at the backward's peak (148 MB each at V = 151,936, d = 256, float32).

Here the head's backward hands its gradient to the lookup of the same forward through a
:class:`TiedGradient`; the lookup's backward adds its rows into it and returns the sum as the
weight's one gradient. The head may hand over a function that makes its gradient instead of the
gradient itself: the lookup's backward runs after the decoder layers', so the (V, d) matrix is then
made once their saved activations are freed rather than beside them. The sum is the same float for float: the lookup's rows are first summed per
distinct token in the order ``nn.Embedding``'s backward sums them, then each is added once, as
autograd's ``dW_head + dW_lookup`` adds them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class TiedGradient:
    """The hand-off of one forward: the lookups made through it, and the head's gradient waiting for them.

    The head deposits its gradient only when a lookup of the same forward will take it: the lookup
    runs before the head in forward, so its backward runs after the head's.
    """

    def __init__(self) -> None:
        self.lookups = 0
        self.pending: torch.Tensor | Callable[[], torch.Tensor] | None = None

    def deposit(self, grad_weight: torch.Tensor | Callable[[], torch.Tensor]) -> bool:
        """Hold the head's (V, d) gradient, or a function that makes it, for a lookup's backward; False
        when no lookup will take it."""
        if self.lookups == 0 or self.pending is not None:
            return False
        self.pending = grad_weight
        return True

    def take(self) -> torch.Tensor | None:
        """The head's gradient (made now if it was deposited as a function), or None."""
        grad_weight, self.pending = self.pending, None
        return grad_weight() if callable(grad_weight) else grad_weight


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids, padding_idx, tied):
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]
        ctx.padding_idx = -1 if padding_idx is None else padding_idx
        ctx.tied = tied
        ctx.set_materialize_grads(False)
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_output):
        (ids,) = ctx.saved_tensors
        head_grad = ctx.tied.take()
        if grad_output is None:
            return head_grad, None, None, None
        if head_grad is None:  # the head left its gradient to autograd: nn.Embedding's own backward
            return torch.ops.aten.embedding_dense_backward(
                grad_output, ids, ctx.num_weights, ctx.padding_idx, False), None, None, None
        flat_ids = ids.reshape(-1)
        flat_grad = grad_output.reshape(flat_ids.numel(), grad_output.shape[-1])
        if ctx.padding_idx >= 0:  # the padding row gets no gradient from the lookup
            keep = flat_ids != ctx.padding_idx
            flat_ids, flat_grad = flat_ids[keep], flat_grad[keep]
        rows, inverse = torch.unique(flat_ids, return_inverse=True)
        # the per-token sums of nn.Embedding's backward, (U, d) instead of (V, d)
        row_sums = torch.ops.aten.embedding_dense_backward(flat_grad, inverse, rows.numel(), -1, False)
        return head_grad.index_add_(0, rows, row_sums.to(head_grad.dtype)), None, None, None


def tied_embedding(weight: torch.Tensor, ids: torch.Tensor, padding_idx: int | None,
                   tied: TiedGradient) -> torch.Tensor:
    """``weight[ids]`` ((..., ) -> (..., d)), as ``nn.Embedding(padding_idx=padding_idx)`` computes it, whose
    backward completes the head gradient that ``tied`` holds instead of building a second (V, d) one."""
    tied.lookups += 1
    return _TiedEmbedding.apply(weight, ids, padding_idx, tied)


@contextmanager
def tied_embedding_lookups(model: nn.Module | None) -> Iterator[TiedGradient | None]:
    """While it is open, the input-embedding lookups of ``model`` (a transformers model, unwrapped) go
    through :func:`tied_embedding` and share the yielded hand-off with the chunked head; ``None``
    (nothing changed) unless the weights are tied, trained, and both modules are plain ``nn.Embedding`` /
    ``nn.Linear`` layers in a graph-building forward (``model`` None: nothing changed either)."""
    get_input, get_output = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embeddings = get_input() if callable(get_input) else None
    head = get_output() if callable(get_output) else None
    if not (torch.is_grad_enabled() and type(embeddings) is nn.Embedding and type(head) is nn.Linear
            and head.weight is embeddings.weight and type(head.weight) is nn.Parameter and head.weight.requires_grad
            and embeddings.max_norm is None and not embeddings.scale_grad_by_freq and not embeddings.sparse
            and getattr(embeddings, "_compiled_call_impl", None) is None
            # DeepSpeed ZeRO-3 partitions the weight and reduces its gradient through its own hooks
            and not hasattr(head.weight, "ds_id")):
        yield None
        return
    tied = TiedGradient()

    def lookup(module, args, output):
        # the module's own output (and its graph) is dropped: the same rows, with a backward that completes
        # the head's gradient; a lookup without a graph (no_grad) has no backward to complete it
        if not args or not torch.is_grad_enabled():
            return output
        return tied_embedding(module.weight, args[0], module.padding_idx, tied)

    # first among the module's hooks, so that the others (NEFTune's noise, `enable_input_require_grads`)
    # see and change this lookup's output rather than the one it replaces
    handle = embeddings.register_forward_hook(lookup, prepend=True)
    try:
        yield tied
    finally:
        handle.remove()
