"""Statistics over every process's values, so that results do not depend on the process layout.

Each function is a no-op reduction in a single process (or when ``torch.distributed`` is not
initialised) and an all-reduce of sums otherwise. Means and variances are formed from the global
sum, sum of squares and count, never averaged per process: two processes holding 3 and 5 values
give the same statistic as one process holding all 8.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed element-wise over all processes (a new tensor; the input is untouched)."""
    total = values.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def global_mean_std(values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased standard deviation of ``values`` over every process.

    Args:
        values: any shape; entries where ``mask`` is False (or that are NaN, when no mask is given)
            are left out.
        mask: bool tensor of ``values``' shape, or ``None``.

    Returns:
        ``(mean, std)``, 0-dim float64 tensors on ``values``' device; ``std`` is 0 for fewer than two
        values and ``mean`` is NaN for none.
    """
    values = values.detach().double()
    keep = ~torch.isnan(values) if mask is None else mask.bool() & ~torch.isnan(values)
    kept = torch.where(keep, values, torch.zeros_like(values))
    moments = torch.stack([keep.sum().double(), kept.sum(), (kept * kept).sum()])
    count, total, total_sq = all_reduce_sum(moments).unbind()
    mean = total / count if count > 0 else torch.tensor(float("nan"), dtype=torch.float64, device=values.device)
    if count < 2:
        return mean, torch.zeros((), dtype=torch.float64, device=values.device)
    variance = ((total_sq - count * mean * mean) / (count - 1)).clamp_min(0.0)
    return mean, variance.sqrt()


def all_gather_1d(values: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor concatenated over all processes in rank order (lengths may differ); itself in one process."""
    if not is_distributed():
        return values
    values = values.detach().contiguous()
    length = torch.tensor([values.numel()], device=values.device)
    lengths = [torch.zeros_like(length) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    pieces = [torch.zeros_like(padded) for _ in lengths]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[: int(n)] for piece, n in zip(pieces, lengths)])
