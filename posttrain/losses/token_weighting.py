"""Per-token weightings of a preference pair's sequence log-probs: WPO's pair weights and LD-DPO's
length-desensitised sums. Pure functions of (B, T) token tensors; the losses that use them live in
:mod:`posttrain.losses.preference`."""

from __future__ import annotations

import torch

from posttrain.errors import ConfigError
from posttrain.ops.masked import masked_mean, masked_sum


def log_sum_squared_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log sum_v p_v^2`` of the softmax of ``logits`` (..., V) -> (...); WPO's per-token normaliser."""
    return torch.logsumexp(2.0 * torch.log_softmax(logits.float(), dim=-1), dim=-1)


@torch.no_grad()
def wpo_weights(token_logps: torch.Tensor, token_log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted preference optimisation: how likely the current policy is to produce each completion.

    Paper: Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization",
    arXiv:2406.11827 (eq. 2, with the "aligned" per-token normalisation).

    ``w = exp(mean_t (log p(y_t) - log sum_v p_v(t)^2))`` over the completion tokens; no gradient.
    The loss of pair i is multiplied by ``w_chosen,i * w_rejected,i`` (pass that product as
    ``pair_weights`` to :func:`combined_preference_loss`).

    Inputs (per token of the completion, from the policy): ``token_logps`` (B, T) the log-prob of
    the actual token; ``token_log_sum_sq_probs`` (B, T) ``log sum_v p_v^2`` over the full
    vocabulary at that position (:func:`log_sum_squared_probs` of the logits); ``mask`` (B, T).
    Returns (B,).
    """
    aligned = token_logps.float() - token_log_sum_sq_probs.float()
    return torch.exp(masked_mean(aligned, mask, dim=-1))


def length_desensitized_logps(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    ld_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO sequence log-probs: tokens past the shorter completion's length count ``ld_alpha`` times.

    Paper: Liu et al., "Length Desensitization in Direct Preference Optimization", arXiv:2409.06411.

    For pair i with lengths n_c, n_r and ``L = min(n_c, n_r)``: ``logp = sum_{k <= L} log p_k +
    alpha sum_{k > L} log p_k``, where k counts completion tokens (mask = 1) from the left.
    ``ld_alpha = 1`` gives the plain sums. Inputs (B, T) each; returns two (B,) tensors.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ConfigError(f"ld_alpha must lie in [0, 1]; got {ld_alpha}", field="ld_alpha", fix="e.g. 0.5")
    shared_length = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1)).unsqueeze(-1)

    def weighted_sum(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        position = torch.cumsum(mask.to(torch.long), dim=-1)
        full, reduced = (torch.tensor(w, dtype=token_logps.dtype, device=token_logps.device) for w in (1.0, ld_alpha))
        token_weight = torch.where(position <= shared_length, full, reduced)
        return masked_sum(token_logps, mask.to(token_logps.dtype) * token_weight, dim=-1)

    return weighted_sum(chosen_token_logps, chosen_mask), weighted_sum(rejected_token_logps, rejected_mask)
