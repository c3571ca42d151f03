"""One decode step for Llama-family causal LMs without the Hugging Face forward around it.

When a small model decodes one token per row, its ``forward`` spends most of the step in Python:
building a 4-D attention mask, threading keyword arguments through every layer, output
dataclasses, decorators. None of that is needed once the rollout engine owns the KV cache, the
attention mask and the positions. :class:`LeanDecoder` runs the model's own modules and weights
through the same arithmetic (RMSNorm in float32, cos/sin from the model's rotary module, SDPA with
the model's scaling, the model's activation) and writes the engine's cache. On the benchmark's
4-layer Qwen2 a token costs 3.1 ms instead of 4.3 ms (see ``docs/rollout.md``).

:meth:`LeanDecoder.build` returns ``None`` for anything it does not know to be equivalent
(another architecture, sliding-window layers, length-dependent rotary scaling, modules with
hooks, e.g. ``accelerate`` offloading, a forward that accelerate wrapped in autocast while no autocast
is active), and the engine then calls the model's forward as before.
Linear layers that are not plain ``nn.Linear`` (LoRA, quantised) are called as modules, so
adapters and ``disable_adapter()`` behave as in the model's forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
# rotary types whose cos/sin at a position do not depend on the sequence length seen so far
POSITION_ONLY_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


def _linear(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if type(module) is torch.nn.Linear:
        # the tensors themselves, looked up once per generate: two Module.__getattr__ calls per linear per token
        # were about a tenth of the step's Python time
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _rms_norm(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """RMSNorm as Llama/Qwen compute it: normalise in float32, cast back, then scale."""
    weight = module.weight
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = module.eps
    width = (weight.shape[-1],)

    def norm(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return weight * F.rms_norm(x, width, eps=eps)
        return weight * F.rms_norm(x.float(), width, eps=eps).to(x.dtype)

    return norm


def _sdpa_groups_masked_heads() -> bool:
    """Whether transformers' SDPA attention passes ``enable_gqa`` with a mask (a forced setting, XPU or MPS
    backends) rather than packing a single query token's heads; True when the helper is not found."""
    try:
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa
    except ImportError:
        return True
    probe = torch.empty(0, 1, 0, 1)
    return use_gqa_in_sdpa(probe, probe, probe)


def _forward_replaced(model: torch.nn.Module) -> bool:
    """Whether ``forward`` was replaced on an instance, as accelerate does to run a model under autocast for
    mixed precision. The lean step never calls ``forward``; it matches such a model only when the caller
    already runs under autocast (the trainers sample under ``accelerator.autocast()``). The layers and MLPs
    wrapped by ``activation_offloading`` and ``tiled_mlp`` do not count: for one token per row without
    gradients they run their own forward."""
    from posttrain.models.offload import runs_plain_without_grad

    return any("forward" in vars(module) and not runs_plain_without_grad(module) for module in model.modules())


class _Layer:
    """The per-layer callables and sizes, gathered once per ``generate``."""

    def __init__(self, layer: torch.nn.Module, config) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = _rms_norm(layer.input_layernorm)
        self.post_attention_norm = _rms_norm(layer.post_attention_layernorm)
        self.q, self.k, self.v, self.o = (_linear(getattr(attention, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.q_norm = _rms_norm(attention.q_norm) if hasattr(attention, "q_norm") else None
        self.k_norm = _rms_norm(attention.k_norm) if hasattr(attention, "k_norm") else None
        self.gate, self.up, self.down = (_linear(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        self.act = mlp.act_fn
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads


def _has_hooks(model: torch.nn.Module) -> bool:
    """Whether a module carries a hook the lean step would skip. ``transformers`` installs output-capturing
    hooks the first time hidden states are requested; they do nothing unless outputs are being captured."""
    for module in model.modules():
        if module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return True
        if any(getattr(hook, "__name__", "") != "output_capturing_hook" for hook in module._forward_hooks.values()):
            return True
    return False


class LeanDecoder:
    """Decodes one token per row for a supported model, reading and writing a ``DynamicCache``.

    Build it with :meth:`build` (``None`` when the model is not supported), call :meth:`prepare`
    once per ``generate`` with the longest position needed, then :meth:`step` per token.
    """

    def __init__(self, base: torch.nn.Module) -> None:
        self.base = base
        self.config = base.config
        self._layers: list[_Layer] = []
        self._cos = self._sin = None

    @classmethod
    def build(cls, model: torch.nn.Module) -> LeanDecoder | None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if type(base).__name__ not in SUPPORTED_ARCHITECTURES:
            return None
        config = base.config
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
            return None
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") not in POSITION_ONLY_ROPE_TYPES:
            return None
        if _has_hooks(model):
            return None
        if _forward_replaced(model) and not torch.is_autocast_enabled(base.device.type):
            return None
        inner = getattr(base, "model", None)
        if inner is None or not all(hasattr(inner, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return None
        return cls(base)

    def prepare(self, max_positions: int, device: torch.device) -> None:
        """Gather the layers (weights may have changed since the last call) and the cos/sin tables."""
        inner = self.base.model
        self._layers = [_Layer(layer, self.config) for layer in inner.layers]
        self._embed = inner.embed_tokens
        self._final_norm = _rms_norm(inner.norm)
        self._lm_head = _linear(self.base.lm_head)
        dtype = self._embed.weight.dtype
        positions = torch.arange(max_positions, device=device).unsqueeze(0)
        cos, sin = inner.rotary_emb(torch.empty(0, device=device, dtype=dtype), positions)
        half = cos.shape[-1] // 2
        self._cos = cos[0]
        # rotate_half(x) * sin == x.roll(half) * [-sin[:half], sin[half:]]: one op instead of three
        self._sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Logits ``(B, V)`` in float32 for the next token, after ``tokens`` ``(B,)`` at ``positions`` ``(B,)``.

        ``attention_mask`` ``(B, W)`` covers the cached columns plus this token's; the cache gains one column.
        """
        batch = tokens.shape[0]
        hidden = self._embed(tokens.unsqueeze(1))
        cos = self._cos[positions].unsqueeze(1).unsqueeze(1)
        sin = self._sin_signed[positions].unsqueeze(1).unsqueeze(1)
        masked_out = (attention_mask == 0)[:, None, None, :]
        mask = None
        # transformers' SDPA attention passes no mask when no column is padded and lets SDPA group the query
        # heads (enable_gqa); with a mask it packs each key/value head's query heads as a query of that many
        # positions instead. The two round differently, so the lean step makes the same choice
        pack_queries = bool(masked_out.any()) and not _sdpa_groups_masked_heads()
        for index, layer in enumerate(self._layers):
            x = layer.input_norm(hidden)
            q = layer.q(x).view(batch, 1, layer.num_heads, layer.head_dim).transpose(1, 2)
            k = layer.k(x).view(batch, 1, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
            v = layer.v(x).view(batch, 1, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            half = layer.head_dim // 2
            q = q * cos + q.roll(half, dims=-1) * sin
            k = k * cos + k.roll(half, dims=-1) * sin
            keys, values = cache.layers[index].update(k, v)
            if mask is None:
                # additive mask built once per token, not once per layer: SDPA turns a boolean mask into exactly
                # this (0 where attended, -inf elsewhere) at every call; in the query's dtype, as SDPA requires
                mask = torch.zeros(masked_out.shape, dtype=q.dtype, device=q.device).masked_fill_(masked_out, float("-inf"))
            groups = layer.num_heads // layer.num_kv_heads
            if groups > 1 and pack_queries:
                packed = q.reshape(batch, layer.num_kv_heads, groups, layer.head_dim)
                out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=layer.scaling)
                out = out.reshape(batch, layer.num_heads, 1, layer.head_dim)
            else:
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=layer.scaling, enable_gqa=groups > 1
                )
            hidden = hidden + layer.o(out.transpose(1, 2).reshape(batch, 1, -1))
            x = layer.post_attention_norm(hidden)
            hidden = hidden + layer.down(layer.act(layer.gate(x)) * layer.up(x))
        return self._lm_head(self._final_norm(hidden[:, -1])).float()
