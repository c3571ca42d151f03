import math

import pytest
import torch

from posttrain.ops.logprobs import (
    HeadTransform,
    chunked_token_logps,
    entropy_from_logits,
    fused_linear_nll,
    naive_token_logps,
)


def _naive(hidden, weight, bias, targets, head):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * head.scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    z = z / head.temperature
    return torch.log_softmax(z, dim=-1).gather(-1, targets[:, None]).squeeze(-1), z


def _inputs(n=13, d=8, v=37, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


HEADS = [HeadTransform(), HeadTransform(scale=0.5, softcap=3.0, temperature=0.7), HeadTransform(temperature=2.0)]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_chunked_logps_match_naive_values_and_gradients(head, chunk_size):
    hidden, weight, bias, targets = _inputs()
    upstream = torch.randn(hidden.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    expected, logits = _naive(*leaves, targets, head)
    (expected * upstream).sum().backward()
    expected_grads = [t.grad for t in leaves]

    leaves2 = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logps, entropy, match = chunked_token_logps(
        leaves2[0], leaves2[1], targets, bias=leaves2[2], head=head, chunk_size=chunk_size, with_entropy=True
    )
    (logps.double() * upstream).sum().backward()

    torch.testing.assert_close(logps.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip((t.grad for t in leaves2), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    probs = torch.softmax(logits.detach(), -1)
    # float32 inside: lse - E[logits] loses a few digits when the entropy is small
    torch.testing.assert_close(entropy.double(), -(probs * probs.log()).sum(-1), rtol=1e-4, atol=1e-4)
    assert torch.equal(match, logits.argmax(-1) == targets)


def test_chunked_logps_gradcheck_float64():
    hidden, weight, bias, targets = _inputs(n=5, d=3, v=7)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    head = HeadTransform(softcap=2.0, temperature=0.9)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_token_logps(h, w, targets, head=head, chunk_size=2)[0], (hidden, weight)
    )


def _logps_and_entropy_backward(hidden, weight, bias, targets, head, upstream_logps, upstream_entropy):
    """Log-probs, entropy, argmax match and the gradients of ``sum(logps * up_l + entropy * up_e)`` for
    (hidden, weight, bias): full-width float64 autograd (expected) and :func:`chunked_token_logps` (got)."""
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logps, logits = _naive(*leaves, targets, head)
    log_probs = torch.log_softmax(logits, -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    (logps * upstream_logps + entropy * upstream_entropy).sum().backward()
    expected = {"logps": logps.detach(), "entropy": entropy.detach(), "match": logits.argmax(-1) == targets,
                "grads": [t.grad for t in leaves]}

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logps, entropy, match = chunked_token_logps(leaves[0], leaves[1], targets, bias=leaves[2], head=head,
                                                chunk_size=4, with_entropy=True)
    (logps.double() * upstream_logps + entropy.double() * upstream_entropy).sum().backward()
    got = {"logps": logps.detach(), "entropy": entropy.detach(), "match": match, "grads": [t.grad for t in leaves]}
    return expected, got


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("with_logps_grad", [True, False])
def test_entropy_gradient_matches_the_float64_softmax(head, with_logps_grad):
    """An entropy bonus trains through the chunked entropy: its gradient (alone, or with the log-probs') is the
    gradient of -sum p log p computed by autograd on full float64 logits."""
    hidden, weight, bias, targets = _inputs()
    g = torch.Generator().manual_seed(2)
    upstream_logps = torch.randn(hidden.shape[0], dtype=torch.float64, generator=g) if with_logps_grad else 0.0
    upstream_entropy = torch.randn(hidden.shape[0], dtype=torch.float64, generator=g)

    expected, got = _logps_and_entropy_backward(hidden, weight, bias, targets, head, upstream_logps, upstream_entropy)
    for got, want in zip(got["grads"], expected["grads"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_entropy_gradcheck_float64():
    hidden, weight, bias, targets = _inputs(n=5, d=3, v=7)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    head = HeadTransform(softcap=2.0, temperature=0.9)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_token_logps(h, w, targets, head=head, chunk_size=2, with_entropy=True)[1], (hidden, weight)
    )


@pytest.mark.parametrize("head", HEADS)
def test_fused_nll_matches_naive_weighted_nll(head):
    hidden, weight, bias, targets = _inputs(n=11)
    token_weights = torch.rand(11, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logps, _ = _naive(*leaves, targets, head)
    expected = -(logps * token_weights).sum()
    (expected * 2.5).backward()

    leaves2 = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, match, _ = fused_linear_nll(
        leaves2[0], leaves2[1], targets, token_weights, bias=leaves2[2], head=head, chunk_size=3
    )
    (loss * 2.5).backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip((t.grad for t in leaves2), (t.grad for t in leaves)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert match.dtype == torch.bool and match.shape == (11,)


@pytest.mark.parametrize("fused", [False, True])
def test_entropy_across_row_blocks_matches_float64(fused):
    # more rows per chunk than one exponentiation block, so the block loop and its tail both run
    from posttrain.ops.logprobs import ENTROPY_ROW_BLOCK

    n = 2 * ENTROPY_ROW_BLOCK + 5
    hidden, weight, bias, targets = _inputs(n=n, d=6, v=50, seed=4)
    head = HeadTransform(temperature=0.8)
    _, logits = _naive(hidden, weight, bias, targets, head)
    probs = torch.softmax(logits, -1)
    want = -(probs * probs.log()).sum(-1)
    h, w, b = hidden.float(), weight.float(), bias.float()
    if fused:
        _, _, entropy = fused_linear_nll(h, w, targets, torch.ones(n), bias=b, head=head, chunk_size=n,
                                         with_entropy=True)
    else:
        _, entropy, _ = chunked_token_logps(h, w, targets, bias=b, head=head, chunk_size=n, with_entropy=True)
    torch.testing.assert_close(entropy.double(), want, rtol=1e-4, atol=1e-4)


def test_fused_nll_hand_computed_value():
    # two tokens, vocabulary of two, logits [0, 0] and [ln 3, 0]: p(target) = 1/2 and 3/4
    hidden = torch.tensor([[0.0], [math.log(3.0)]])
    weight = torch.tensor([[1.0], [0.0]])
    targets = torch.tensor([1, 0])
    loss, match, _ = fused_linear_nll(hidden, weight, targets, torch.tensor([0.5, 0.5]))
    assert loss.item() == pytest.approx(0.5 * (math.log(2) - math.log(0.75)), rel=1e-6)
    # row 0 is a tie, resolved to the first index (0), which is not its target
    assert match.tolist() == [False, True]


def test_empty_selection_keeps_graph():
    hidden = torch.randn(0, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    logps, _, _ = chunked_token_logps(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss, _, _ = fused_linear_nll(hidden, weight, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    (logps.sum() + loss).backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, 4)


def test_entropy_from_logits_uniform():
    logits = torch.zeros(3, 5, 8)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), torch.full((3, 5), math.log(8)))


def test_naive_token_logps():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    assert naive_token_logps(logits, torch.tensor([2])).item() == pytest.approx(-math.log(4))


def test_logit_buffer_is_kept_on_the_cpu_only():
    from posttrain.ops import logprobs

    logprobs.release_workspaces()
    first = logprobs._workspace(4, 8, torch.device("cpu"), torch.float32)
    assert logprobs._workspace(2, 8, torch.device("cpu"), torch.float32).data_ptr() == first.data_ptr()
    # other devices have caching allocators: a kept buffer would only raise the peak at the optimizer step
    on_meta = logprobs._workspace(4, 8, torch.device("meta"), torch.float32)
    assert on_meta.shape == (4, 8) and on_meta.device.type == "meta"
    assert [key[0].type for key in logprobs._workspaces] == ["cpu"]
    logprobs.release_workspaces()


def _one_slice_per_six_columns(monkeypatch):
    from posttrain.ops import logprobs

    monkeypatch.setattr(logprobs, "slice_width", lambda rows, vocab, budget_bytes=None: 6)  # 37 = 6 x 6 + 1


@pytest.mark.parametrize("head", HEADS)
def test_vocabulary_slices_match_the_float64_softmax(head, monkeypatch):
    """Across vocabulary slices (a running max and rescaled sums), the log-probs, entropy, argmax and the
    gradients of a loss on both equal full-width float64 autograd."""
    _one_slice_per_six_columns(monkeypatch)
    hidden, weight, bias, targets = _inputs(n=13, d=5, v=37, seed=5)
    targets[0] = 36  # the one-column tail slice
    g = torch.Generator().manual_seed(6)
    upstream_logps, upstream_entropy = torch.randn(2, hidden.shape[0], dtype=torch.float64, generator=g)

    expected, got = _logps_and_entropy_backward(hidden, weight, bias, targets, head, upstream_logps, upstream_entropy)
    torch.testing.assert_close(got["logps"], expected["logps"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["entropy"], expected["entropy"], rtol=1e-10, atol=1e-12)
    assert torch.equal(got["match"], expected["match"])
    for got, want in zip(got["grads"], expected["grads"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_masked_vocabulary_slice_gets_no_probability(monkeypatch):
    """A whole slice of -inf logits (a masked vocabulary) adds exp(-inf) = 0, not NaN, to the running sums."""
    _one_slice_per_six_columns(monkeypatch)
    hidden, weight, bias, targets = _inputs(n=13, d=5, v=37, seed=8)
    bias[:6] = float("-inf")  # the first slice: the running max starts at -inf
    bias[18:24] = float("-inf")
    targets[(targets < 6) | ((targets >= 18) & (targets < 24))] = 30
    upstream = torch.randn(13, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    expected, logits = _naive(*leaves, targets, HeadTransform())
    (expected * upstream).sum().backward()
    leaves2 = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logps, _, match = chunked_token_logps(leaves2[0], leaves2[1], targets, bias=leaves2[2], chunk_size=4)
    (logps * upstream).sum().backward()
    torch.testing.assert_close(logps, expected.detach(), rtol=1e-10, atol=1e-12)
    assert torch.equal(match, logits.argmax(-1) == targets)
    for got, want in zip((t.grad for t in leaves2), (t.grad for t in leaves)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_logits_held_at_once_are_one_vocabulary_slice(monkeypatch):
    """With a big vocabulary the logits buffer is a (rows, slice) block within SLICE_BYTES, not (rows, V)."""
    from posttrain.ops import logprobs

    monkeypatch.setattr(logprobs, "SLICE_BYTES", 256 * 2**10)
    logprobs.release_workspaces()
    hidden, weight, bias, targets = _inputs(n=64, d=4, v=3000, seed=7)
    leaves = [t.float().requires_grad_(True) for t in (hidden, weight, bias)]
    logps, _, _ = chunked_token_logps(leaves[0], leaves[1], targets, bias=leaves[2], chunk_size=64, with_entropy=True)
    logps.sum().backward()
    held = max(buffer.numel() for buffer in logprobs._workspaces.values())
    logprobs.release_workspaces()
    assert held <= 64 * 1024  # 64 rows x 1,024 columns: 256 KiB of float32
