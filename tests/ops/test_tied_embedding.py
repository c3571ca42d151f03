"""The tied embedding's gradient: one dense (V, d) tensor in backward, the same gradient as plain autograd."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.models import lm_head
from posttrain.models.lm_head import token_logps

VOCAB, PAD = 67, 3


def _model(tied: bool, dtype=torch.float32):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=tied, pad_token_id=PAD)
    return Qwen2ForCausalLM(config).to(dtype)


def _batch():
    generator = torch.Generator().manual_seed(1)
    # a shared prompt, repeated tokens and the padding token, which gets no gradient from the lookup
    prompt = torch.randint(0, 8, (1, 5), generator=generator).expand(4, 5)
    completion = torch.randint(0, 8, (4, 6), generator=generator)
    input_ids = torch.cat([prompt, completion], dim=1)
    input_ids[1, 2] = PAD
    input_ids[2, 7] = PAD
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 5:] = 1
    weights = torch.linspace(-1.0, 2.0, 10, dtype=torch.float64)
    return input_ids, completion_mask, weights


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _chunked_loss(model, input_ids, completion_mask, weights, prompt_width=None):
    out = token_logps(model, input_ids, completion_mask, chunk_size=7, prompt_width=prompt_width)
    return (out.logps.to(weights.dtype) * weights).sum()


def _reference_loss(model, input_ids, completion_mask, weights):
    logits = model(input_ids=input_ids).logits[:, :-1]
    logps = torch.log_softmax(logits.to(weights.dtype), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logps * completion_mask[:, 1:] * weights).sum()


@contextlib.contextmanager
def _without_hand_off():
    @contextlib.contextmanager
    def plain(model):
        yield None

    original = lm_head.tied_embedding_lookups
    lm_head.tied_embedding_lookups = plain
    try:
        yield
    finally:
        lm_head.tied_embedding_lookups = original


@pytest.mark.parametrize("tied", [True, False])
def test_gradients_equal_plain_autograd_in_float64(tied):
    model = _model(tied, torch.float64)
    input_ids, completion_mask, weights = _batch()
    got = _grads(model, _chunked_loss(model, input_ids, completion_mask, weights))
    want = _grads(model, _reference_loss(model, input_ids, completion_mask, weights))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


def _entropy_bonus_loss(model, input_ids, completion_mask, weights, prompt_width=None):
    """A loss with an entropy term: the head makes its (V, d) gradient in its own backward, as one tensor."""
    out = token_logps(model, input_ids, completion_mask, chunk_size=7, prompt_width=prompt_width, with_entropy=True,
                      entropy_grad=True)
    return (out.logps.to(weights.dtype) * weights).sum() + 0.1 * out.entropy.sum()


def _assert_same_as_plain(got, want, loss_of):
    """The hand-off sums the two gradients of the weight as autograd does, float for float. Where the head's
    gradient waits for the lookup (``_chunked_loss``), the gradient of the hidden states is made from the
    forward's expected output row instead of the rebuilt logits: the same to float32 rounding."""
    assert got.keys() == want.keys() and got
    for name in want:
        if loss_of is _chunked_loss and got[name].dtype == torch.float32:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("loss_of", [_entropy_bonus_loss, _chunked_loss])
@pytest.mark.parametrize("prompt_width", [None, 5])
def test_float32_gradient_equals_two_dense_gradients_summed(prompt_width, loss_of):
    model = _model(True)
    input_ids, completion_mask, weights = _batch()
    weights = weights.float()
    got = _grads(model, loss_of(model, input_ids, completion_mask, weights, prompt_width))
    with _without_hand_off():
        want = _grads(model, loss_of(model, input_ids, completion_mask, weights, prompt_width))
    _assert_same_as_plain(got, want, loss_of)


class _Events(TorchDispatchMode):
    """Appends "dense gradient" to ``events`` when an operator returns a new (V, d) tensor."""

    def __init__(self, weight, events):
        super().__init__()
        self.shape, self.events = tuple(weight.shape), events
        self.seen = {weight.untyped_storage().data_ptr()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == self.shape:
                pointer = tensor.untyped_storage().data_ptr()
                if pointer not in self.seen:
                    self.seen.add(pointer)
                    self.events.append("dense gradient")
        return out


@pytest.mark.parametrize("tied", [True, False])
def test_tied_head_gradient_is_made_after_the_decoder_layers_backward(tied):
    """By then the layers' saved activations are freed: the (V, d) gradient does not sit beside them."""
    model = _model(tied)
    input_ids, completion_mask, weights = _batch()
    events = []
    model.model.layers[0].register_full_backward_hook(lambda *_: events.append("layers done"))
    loss = _chunked_loss(model, input_ids, completion_mask, weights.float())
    with _Events(model.get_input_embeddings().weight, events):
        loss.backward()
    if tied:
        assert events == ["layers done", "dense gradient"]
    else:  # the head's own gradient comes first, the lookup's after the layers
        assert events[0] == "dense gradient" and events[-1] == "dense gradient" and "layers done" in events


class _DenseWeightShapedOutputs(TorchDispatchMode):
    """Counts the distinct storages of (V, d) tensors that operators return, other than the weights' own."""

    def __init__(self, weights):
        super().__init__()
        self.shape = tuple(weights[0].shape)
        self.ignored = {w.untyped_storage().data_ptr() for w in weights}
        self.storages = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == self.shape:
                self.storages.add(tensor.untyped_storage().data_ptr())
        self.storages -= self.ignored
        return out


@pytest.mark.parametrize("tied", [True, False])
def test_backward_builds_one_dense_gradient_per_weight_matrix(tied):
    model = _model(tied)
    input_ids, completion_mask, weights = _batch()
    loss = _chunked_loss(model, input_ids, completion_mask, weights.float())
    counter = _DenseWeightShapedOutputs([model.get_input_embeddings().weight, model.get_output_embeddings().weight])
    with counter:
        loss.backward()
    # tied: the head's gradient, completed by the lookup in place; untied: one each
    assert len(counter.storages) == (1 if tied else 2)


class _ScaledEmbedding(torch.nn.Embedding):
    """Not a plain nn.Embedding (like Gemma's scaled lookup): the hand-off leaves it alone."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


def _with_scaled_embedding(model):
    plain = model.get_input_embeddings()
    scaled = _ScaledEmbedding(plain.num_embeddings, plain.embedding_dim, padding_idx=plain.padding_idx,
                              dtype=plain.weight.dtype)
    scaled.weight = plain.weight  # still tied to the head
    model.set_input_embeddings(scaled)
    return model


def _with_lora_head(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    return get_peft_model(model, config).to(torch.float64)  # peft makes its adapters float32


def _frozen(model):
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def _zero3_partitioned(model):
    model.get_input_embeddings().weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    return model


@pytest.mark.parametrize("variant", [_with_scaled_embedding, _with_lora_head, _frozen, _zero3_partitioned])
def test_other_heads_and_embeddings_take_the_plain_path(variant):
    model = variant(_model(True, torch.float64))
    input_ids, completion_mask, weights = _batch()
    with lm_head.tied_embedding_lookups(lm_head.unwrap_model(model)) as tied:
        assert tied is None
    got = _grads(model, _chunked_loss(model, input_ids, completion_mask, weights))
    with _without_hand_off():
        plain = _grads(model, _chunked_loss(model, input_ids, completion_mask, weights))
    # (a wrapped head's logits are float32, so the float64 reference is met to float32 precision)
    want = _grads(model, _reference_loss(model, input_ids, completion_mask, weights))
    assert got.keys() == want.keys() == plain.keys() and got
    for name in want:
        assert torch.equal(got[name], plain[name]), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-5, msg=name)


def test_only_graph_building_lookups_of_a_tied_model_join_the_hand_off():
    tied_model, input_ids = _model(True), _batch()[0]
    with torch.no_grad(), lm_head.tied_embedding_lookups(tied_model) as tied:
        assert tied is None
    with lm_head.tied_embedding_lookups(_model(False)) as tied:
        assert tied is None
    with lm_head.tied_embedding_lookups(tied_model) as tied:
        with torch.no_grad():
            tied_model(input_ids=input_ids)
        assert tied.lookups == 0  # no backward would take the head's gradient
        tied_model(input_ids=input_ids)
        assert tied.lookups == 1
    tied_model(input_ids=input_ids)  # closed: the hook is gone
    assert tied.lookups == 1


@pytest.mark.slow  # compiles a forward
def test_a_compiled_forward_takes_the_plain_path(monkeypatch):
    """A hook added for each call would make a compiled forward recompile: no hand-off there."""
    model = _model(True)
    model._compiled_call_impl = model._call_impl  # what Module.compile() sets, without compiling anything
    entered = []
    real = lm_head.tied_embedding_lookups

    def spy(base):
        entered.append(base)
        return real(base)

    monkeypatch.setattr(lm_head, "tied_embedding_lookups", spy)
    input_ids, completion_mask, weights = _batch()
    _chunked_loss(model, input_ids, completion_mask, weights.float()).backward()
    assert entered == [None]
    assert lm_head.runs_compiled(torch.compile(_model(True)))  # the wrapper (compiles lazily, on a call)
    assert not lm_head.runs_compiled(_model(True))


def _sft_loss(model, input_ids, completion_mask, weights, scale=0.37):
    """The SFT loss through the fused head (gradients made in forward), scaled as gradient accumulation scales it."""
    mask = lm_head.target_positions(completion_mask)
    token_weights = weights.expand(mask.shape)[mask]
    loss, _ = lm_head.weighted_target_nll(model, input_ids, mask, token_weights, chunk_size=7)
    return loss * scale


@pytest.mark.parametrize("tied", [True, False])
def test_sft_gradients_equal_plain_autograd_in_float64(tied):
    model = _model(tied, torch.float64)
    input_ids, completion_mask, weights = _batch()
    got = _grads(model, _sft_loss(model, input_ids, completion_mask, weights))
    want = _grads(model, -0.37 * _reference_loss(model, input_ids, completion_mask, weights))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


def test_sft_float32_gradient_is_bit_identical_to_two_dense_gradients_summed():
    model = _model(True)
    input_ids, completion_mask, weights = _batch()
    weights = weights.float()
    got = _grads(model, _sft_loss(model, input_ids, completion_mask, weights))
    with _without_hand_off():
        want = _grads(model, _sft_loss(model, input_ids, completion_mask, weights))
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("tied", [True, False])
def test_sft_backward_builds_one_dense_gradient_per_weight_matrix(tied):
    model = _model(tied)
    input_ids, completion_mask, weights = _batch()
    counter = _DenseWeightShapedOutputs([model.get_input_embeddings().weight, model.get_output_embeddings().weight])
    with counter:  # the fused head makes its gradient in forward; backward scales it in place
        _sft_loss(model, input_ids, completion_mask, weights.float()).backward()
    assert len(counter.storages) == (1 if tied else 2)


def test_sft_loss_refuses_a_second_backward():
    model = _model(True)
    input_ids, completion_mask, weights = _batch()
    loss = _sft_loss(model, input_ids, completion_mask, weights.float())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("loss_of", [_sft_loss, _chunked_loss])
def test_neftune_noise_reaches_the_hand_off_lookup(loss_of):
    """NEFTune adds noise to the embedding output in a hook: it must noise the lookup that replaces it."""
    from transformers.integrations.neftune import activate_neftune

    model = _model(True)
    input_ids, completion_mask, weights = _batch()
    weights = weights.float()
    quiet = loss_of(model, input_ids, completion_mask, weights)
    activate_neftune(model, 5.0)
    model.train()

    def noised_grads():
        torch.manual_seed(7)  # the same noise for both paths
        return _grads(model, loss_of(model, input_ids, completion_mask, weights))

    torch.manual_seed(7)
    loud = loss_of(model, input_ids, completion_mask, weights)
    assert not torch.isclose(loud, quiet, rtol=1e-4), "the noise was dropped"
    got = noised_grads()
    with _without_hand_off():
        want = noised_grads()
    _assert_same_as_plain(got, want, loss_of)


def _gpt2(dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, pad_token_id=PAD,
                        bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(dtype)  # ties wte and lm_head; positions added after the lookup


def _llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True, pad_token_id=PAD)
    return LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("make", [_gpt2, _llama])
@pytest.mark.parametrize("loss_of", [_sft_loss, _chunked_loss])
def test_other_tied_architectures(make, loss_of):
    model = make(torch.float64)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    input_ids, completion_mask, weights = _batch()
    got = _grads(model, loss_of(model, input_ids, completion_mask, weights))
    scale = -0.37 if loss_of is _sft_loss else 1.0
    want = _grads(model, scale * _reference_loss(model, input_ids, completion_mask, weights))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    model = make(torch.float32)
    with lm_head.tied_embedding_lookups(model) as tied:
        assert tied is not None  # the hand-off is taken, not the plain path
    got = _grads(model, loss_of(model, input_ids, completion_mask, weights.float()))
    with _without_hand_off():
        want = _grads(model, loss_of(model, input_ids, completion_mask, weights.float()))
    _assert_same_as_plain(got, want, loss_of)
