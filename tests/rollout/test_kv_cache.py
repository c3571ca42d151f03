from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from posttrain.rollout.kv_cache import ReservedLayer, reserved_dynamic_cache


def states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=generator), torch.randn(batch, 2, length, 4, generator=generator)


def assert_same(reserved: ReservedLayer, plain: DynamicLayer) -> None:
    assert reserved.get_seq_length() == plain.get_seq_length()
    assert torch.equal(reserved.keys, plain.keys) and torch.equal(reserved.values, plain.values)


def test_reserved_layer_matches_dynamic_layer_through_prefill_repeat_decode_select_and_growth():
    reserved, plain = ReservedLayer(capacity=8), DynamicLayer()
    k, v = states(2, 5, 0)
    out_reserved, out_plain = reserved.update(k, v), plain.update(k, v)
    assert torch.equal(out_reserved[0], out_plain[0])
    reserved.batch_repeat_interleave(3), plain.batch_repeat_interleave(3)
    assert_same(reserved, plain)
    buffer = reserved._key_buffer
    for step in range(3):  # within capacity: written in place, no new buffer
        k, v = states(6, 1, step + 1)
        keys, values = reserved.update(k, v)
        plain.update(k, v)
        assert torch.equal(keys, plain.keys) and torch.equal(values, plain.values)
    assert reserved._key_buffer is buffer
    keep = torch.tensor([0, 2, 5])
    reserved.batch_select_indices(keep), plain.batch_select_indices(keep)
    assert_same(reserved, plain)
    for step in range(4):  # 8 + 4 > capacity: the buffer grows
        k, v = states(3, 1, 10 + step)
        reserved.update(k, v), plain.update(k, v)
    assert_same(reserved, plain)
    assert reserved._key_buffer.shape[-2] >= 12


def test_reserved_layer_recovers_after_crop_replaces_its_views():
    reserved, plain = ReservedLayer(capacity=16), DynamicLayer()
    k, v = states(1, 6, 0)
    reserved.update(k, v), plain.update(k, v)
    reserved.crop(-2), plain.crop(-2)
    k, v = states(1, 1, 1)
    reserved.update(k, v), plain.update(k, v)
    assert_same(reserved, plain)
    assert reserved.get_seq_length() == 5


def test_reserved_dynamic_cache_replaces_only_full_attention_layers(qwen2):
    cache = reserved_dynamic_cache(qwen2.config, 32)
    assert len(cache.layers) == qwen2.config.num_hidden_layers
    assert all(isinstance(layer, ReservedLayer) for layer in cache.layers)
