import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.models.lm_head import output_head, token_logps, unwrap_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


def _naive(model, input_ids, attention_mask, completion_mask, temperature=1.0):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double() / temperature
    logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:].bool()
    return logps * mask, mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_match_full_logits(model, temperature):
    torch.manual_seed(1)
    input_ids = torch.randint(0, 61, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 4:] = 1
    completion_mask[2, 6:] = 0
    got = token_logps(model, input_ids, completion_mask, attention_mask, temperature=temperature, chunk_size=4,
                      with_entropy=True)
    want, mask = _naive(model, input_ids, attention_mask, completion_mask, temperature)
    assert torch.equal(got.mask, mask)
    torch.testing.assert_close(got.logps.double(), want, rtol=1e-4, atol=1e-5)
    assert got.token_counts().tolist() == [5.0, 5.0, 2.0]
    assert (got.entropy[mask] > 0).all() and (got.entropy[~mask] == 0).all()


def test_token_logps_gradients_match(model):
    torch.manual_seed(2)
    input_ids = torch.randint(0, 61, (2, 7))
    completion_mask = torch.ones_like(input_ids)
    model.zero_grad()
    token_logps(model, input_ids, completion_mask, chunk_size=3).sequence_sums().sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=input_ids).logits[:, :-1]
    torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-4, atol=1e-5)
    model.zero_grad()


def test_packed_rows_do_not_score_sequence_starts(model):
    input_ids = torch.randint(0, 61, (1, 8))
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    out = token_logps(model, input_ids, torch.ones_like(input_ids), position_ids=position_ids)
    # targets at positions 1..7; those whose position id is 0 (3 and 7) are skipped
    assert out.mask.tolist() == [[True, True, False, True, True, True, False]]


def test_output_head_through_peft(model):
    from peft import LoraConfig, get_peft_model
    import copy

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    head = output_head(wrapped)
    assert head is not None and head.weight.shape == (61, 32)
    assert unwrap_model(wrapped).__class__.__name__ == "Qwen2ForCausalLM"


@pytest.mark.parametrize("full_logits", [False, True])
def test_entropy_gradient_on_the_chunked_and_the_full_logits_paths(model, full_logits):
    """``entropy_grad=True`` gives the entropy the gradient of -sum p log p on float64 logits, on the chunked
    head and on the fallback through the model's own logits; without it the entropy carries no graph."""
    from posttrain.models.lm_head import FULL_LOGITS_ATTRIBUTE

    torch.manual_seed(2)
    input_ids = torch.randint(0, 61, (2, 7))
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 3:] = 1
    weight = model.model.layers[0].mlp.up_proj.weight
    setattr(model, FULL_LOGITS_ATTRIBUTE, full_logits)
    try:
        got = token_logps(model, input_ids, completion_mask, temperature=0.8, with_entropy=True, entropy_grad=True)
        assert not token_logps(model, input_ids, completion_mask, with_entropy=True).entropy.requires_grad
    finally:
        setattr(model, FULL_LOGITS_ATTRIBUTE, False)
    logits = model(input_ids=input_ids).logits[:, :-1].double() / 0.8
    log_probs = torch.log_softmax(logits, -1)
    mask = completion_mask[:, 1:].bool()
    want = (-(log_probs.exp() * log_probs).sum(-1) * mask).sum()
    (got_grad,) = torch.autograd.grad(got.entropy.sum(), weight)
    (want_grad,) = torch.autograd.grad(want, weight)
    torch.testing.assert_close(got.entropy.sum().double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad.double(), rtol=1e-4, atol=1e-6)
