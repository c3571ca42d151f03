"""A tied head's weight gradient made in the lookup's backward, the hidden states' gradient from the forward's
expected output row: the gradients of plain autograd, in float64, for every head transform."""

import pytest
import torch

from posttrain.ops import logprobs
from posttrain.ops.logprobs import HeadTransform, chunked_token_logps
from posttrain.ops.tied_embedding import TiedGradient, tied_embedding

VOCAB, WIDTH, ROWS = 1300, 16, 11
HEADS = {
    "plain": HeadTransform(),
    "scaled": HeadTransform(scale=0.7),
    "soft-capped": HeadTransform(softcap=2.5),
    "everything": HeadTransform(scale=1.3, softcap=3.0, temperature=0.8),
}


def _inputs(dtype=torch.float64):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(VOCAB, WIDTH, generator=generator, dtype=dtype)
    mix = torch.randn(WIDTH, WIDTH, generator=generator, dtype=dtype) / WIDTH**0.5
    ids = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    ids[3] = ids[7]  # a repeated token: two rows of the lookup's gradient summed
    targets = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    targets[5] = VOCAB - 1  # the last column of the last slice
    coefficients = torch.linspace(-1.5, 2.0, ROWS, dtype=dtype)
    return weight.requires_grad_(), mix.requires_grad_(), ids, targets, coefficients


def _reference(weight, mix, ids, targets, coefficients, head):
    hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) @ mix)
    z = hidden @ weight.t() * head.scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    logps = torch.log_softmax(z / head.temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return (logps * coefficients).sum()


def _through_hand_off(weight, mix, ids, targets, coefficients, head, heads=1):
    tied = TiedGradient()
    hidden = torch.tanh(tied_embedding(weight, ids, None, tied) @ mix)
    loss = 0.0
    for _ in range(heads):  # a second head of the same forward finds the hand-off taken
        logps, _, _ = chunked_token_logps(hidden, weight, targets, head=head, chunk_size=4, tied=tied)
        loss = loss + (logps * coefficients).sum() / heads
    return loss


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.fixture(autouse=True)
def _narrow_slices(monkeypatch):
    # 4 rows x 512 columns a block: the vocabulary in three slices (512, 512, 276)
    monkeypatch.setattr(logprobs, "SLICE_BYTES", 4 * 4 * 512)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("head", list(HEADS.values()), ids=list(HEADS))
def test_gradients_equal_plain_autograd_in_float64(head, heads):
    weight, mix, ids, targets, coefficients = _inputs()
    want = _grads(_reference(weight, mix, ids, targets, coefficients, head), weight, mix)
    got = _grads(_through_hand_off(weight, mix, ids, targets, coefficients, head, heads), weight, mix)
    for name, g, w in zip(("weight", "mix"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_the_head_backward_leaves_a_function_for_the_lookup():
    weight, mix, ids, targets, coefficients = _inputs()
    tied = TiedGradient()
    hidden = torch.tanh(tied_embedding(weight, ids, None, tied) @ mix)
    logps, _, _ = chunked_token_logps(hidden, weight, targets, head=HEADS["everything"], chunk_size=4, tied=tied)
    waiting = []
    hidden.register_hook(lambda grad: waiting.append(tied.pending))  # between the head's and the lookup's backward
    (logps * coefficients).sum().backward()
    assert len(waiting) == 1 and callable(waiting[0]) and not isinstance(waiting[0], torch.Tensor)
    assert tied.pending is None  # taken, and made, by the lookup


def test_an_entropy_gradient_takes_the_rebuilt_logits_path():
    weight, mix, ids, targets, coefficients = _inputs()
    tied = TiedGradient()
    hidden = torch.tanh(tied_embedding(weight, ids, None, tied) @ mix)
    logps, entropy, _ = chunked_token_logps(hidden, weight, targets, head=HEADS["soft-capped"], chunk_size=4,
                                            with_entropy=True, tied=tied)
    waiting = []
    hidden.register_hook(lambda grad: waiting.append(tied.pending))
    loss = (logps * coefficients).sum() + 0.3 * entropy.sum()
    got = _grads(loss, weight, mix)
    assert isinstance(waiting[0], torch.Tensor)  # made in the head's backward, beside the hidden gradient
    plain_hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) @ mix)
    z = plain_hidden @ weight.t()
    z = 2.5 * torch.tanh(z / 2.5)
    log_probs = torch.log_softmax(z, dim=-1)
    reference = (log_probs.gather(1, targets[:, None]).squeeze(1) * coefficients).sum() \
        - 0.3 * (log_probs.exp() * log_probs).sum()
    for g, w in zip(got, _grads(reference, weight, mix)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_float32_gradients_match_float64():
    head = HEADS["everything"]
    weight, mix, ids, targets, coefficients = _inputs(torch.float32)
    got = _grads(_through_hand_off(weight, mix, ids, targets, coefficients, head), weight, mix)
    inputs64 = [t.detach().double().requires_grad_() if t.is_floating_point() else t
                for t in (weight, mix, ids, targets, coefficients)]
    want = _grads(_reference(*inputs64, head), inputs64[0], inputs64[1])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("float32_matmul", [False, True])
def test_bfloat16_weights_give_the_rebuilt_logits_gradients(float32_matmul):
    """Half-precision weights: the forward's expected row is a float32 product, as the backward's was."""
    head = HeadTransform(softcap=3.0, float32_matmul=float32_matmul)
    weight, mix, ids, targets, coefficients = (t.detach().to(torch.bfloat16).requires_grad_() if t.is_floating_point()
                                               else t for t in _inputs(torch.float32))
    coefficients = coefficients.detach().float()

    def grads(hand_off: bool):
        tied = TiedGradient() if hand_off else None
        looked_up = tied_embedding(weight, ids, None, tied) if hand_off else torch.nn.functional.embedding(ids, weight)
        logps, _, _ = chunked_token_logps(torch.tanh(looked_up @ mix), weight, targets, head=head, chunk_size=4,
                                          tied=tied)
        return _grads((logps * coefficients).sum(), weight, mix)

    for got, want in zip(grads(True), grads(False)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
