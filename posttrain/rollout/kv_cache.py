"""A ``DynamicCache`` whose full-attention layers write into memory reserved up front.

``transformers``' ``DynamicLayer`` grows by ``torch.cat`` at every decode step, which copies the
whole cache each time: for 128 rows of 250 tokens that is hundreds of megabytes per step, and on a
CPU it costs more than the model's arithmetic. Rollouts know their final length (prompt width +
``max_completion_length``), so :class:`ReservedLayer` allocates that once and each step writes one
column in place. Everything else (masks, ``get_seq_length``, ``batch_repeat_interleave``,
``batch_select_indices``) behaves as in ``DynamicLayer``; the object is still a ``DynamicCache``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` backed by a buffer of ``capacity`` positions; ``keys`` / ``values`` are views
    of the filled part, shape ``(B, H, length, D)``."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _owns_views(self) -> bool:
        # crop / reorder_cache / offload may have replaced the views; then the buffer is stale
        return (
            self._key_buffer is not None
            and self.keys is not None
            and self.keys.numel() > 0
            and self.keys.data_ptr() == self._key_buffer.data_ptr()
            and self.values.data_ptr() == self._value_buffer.data_ptr()
            and self.keys.shape[0] == self._key_buffer.shape[0]
        )

    def _rebuild(self, keys: torch.Tensor, values: torch.Tensor, needed: int) -> None:
        """Copy ``keys``/``values`` (the filled part) into fresh buffers of at least ``needed`` positions."""
        capacity = max(self.capacity, needed)
        batch, heads, length, dim = keys.shape
        self._key_buffer = keys.new_empty((batch, heads, capacity, dim))
        self._value_buffer = values.new_empty((batch, values.shape[1], capacity, values.shape[-1]))
        self._key_buffer[:, :, :length] = keys
        self._value_buffer[:, :, :length] = values
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if start == 0:
            self._rebuild(key_states, value_states, end)
            return self.keys, self.values
        if not self._owns_views() or end > self._key_buffer.shape[-2]:
            self._rebuild(self.keys, self.values, max(end, 2 * self._key_buffer.shape[-2] if self._key_buffer is not None else end))
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() == 0:
            return
        # broadcast each row into its `repeats` slots of the new buffer: one copy, no intermediate
        batch, heads, length, dim = self.keys.shape
        capacity = max(self.capacity, length)
        key_buffer = self.keys.new_empty((batch, repeats, heads, capacity, dim))
        value_buffer = self.values.new_empty((batch, repeats, self.values.shape[1], capacity, self.values.shape[-1]))
        key_buffer[:, :, :, :length] = self.keys.unsqueeze(1)
        value_buffer[:, :, :, :length] = self.values.unsqueeze(1)
        self._key_buffer = key_buffer.flatten(0, 1)
        self._value_buffer = value_buffer.flatten(0, 1)
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._rebuild(self.keys[indices], self.values[indices], 0)


def reserved_dynamic_cache(config, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers reserve ``capacity`` positions.

    Sliding-window (and other special) layers keep transformers' own classes.
    """
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
