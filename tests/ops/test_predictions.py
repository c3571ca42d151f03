"""Chunked argmax and full logits for evaluation predictions, against the plain formula."""

import torch

from posttrain.ops.logprobs import HeadTransform
from posttrain.ops.predictions import chunked_argmax, head_logits


def _reference_logits(hidden, weight, bias, head):
    z = (hidden.double() @ weight.double().t() + bias.double()) * head.scale
    return head.softcap * torch.tanh(z / head.softcap) / head.temperature


def test_chunked_argmax_and_head_logits_match_the_formula():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(37, 8), torch.randn(50, 8), torch.randn(50)
    head = HeadTransform(scale=0.5, softcap=3.0, temperature=0.7)
    expected = _reference_logits(hidden, weight, bias, head)
    for chunk_size in (1, 5, 64):  # chunks that divide the rows, leave a remainder, or cover them all
        assert torch.equal(chunked_argmax(hidden, weight, bias, head, chunk_size), expected.argmax(-1))
    logits = head_logits(hidden.reshape(37, 1, 8), weight, bias, head)
    assert logits.shape == (37, 1, 50) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[:, 0].double(), expected, rtol=1e-5, atol=1e-5)
    # the returned logits are a copy: a later call does not overwrite them
    head_logits(torch.randn(37, 8), weight, bias, head)
    torch.testing.assert_close(logits[:, 0].double(), expected, rtol=1e-5, atol=1e-5)
