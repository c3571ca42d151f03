"""Activation offloading and the tiled MLP change memory, never values: losses and gradients equal the plain path."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import weakref

import pytest
import torch
import transformers

from posttrain.errors import ConfigError
from posttrain.models import offload
from posttrain.models.lm_head import forward_without_logits
from posttrain.models.offload import activation_offloading_enabled, decoder_layers, enable_activation_offloading
from posttrain.models.tiling import enable_tiled_mlp, position_wise_mlps
from posttrain.models.tiny import MATRIX_ARCHITECTURES, build_tiny_model, build_tokenizer_variant

VOCAB = 61


def build(arch: str = "qwen2", dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=40, max_position_embeddings=128, pad_token_id=0, bos_token_id=None, eos_token_id=1,
                  attention_dropout=dropout)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.4)  # far from uniform, so that a wrong gradient shows
    return model.double().train()


def loss_and_grads(model: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (2, 37), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # a left-padded row: the layers get a mask as well
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout draws, when there is dropout
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


class RecordingOffloader:
    """Stands in for the offload hooks: counts the tensors the offloaded layers hand over."""

    def __init__(self):
        self.packed = []

    def pack(self, tensor):
        self.packed.append(tensor)
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor


def record_offloads(model) -> RecordingOffloader:
    recorder = RecordingOffloader()
    for layer in decoder_layers(model):
        layer._posttrain_offloader = recorder
    return recorder


def assert_same(reference, candidate, tol=1e-10):
    ref_loss, ref_grads = reference
    loss, grads = candidate
    assert torch.allclose(loss, ref_loss, rtol=0, atol=tol), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=0, atol=tol), name


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("levers", [("offload",), ("tiled",), ("offload", "tiled")])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_levers_give_the_plain_loss_and_gradients(arch, levers, checkpointing):
    plain = build(arch)
    reference = loss_and_grads(plain)
    model = copy.deepcopy(plain)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if "offload" in levers:
        assert enable_activation_offloading(model) == 3
        recorder = record_offloads(model)
    if "tiled" in levers:
        assert enable_tiled_mlp(model, sequence_tile_size=8) == 3  # 37 tokens: 5 tiles, the last one short
    assert_same(reference, loss_and_grads(model))
    assert_same(reference, loss_and_grads(model))  # and again: nothing left over from the first step
    if "offload" in levers:
        assert len(recorder.packed) == 2 * 3  # one layer input per layer and step went through the hooks


@pytest.fixture(scope="module")
def own_pad_tokenizer():
    return build_tokenizer_variant("own_pad")


def matrix_loss_and_grads(model: torch.nn.Module, pad_id: int):
    """Loss and gradients over a right-padded batch (pads masked and unlabelled), in the model's default
    training configuration: ``use_cache`` on, so a model that makes a KV cache in training passes it to its layers."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, model.config.vocab_size, (2, 29), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    # three pads: with Gemma 2's 4-token sliding window no query sees only pads (its float64 SDPA would give NaN)
    attention_mask[1, -3:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, attention_mask=attention_mask,
                 labels=input_ids.masked_fill(attention_mask == 0, -100)).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


MOE_ARCHITECTURES = ("qwen3_moe", "mixtral")


class CountingRelease:
    """How many storages the offloaded backward freed from here on."""

    def __init__(self, monkeypatch):
        monkeypatch.setattr(offload._CpuSpill, "released", 0)

    @property
    def freed(self) -> int:
        return offload._CpuSpill.released


@pytest.mark.parametrize("arch", list(MATRIX_ARCHITECTURES))
@pytest.mark.parametrize("spill_everything", [False, True])
def test_levers_give_the_plain_loss_and_gradients_on_every_architecture(arch, spill_everything, own_pad_tokenizer,
                                                                       monkeypatch):
    """GPT-2 passes its KV cache to each block by position (which the recompute must not write twice), Gemma 2
    soft-caps, Granite scales, Phi-3 fuses gate and up, the MoE models route; all in float64. With every saved
    tensor spilled, as long rows are, the backward also frees each layer's recomputed output and its input
    read back from file: no layer may read them after."""
    released = CountingRelease(monkeypatch)
    if spill_everything:
        monkeypatch.setattr(offload, "SPILL_MIN_BYTES", 0)
    plain = build_tiny_model(arch, own_pad_tokenizer, num_hidden_layers=2, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0) if arch == "gpt2" else build_tiny_model(arch, own_pad_tokenizer,
                                                                                     num_hidden_layers=2)
    if arch in MOE_ARCHITECTURES:
        plain.set_experts_implementation("eager")  # the grouped-matmul experts take no float64
    plain = plain.double().train()
    assert plain.config.use_cache
    reference = matrix_loss_and_grads(plain, own_pad_tokenizer.pad_token_id)
    model = copy.deepcopy(plain)
    assert enable_activation_offloading(model) == 2
    assert_same(reference, matrix_loss_and_grads(model, own_pad_tokenizer.pad_token_id))
    if arch in MOE_ARCHITECTURES:
        with pytest.raises(ConfigError, match="mixture-of-experts"):
            enable_tiled_mlp(model, sequence_tile_size=8)
    else:
        assert enable_tiled_mlp(model, sequence_tile_size=8) == 2  # 29 tokens: 4 tiles, the last one short
    assert_same(reference, matrix_loss_and_grads(model, own_pad_tokenizer.pad_token_id))
    assert_same(reference, matrix_loss_and_grads(model, own_pad_tokenizer.pad_token_id))
    steps_times_layers = 3 * 2
    if arch in MOE_ARCHITECTURES:
        assert released.freed == 0  # router logits on: in-memory checkpointing, nothing recomputed here
    else:
        # every recomputed output; with everything spilled, every layer input too (each was read back from file)
        assert released.freed == steps_times_layers * (2 if spill_everything else 1)


def test_moe_layers_are_offloaded_unless_the_router_loss_needs_their_graph(own_pad_tokenizer):
    """With ``output_router_logits`` the layers fall back to in-memory checkpointing (the router loss's gradient
    needs the logits' graph); without it they go through the offload hooks like dense layers."""
    model = build_tiny_model("qwen3_moe", own_pad_tokenizer, num_hidden_layers=2).train()
    enable_activation_offloading(model)
    recorder = record_offloads(model)
    assert model.config.output_router_logits
    matrix_loss_and_grads(model, own_pad_tokenizer.pad_token_id)
    assert recorder.packed == []
    model.config.output_router_logits = False  # as router_aux_loss_coef=0.0 sets it, after the layers were wrapped
    matrix_loss_and_grads(model, own_pad_tokenizer.pad_token_id)
    assert len(recorder.packed) == 2


def test_offloaded_layers_keep_only_their_input():
    """Per layer, the forward saves one tensor (the layer input, through the offload hooks), nothing else."""

    def saves_of(layer, hidden, position_embeddings):
        outer = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: outer.append(t) or t, lambda t: t):
            out = layer(hidden, position_embeddings=position_embeddings, attention_mask=None)
        assert out.requires_grad
        return outer

    model = build()
    layer = decoder_layers(model)[0]
    hidden = model.model.embed_tokens(torch.randint(2, VOCAB, (1, 23)))
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(23)[None])
    assert len(saves_of(layer, hidden, position_embeddings)) > 5  # the plain layer keeps its intermediates

    enable_activation_offloading(model)
    recorder = record_offloads(model)
    assert saves_of(layer, hidden, position_embeddings) == []
    assert len(recorder.packed) == 1 and recorder.packed[0] is hidden


class StridedExpLayer(transformers.modeling_layers.GradientCheckpointingLayer):
    """A layer whose first operation saves a strided view of its input (never spilled: not dense) and whose
    last (exp) saves its own result, the layer output."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(width // 2, width)

    def forward(self, hidden_states, **kwargs):
        every_other = hidden_states[..., ::2]
        return torch.exp(self.linear(every_other * every_other) * 0.1)


class StridedExpStack(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.layers = torch.nn.ModuleList([StridedExpLayer(width), StridedExpLayer(width)])

    def forward(self, hidden_states):
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


@pytest.mark.parametrize("spill_everything", [True, False])
def test_recomputed_ends_that_the_backward_reads_are_not_freed(monkeypatch, spill_everything):
    """Only storages nothing saved by reference are freed. Spilling everything, the layer input (read back from
    file) stays, as a view of it was saved by reference, and the output (exp's saved result, spilled) goes;
    spilling nothing, the output stays (saved by reference) and the input belongs to the caller."""
    torch.manual_seed(0)
    plain = StridedExpStack(64).double().train()
    inputs = torch.randn(3, 40, 64, dtype=torch.float64, requires_grad=True)

    def grads(model):
        model.zero_grad(set_to_none=True)
        inputs.grad = None
        model(inputs).square().sum().backward()
        return [inputs.grad.clone(), *(p.grad.clone() for p in model.parameters())]

    reference = grads(plain)
    model = copy.deepcopy(plain)
    assert enable_activation_offloading(model) == 2
    monkeypatch.setattr(offload, "SPILL_MIN_BYTES", 0 if spill_everything else 1 << 30)
    released = CountingRelease(monkeypatch)
    for _ in range(2):
        for expected, got in zip(reference, grads(model)):
            assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert released.freed == (2 * 2 if spill_everything else 0)  # 2 steps x 2 layers x the output alone


def test_offloading_recomputes_with_the_forward_dropout():
    plain = build(dropout=0.3)
    reference = loss_and_grads(plain, seed=3)
    model = copy.deepcopy(plain)
    enable_activation_offloading(model)
    assert_same(reference, loss_and_grads(model, seed=3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_spilled_tensors_come_back_with_the_same_bytes_shape_and_strides(dtype):
    base = (torch.randn(3, 5, 7, 4) * 100).to(dtype)
    for tensor in (base, base.transpose(1, 2), base.permute(3, 0, 2, 1), base[1:]):
        loaded = offload.SpilledTensor(tensor).load()
        assert loaded.dtype == dtype and loaded.shape == tensor.shape and loaded.stride() == tensor.stride()
        assert torch.equal(loaded, tensor)


def test_cpu_offloading_moves_layer_inputs_out_of_process_memory():
    """On the CPU a large boundary tensor goes to a file: the offloader holds no reference to it."""
    layer_input = torch.randn(1024, 512)  # 2 MiB, above offload.SPILL_MIN_BYTES
    expected = layer_input.clone()
    alive = weakref.ref(layer_input)
    offloader = offload._BoundaryOffloader()
    packed = offloader.pack(layer_input)
    del layer_input
    assert alive() is None  # its memory was given back
    assert torch.equal(offloader.unpack(packed), expected)
    small = torch.randn(4, 4)
    assert offloader.pack(small) is small  # not worth a file


def test_a_failed_spill_keeps_the_tensor_with_a_warning(monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(offload.tempfile, "TemporaryFile", no_space)
    layer_input = torch.randn(1024, 512)
    with pytest.warns(UserWarning, match="TMPDIR"):
        assert offload._BoundaryOffloader().pack(layer_input) is layer_input


class CountingSpill(offload.SpilledTensor):
    __slots__ = ("storage",)
    made = []

    def __init__(self, tensor, directory=None):
        super().__init__(tensor, directory)
        self.storage = tensor.untyped_storage().data_ptr()
        CountingSpill.made.append(self)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tiled", [False, True])
def test_spilling_every_saved_tensor_gives_the_plain_loss_and_gradients(monkeypatch, arch, tiled):
    """With every size spilled, layer inputs and the recompute's saved tensors go through files; values unchanged."""
    plain = build(arch)
    reference = loss_and_grads(plain)
    model = copy.deepcopy(plain)
    enable_activation_offloading(model)
    if tiled:
        enable_tiled_mlp(model, sequence_tile_size=8)
    monkeypatch.setattr(offload, "SPILL_MIN_BYTES", 0)
    monkeypatch.setattr(offload, "SpilledTensor", CountingSpill)
    CountingSpill.made = []
    assert_same(reference, loss_and_grads(model))
    assert_same(reference, loss_and_grads(model))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # more than the 2 x 3 layer inputs: the recompute's own saved tensors were spilled as well, never a weight
    assert len(CountingSpill.made) > 2 * 3 * 4
    assert not parameters & {spilled.storage for spilled in CountingSpill.made}


def test_the_head_forward_keeps_no_layer_output_alive():
    """Only the final hidden state comes back: the layer outputs are not held until the head is done."""
    model = build()
    input_ids = torch.randint(2, VOCAB, (2, 9))
    hidden_states = forward_without_logits(model, input_ids).hidden_states
    assert sum(state is not None for state in hidden_states) == 1
    expected = model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(hidden_states[-1], expected)


def test_offloading_and_tiling_leave_weights_and_eval_alone():
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enable_activation_offloading(model)
    enable_activation_offloading(model)  # idempotent
    enable_tiled_mlp(model, 4)
    assert activation_offloading_enabled(model) and not activation_offloading_enabled(build())
    assert model.state_dict().keys() == before.keys()
    input_ids = torch.randint(2, VOCAB, (2, 9))
    with torch.no_grad():
        logits = model.eval()(input_ids).logits
        expected = build().eval()(input_ids).logits
    assert torch.allclose(logits, expected, rtol=0, atol=1e-12)
    copy.deepcopy(model)  # a reference copy of a prepared model


def test_models_without_the_wrapped_parts_are_refused():
    head_only = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="activation_offloading"):
        enable_activation_offloading(head_only)
    with pytest.raises(ConfigError, match="tiled_mlp"):
        enable_tiled_mlp(head_only, 16)
    with pytest.raises(ConfigError, match="sequence_tile_size"):
        enable_tiled_mlp(build(), 0)
    assert len(position_wise_mlps(build())) == 3


ATTENTION_PROBE = """
import sys, torch, transformers
torch.set_num_threads(1)
tokens = int(sys.argv[1])
config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64, max_position_embeddings=tokens)
torch.manual_seed(0)
model = transformers.Qwen2ForCausalLM(config).train()
assert model.config._attn_implementation == "sdpa"
input_ids = torch.randint(0, 64, (1, tokens))
def high_water_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
before = high_water_mb()
model(input_ids=input_ids, labels=input_ids).loss.backward()
print(high_water_mb() - before)
"""


@pytest.mark.slow  # about 15-30 s on a shared 2-core machine, most of it the forward and backward
def test_attention_never_holds_a_tokens_by_tokens_matrix():
    """SDPA's fused path: a forward and backward over one 32k-token row stay far below one head's T x T scores.

    (Measured: a rise of about 156 MB, against 4,096 MB for one head's float32 scores.)
    """
    tokens = 32_768

    done = subprocess.run([sys.executable, "-c", ATTENTION_PROBE, str(tokens)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rise_mb = float(done.stdout.split()[-1])
    one_head_scores_mb = tokens * tokens * 4 / 2**20  # float32 scores of one head; the model has 2
    assert rise_mb < one_head_scores_mb / 8, (rise_mb, one_head_scores_mb)
