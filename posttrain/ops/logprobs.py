"""Token log-probabilities straight from final hidden states, without full-vocabulary logits.

A causal LM's head maps hidden states ``h`` (N, d) to logits ``h @ W.T`` (N, V). With real
vocabularies (V = 150k) the logits of one batch take gigabytes in float32, and a naive
``log_softmax`` keeps two or three such tensors alive for backward. The functions here go
through the rows in chunks, keep only per-row scalars (the log-sum-exp), and rebuild each chunk's
logits in backward. Peak extra memory is one chunk of logits, whatever the batch.

Two entry points:

* :func:`chunked_token_logps` -- per-token log p(target), differentiable, for losses that are not
  a plain weighted sum of log-probs (DPO, policy gradients). Backward recomputes each chunk.
* :func:`fused_linear_nll` -- the weighted negative log-likelihood ``sum_i w_i * -log p(t_i)``
  (SFT). Since the weights are known in forward, the gradients are computed there too, chunk by
  chunk, and backward only rescales them: three matrix products instead of four.

Both work in float32 internally whatever the input dtype, and apply the head's optional output
scale, logit soft-capping and sampling temperature, so that they match ``model(...).logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from posttrain.ops.host_memory import before_large_host_allocation
from posttrain.ops.tied_embedding import TiedGradient

DEFAULT_CHUNK_SIZE = 1024
DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class HeadTransform:
    """What a model does to ``h @ W.T + b`` before the softmax.

    ``logits = softcap * tanh(scale * z / softcap) / temperature`` with ``z = h @ W.T + b``; a
    ``softcap`` of ``None`` skips the tanh. ``float32_matmul``: a half-precision ``h`` and ``W`` are
    cast to float32 before the product, so ``z`` is not rounded to half precision (TRL's
    ``cast_lm_head_to_fp32``, ScaleRL); the parameters themselves keep their dtype.
    """

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0
    float32_matmul: bool = False


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 inputs; float64 stays float64 (for exact checks)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_workspaces: dict[tuple[torch.device, torch.dtype, str], torch.Tensor] = {}


def _workspace(rows: int, cols: int, device: torch.device, dtype: torch.dtype, purpose: str = "logits") -> torch.Tensor:
    """A reusable (rows, cols) buffer for one chunk of logits (or another per-chunk temporary, by ``purpose``).

    On the CPU, allocating a fresh chunk for every chunk of every step makes the allocator map and
    fault in hundreds of megabytes each time; one buffer kept per device, dtype and purpose costs that
    once. (Freed blocks of a few megabytes are worse still: glibc raises its mmap threshold to their
    size and keeps later ones in its heap, which grows by fragments and is not returned.)
    Accelerators' caching allocators already recycle freed blocks, and a buffer kept alive there
    would only add its size to the peak at the optimizer step, so they get a fresh tensor.
    """
    if torch.device(device).type != "cpu":
        return torch.empty(rows, cols, device=device, dtype=dtype)
    key = (torch.device(device), dtype, purpose)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < rows * cols:
        _workspaces.pop(key, None)
        buffer = torch.empty(rows * cols, device=device, dtype=dtype)
        _workspaces[key] = buffer
    return buffer[: rows * cols].view(rows, cols)


def release_workspaces() -> None:
    """Free the cached logit buffers (they are rebuilt on the next call)."""
    _workspaces.clear()


def auto_chunk_size(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one float32 chunk of logits takes about ``budget_bytes``."""
    return max(64, min(16384, budget_bytes // (4 * max(1, vocab_size))))


SLICE_BYTES = 16 * 2**20


def slice_width(rows: int, vocab_size: int, budget_bytes: int | None = None) -> int:
    """Vocabulary columns per block of :func:`chunked_token_logps`: ``rows`` x width float32 logits take about
    ``budget_bytes`` (default :data:`SLICE_BYTES`; at least 512 columns, at most the vocabulary)."""
    budget = SLICE_BYTES if budget_bytes is None else budget_bytes
    return min(vocab_size, max(512, budget // (4 * max(1, rows))))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, head: HeadTransform):
    """Logits of one chunk in float32 (a view of the shared workspace), and d(logits)/d(z) when
    soft-capping makes it non-constant. The result is overwritten by the next chunk."""
    if head.float32_matmul and hidden.dtype in (torch.float16, torch.bfloat16):
        hidden = hidden.float()
    if weight.dtype != hidden.dtype:
        # under autocast the forward saw a down-cast weight; backward runs outside autocast
        weight = weight.to(hidden.dtype)
    acc = _accumulation_dtype(hidden)
    if hidden.dtype == acc:
        z = torch.matmul(hidden, weight.t(), out=_workspace(hidden.shape[0], weight.shape[0], hidden.device, acc))
    else:
        z = (hidden @ weight.t()).to(acc)
    if bias is not None:
        z.add_(bias)
    if head.scale != 1.0:
        z.mul_(head.scale)
    tanh_grad = None
    if head.softcap is not None:
        t = torch.tanh(z / head.softcap)
        z.copy_(t).mul_(head.softcap)
        tanh_grad = 1.0 - t * t
    if head.temperature != 1.0:
        z.div_(head.temperature)
    return z, tanh_grad


ENTROPY_ROW_BLOCK = 32


def _exp_in_place(logits: torch.Tensor, with_entropy: bool = False):
    """Turn ``logits`` into ``exp(logits - rowmax)`` in place.

    Returns (log-sum-exp, argmax, row sums, entropy or None). With ``e = exp(z - max)`` and
    ``S = sum(e)``, the entropy is ``log S - sum(e * (z - max)) / S``: see :func:`_exp_in_place_parts`.
    """
    row_max, argmax = logits.max(dim=-1)
    row_sum, weighted = _exp_in_place_parts(logits, row_max, with_entropy)
    log_sum = row_sum.log()
    entropy = log_sum - weighted / row_sum if with_entropy else None
    return row_max + log_sum, argmax, row_sum, entropy


def _exp_in_place_parts(logits: torch.Tensor, shift: torch.Tensor, with_entropy: bool):
    """Turn ``logits`` (R, V') into ``e = exp(logits - shift)`` in place, ``shift`` (R,).

    Returns (``sum(e)``, ``sum(e * (logits - shift))`` or None). The second needs the shifted logits
    and their exponentials at once, so those rows are exponentiated a small block at a time into a
    kept buffer and copied back (no extra full-size buffer, no second exp pass).
    """
    logits.sub_(shift[:, None])
    weighted = None
    if with_entropy:
        weighted = logits.new_empty(logits.shape[0])
        for start in range(0, logits.shape[0], ENTROPY_ROW_BLOCK):
            shifted = logits[start : start + ENTROPY_ROW_BLOCK]
            exps = torch.exp(shifted, out=_workspace(*shifted.shape, logits.device, logits.dtype, "entropy"))
            weighted[start : start + ENTROPY_ROW_BLOCK] = (exps.unsqueeze(1) @ shifted.unsqueeze(2)).reshape(-1)
            shifted.copy_(exps)
    else:
        logits.exp_()
    return logits.sum(dim=-1), weighted


class SoftmaxStats(NamedTuple):
    """Per-row statistics of the softmax over the whole vocabulary, (R,) each unless noted."""

    lse: torch.Tensor
    target_logits: torch.Tensor
    argmax: torch.Tensor
    entropy: torch.Tensor | None
    # with_expected only: (R, d) sum_v p_v s_v W_v and (R,) s_t at the target, s_v = d logits_v / d z_v
    expected_row: torch.Tensor | None = None
    target_slope: torch.Tensor | None = None


def _sliced_softmax_stats(hidden, weight, bias, targets, head: HeadTransform, with_entropy: bool,
                          with_expected: bool = False) -> SoftmaxStats:
    """Log-sum-exp, target logit, argmax and entropy (or None) of the rows ``hidden`` (R, d) over the whole
    vocabulary, computed a slice of ``weight`` at a time (:func:`slice_width` columns) with a running max
    (the online softmax of Milakov and Gimelshein, 2018): the logits held at once are one (R, width) block.

    Per slice, ``e = exp(z - m_s)`` with the slice's max ``m_s``; the running ``S = sum e`` and
    ``A = sum e * (z - m)`` are carried to a new max ``m'`` by ``S <- S exp(m - m')`` and
    ``A <- (A + S (m - m')) exp(m - m')``. Then ``lse = m + log S`` and ``H = log S - A / S``; with one
    slice this is exactly :func:`_exp_in_place`.

    ``with_expected`` also carries ``E = sum e * s * W`` (R, d) like ``S``, with ``s`` the slope of the
    head's transform at each logit, and returns ``E / S``: what ``d log p(t) / d h = s_t W_t - E / S``
    needs, so that the backward can make that gradient without rebuilding the logits.
    """
    vocab = weight.shape[0]
    width = slice_width(hidden.shape[0], vocab)
    running = None
    target_logits = None
    target_slope = None
    for first in range(0, vocab, width):
        last = min(first + width, vocab)
        logits, tanh_grad = _chunk_logits(hidden, weight[first:last], bias[first:last] if bias is not None else None, head)
        if width >= vocab:
            target_logits = logits.gather(1, targets[:, None]).squeeze(1)
            if with_expected and tanh_grad is not None:
                target_slope = tanh_grad.gather(1, targets[:, None]).squeeze(1)
        else:
            if target_logits is None:
                target_logits = logits.new_zeros(hidden.shape[0])
                if with_expected and tanh_grad is not None:
                    target_slope = logits.new_zeros(hidden.shape[0])
            in_slice = ((targets >= first) & (targets < last)).nonzero().squeeze(1)
            target_logits[in_slice] = logits[in_slice, targets[in_slice] - first]
            if target_slope is not None:
                target_slope[in_slice] = tanh_grad[in_slice, targets[in_slice] - first]
        slice_max, argmax = logits.max(dim=-1)
        # a slice whose logits are all -inf contributes exp(-inf) = 0 rather than NaN
        shift = slice_max.nan_to_num(nan=float("nan"), posinf=float("inf"), neginf=0.0)
        slice_sum, weighted = _exp_in_place_parts(logits, shift, with_entropy)
        expected = None
        if with_expected:  # logits now holds e
            sloped = logits if tanh_grad is None else tanh_grad.mul_(logits)
            # a gradient's product: in float32 even under autocast, as the backward's would be
            with torch.autocast(logits.device.type, enabled=False):
                expected = sloped @ weight[first:last].to(logits.dtype)
        if running is None:
            running = [slice_max, argmax, slice_sum, weighted, expected]
            continue
        row_max, best, row_sum, weighted_sum, expected_sum = running
        new_max = torch.maximum(row_max, slice_max)
        old_scale = (row_max - new_max).exp().nan_to_num(nan=0.0)
        # from the slice's own max: a slice of -inf logits (shift 0, sum 0) gets scale 0, never inf
        new_scale = (slice_max - new_max).exp().nan_to_num(nan=0.0)
        if with_entropy:
            weighted_sum = torch.where(row_sum > 0, old_scale * (weighted_sum + row_sum * (row_max - new_max)), 0.0)
            carried = new_scale * (weighted + slice_sum * (shift - new_max))
            weighted_sum = weighted_sum + torch.where(slice_sum > 0, carried, 0.0)
        if with_expected:
            expected_sum = expected_sum.mul_(old_scale[:, None]).add_(expected * new_scale[:, None])
        row_sum = row_sum * old_scale + slice_sum * new_scale
        best = torch.where(slice_max > row_max, argmax + first, best)
        running = [new_max, best, row_sum, weighted_sum, expected_sum]
    row_max, argmax, row_sum, weighted_sum, expected_sum = running
    log_sum = row_sum.log()
    entropy = log_sum - weighted_sum / row_sum if with_entropy else None
    stats = SoftmaxStats(row_max + log_sum, target_logits, argmax, entropy)
    if not with_expected:
        return stats
    # the transform's constant factor: logits = softcap * tanh(scale * z / softcap) / temperature
    slope = head.scale / head.temperature
    expected_row = expected_sum.div_(row_sum[:, None]).mul_(slope)
    if target_slope is None:
        target_slope = torch.full_like(row_sum, slope)
    else:
        target_slope = target_slope.mul_(slope)
    return stats._replace(expected_row=expected_row, target_slope=target_slope)


def _logits_grad_to_z(grad_logits: torch.Tensor, tanh_grad: torch.Tensor | None, head: HeadTransform) -> torch.Tensor:
    """Chain rule from d(loss)/d(logits) back to d(loss)/d(h @ W.T + b)."""
    scale = head.scale / head.temperature
    if tanh_grad is not None:
        grad_logits = grad_logits * tanh_grad
    if scale != 1.0:
        grad_logits = grad_logits * scale
    return grad_logits


def _accumulate_param_grads(grad_z, hidden_chunk, weight, bias, grad_weight, grad_bias, need_weight, need_bias):
    if need_weight:
        grad_weight.addmm_(grad_z.t(), hidden_chunk.to(grad_weight.dtype))
    if need_bias:
        grad_bias.add_(grad_z.sum(0))


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, head, with_entropy, tied):
        n = hidden.shape[0]
        acc = _accumulation_dtype(hidden)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # a tied weight's head gradient can wait for the lookup's backward (see backward); the
        # gradient of ``hidden`` is then made from E = sum_v p_v s_v W_v, carried here at the cost of
        # the product that the backward no longer makes
        defer = tied is not None and tied.lookups > 0 and need_hidden and need_weight and not need_bias
        logps = hidden.new_empty(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        entropy = hidden.new_empty(n, dtype=acc)
        argmax_match = torch.empty(n, dtype=torch.bool, device=hidden.device)
        expected_rows = hidden.new_empty(n, hidden.shape[1], dtype=acc) if defer else None
        target_slopes = hidden.new_empty(n, dtype=acc) if defer else None
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            stats = _sliced_softmax_stats(hidden[start:stop], weight, bias, targets[start:stop], head, with_entropy,
                                          with_expected=defer)
            if with_entropy:
                entropy[start:stop] = stats.entropy
            logps[start:stop] = stats.target_logits - stats.lse
            lse[start:stop] = stats.lse
            argmax_match[start:stop] = stats.argmax == targets[start:stop]
            if defer:
                expected_rows[start:stop] = stats.expected_row
                target_slopes[start:stop] = stats.target_slope
        if not with_entropy:
            entropy.fill_(float("nan"))
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if with_entropy else None,
                              expected_rows, target_slopes)
        ctx.chunk_size = chunk_size
        ctx.head = head
        ctx.tied = tied
        ctx.mark_non_differentiable(argmax_match)
        # an output no loss uses gets no gradient (None), so logging the entropy costs nothing in backward
        ctx.set_materialize_grads(False)
        return logps, entropy, argmax_match

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, _grad_match):
        hidden, weight, bias, targets, lse, entropy, expected_rows, target_slopes = ctx.saved_tensors
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None, None, None, None, None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = _accumulation_dtype(hidden)
        grad_logps = torch.zeros_like(lse) if grad_logps is None else grad_logps.to(acc)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(acc)
        pass_inputs = _HeadBackwardInputs(hidden, weight, bias, targets, lse, entropy, grad_logps, grad_entropy,
                                          ctx.head, ctx.chunk_size)
        tied = ctx.tied
        if expected_rows is not None and grad_entropy is None:
            # d log p(t) / d h = s_t W_t - sum_v p_v s_v W_v, from the forward's E: no logits rebuilt here
            grad_hidden = grad_logps[:, None] * (target_slopes[:, None] * weight[targets].to(acc) - expected_rows)

            def make_weight_gradient() -> torch.Tensor:
                # by the lookup's backward the layers' activations are freed: hand their pages back first
                before_large_host_allocation(weight.numel() * torch.finfo(acc).bits // 8, weight.device)
                return _head_backward(pass_inputs, want_hidden=False, want_weight=True)[1].to(weight.dtype)

            grad_weight = None if tied.deposit(make_weight_gradient) else make_weight_gradient()
            return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None, None, None
        grad_hidden, grad_weight, grad_bias = _head_backward(pass_inputs, need_hidden, need_weight, need_bias)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
            # a tied input embedding's lookup adds its rows into this one and returns the sum
            if tied is not None and need_hidden and tied.deposit(grad_weight):
                grad_weight = None
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


class _HeadBackwardInputs(NamedTuple):
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    grad_logps: torch.Tensor
    grad_entropy: torch.Tensor | None
    head: HeadTransform
    chunk_size: int


def _head_backward(inputs: _HeadBackwardInputs, want_hidden: bool = False, want_weight: bool = False,
                   want_bias: bool = False):
    """The gradients of ``hidden``, ``weight`` and ``bias`` (each None unless wanted) from the rebuilt logits,
    a chunk of rows and a slice of the vocabulary at a time."""
    hidden, weight, bias, targets, lse, entropy, grad_logps, grad_entropy, head, chunk_size = inputs
    acc = _accumulation_dtype(hidden)
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=acc) if want_weight else None
    grad_bias = torch.zeros_like(bias, dtype=acc) if want_bias else None
    vocab = weight.shape[0]
    for start in range(0, hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, hidden.shape[0])
        hidden_chunk, g, chunk_targets = hidden[start:stop], grad_logps[start:stop], targets[start:stop]
        chunk_lse = lse[start:stop, None]
        chunk_grad_hidden = hidden_chunk.new_zeros(stop - start, hidden.shape[1], dtype=acc) if want_hidden else None
        # the vocabulary a slice at a time: the logits of a block fit in SLICE_BYTES, and each
        # row of the weight gradient is written by one product over the chunk's rows
        width = slice_width(stop - start, vocab)
        for first in range(0, vocab, width):
            last = min(first + width, vocab)
            weight_slice = weight[first:last]
            bias_slice = bias[first:last] if bias is not None else None
            logits, tanh_grad = _chunk_logits(hidden_chunk, weight_slice, bias_slice, head)
            log_probs = logits.sub_(chunk_lse)
            if grad_entropy is None:
                # d log p(t) / d logits = onehot(t) - softmax(logits)
                grad_logits = log_probs.exp_().mul_(-g[:, None])
            else:
                # d H / d logits_j = -p_j (log p_j + H), added to the log-prob term's -g p_j
                probs = log_probs.exp()
                h = entropy[start:stop]
                grad_logits = log_probs.add_(h[:, None]).mul_(grad_entropy[start:stop, None]).add_(g[:, None])
                grad_logits.mul_(probs).neg_()
            in_slice = ((chunk_targets >= first) & (chunk_targets < last)).nonzero().squeeze(1)
            grad_logits.index_put_((in_slice, chunk_targets[in_slice] - first), g[in_slice], accumulate=True)
            grad_z = _logits_grad_to_z(grad_logits, tanh_grad, head)
            if want_hidden:
                chunk_grad_hidden.addmm_(grad_z, weight_slice.to(acc))
            _accumulate_param_grads(grad_z, hidden_chunk, weight_slice, bias_slice,
                                    grad_weight[first:last] if want_weight else None,
                                    grad_bias[first:last] if want_bias else None, want_weight, want_bias)
        if want_hidden:
            grad_hidden[start:stop] = chunk_grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    head: HeadTransform = HeadTransform(),
    chunk_size: int | None = None,
    with_entropy: bool = False,
    tied: TiedGradient | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability of each target token, plus its entropy and whether it was the argmax.

    Args:
        hidden: (N, d) final hidden states of the positions that predict ``targets``.
        weight: (V, d) output-embedding matrix; ``bias``: optional (V,).
        targets: (N,) token ids.
        head: the model's logit transform (scale, soft-cap, temperature).
        chunk_size: rows per chunk; peak extra memory is ``chunk_size * V`` floats. ``None`` picks
            it from the vocabulary so that a chunk takes about 256 MiB.
        tied: where ``weight`` is also the input embedding of the forward that made ``hidden``, the
            hand-off its lookup was made with (:mod:`posttrain.ops.tied_embedding`): the head's
            gradient of ``weight`` then reaches autograd through that lookup, not as a second (V, d) tensor.

    Returns:
        ``logps`` (N,) float32, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``;
        ``entropy`` (N,) float32 of the predicted distribution, ``H = -sum_v p_v log p_v`` (NaN unless
        ``with_entropy``, which costs a row-wise dot product per chunk); differentiable too, with
        ``dH/dz_v = -p_v (log p_v + H)`` applied in the same backward pass (an entropy bonus);
        ``argmax_match`` (N,) bool, True where the most likely token is the target (no gradient).
    """
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        # keep the graph connected so that backward through an empty selection still works
        return empty + 0.0 * hidden.sum(), empty, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk_size, head, with_entropy, tied)


class _FusedLinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, chunk_size, head, with_entropy, tied):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute_grads = need_hidden or need_weight or need_bias
        n = hidden.shape[0]
        acc = _accumulation_dtype(hidden)
        loss = hidden.new_zeros((), dtype=acc)
        argmax_match = torch.empty(n, dtype=torch.bool, device=hidden.device)
        entropy = hidden.new_empty(n, dtype=acc)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if need_bias else None
        token_weights = token_weights.to(acc)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            logits, tanh_grad = _chunk_logits(hidden[start:stop], weight, bias, head)
            chunk_targets = targets[start:stop, None]
            target_logits = logits.gather(1, chunk_targets).squeeze(1)
            chunk_lse, argmax, row_sum, chunk_entropy = _exp_in_place(logits, with_entropy)
            if with_entropy:
                entropy[start:stop] = chunk_entropy
            w = token_weights[start:stop]
            loss += (w * (chunk_lse - target_logits)).sum()
            argmax_match[start:stop] = argmax == targets[start:stop]
            if compute_grads:
                # d(-w log p(t)) / d logits = w * (softmax - onehot(t)); the buffer holds exp(logits - max)
                grad_logits = logits.mul_((w / row_sum)[:, None])
                grad_logits.scatter_add_(1, chunk_targets, -w[:, None])
                grad_z = _logits_grad_to_z(grad_logits, tanh_grad, head)
                if need_hidden:
                    grad_hidden[start:stop] = (grad_z @ weight.to(acc)).to(hidden.dtype)
                _accumulate_param_grads(
                    grad_z, hidden[start:stop], weight, bias, grad_weight, grad_bias, need_weight, need_bias
                )
        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )
        if not with_entropy:
            entropy.fill_(float("nan"))
        ctx.mark_non_differentiable(argmax_match, entropy)
        ctx.tied = tied
        ctx.spent = False
        return loss, argmax_match, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_match, _grad_entropy):
        if ctx.spent:
            raise RuntimeError(
                "fused_linear_nll: a second backward through the same loss (retain_graph=True). Its gradients "
                "are computed in forward and scaled in place by the one backward; compute the loss again instead.")
        ctx.spent = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # scaled in place: a copy would be a second (V, d) tensor at the backward's peak
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                grad.mul_(grad_loss.to(grad.dtype))
        # a tied input embedding's lookup adds its rows into the head's gradient and returns the sum
        if grad_weight is not None and ctx.tied is not None and grad_hidden is not None and ctx.tied.deposit(grad_weight):
            grad_weight = None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def fused_linear_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    head: HeadTransform = HeadTransform(),
    chunk_size: int | None = None,
    with_entropy: bool = False,
    tied: TiedGradient | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted negative log-likelihood ``sum_i token_weights[i] * -log p(targets[i] | hidden[i])``.

    Gradients are computed in forward (when autograd needs them), so the loss must be used
    linearly afterwards (scaled, summed with other losses), which is how training uses it, and
    backward runs through it once.

    Args:
        hidden: (N, d); weight: (V, d); targets: (N,); token_weights: (N,), e.g. ``1 / num_tokens``.
        tied: as for :func:`chunked_token_logps`, the hand-off of a tied input embedding's lookup.

    Returns:
        ``loss`` scalar float32; ``argmax_match`` (N,) bool and ``entropy`` (N,) float32 (NaN unless
        ``with_entropy``), no gradient.
    """
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    if hidden.shape[0] == 0:
        zero = 0.0 * hidden.sum()
        return zero.float(), torch.zeros(0, dtype=torch.bool, device=hidden.device), hidden.new_zeros(0)
    return _FusedLinearNLL.apply(hidden, weight, bias, targets, token_weights, chunk_size, head, with_entropy, tied)


def naive_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference implementation: ``log_softmax(logits)[targets]`` in float32. (N, V), (N,) -> (N,)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis, chunked over the leading rows; (..., V) -> (...)."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in flat.split(chunk_size):
        logp = torch.log_softmax(chunk.float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1]) if out else logits.new_zeros(logits.shape[:-1])
