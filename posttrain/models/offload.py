"""Activation offloading: per-layer checkpointing whose saved layer inputs leave the accelerator.

With ``activation_offloading=True`` (TRL's name) each decoder layer of the model runs its forward
without keeping any intermediate tensor. The one tensor it keeps is its input hidden state
``(B, T, d)``, the boundary between layers, and that tensor goes through a
``torch.autograd.graph.saved_tensors_hooks`` pair:

* on CUDA the pack hook copies it into pinned CPU memory on a side stream (asynchronously, so the
  next layer's forward overlaps the copy), and the unpack hook copies it back when the backward
  reaches the layer;
* on the CPU it is kept as it is: the boundary tensors are all that remains of the forward, which
  is what per-layer checkpointing saves. (Spilling them to a memory-mapped file did not lower the
  process's peak resident memory on the CPU machine we measured: see docs/long-sequences.md.)

In the backward each layer is recomputed from its input (under the same autocast and random-number
state as the forward) and differentiated at once, so at most one layer's intermediates exist at a
time. Gradients reach the layer input and the layer's parameters exactly as without offloading.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn

from posttrain.errors import ConfigError

_MARK = "_posttrain_offloaded_forward"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost transformer blocks of ``model`` (transformers' ``GradientCheckpointingLayer``s)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # parents come before their children
        if id(module) in inside:
            continue
        if isinstance(module, GradientCheckpointingLayer):
            found.append(module)
            inside.update(id(child) for child in module.modules())
    return found


class _BoundaryOffloader:
    """``saved_tensors_hooks`` callbacks that move saved CUDA tensors to pinned CPU memory and back."""

    def __init__(self) -> None:
        self._stream = None

    def __deepcopy__(self, memo) -> "_BoundaryOffloader":
        return _BoundaryOffloader()  # a copied model (a reference) gets its own side stream

    def pack(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type != "cuda":
            return tensor  # CPU: the boundary tensor is kept as it is
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=tensor.device)
        self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self._stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        tensor.record_stream(self._stream)  # the allocator must not reuse it before the copy is done
        return host, tensor.device, copied

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        host, device, copied = packed
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)


class _OffloadedCheckpoint(torch.autograd.Function):
    """``run(hidden_states)`` with only ``hidden_states`` saved; recomputed and differentiated in backward.

    Parameters that need gradients are inputs of the function, so their gradients come back through
    autograd (and its hooks) like any other input's.
    """

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], torch.Tensor], hidden_states: torch.Tensor, *params: torch.Tensor):
        ctx.run = run
        # parameters are leaves held by the model anyway: kept by reference, not saved (saving would send
        # every weight through the offload hooks)
        ctx.param_refs = params
        ctx.device_type = hidden_states.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden_states.device) if ctx.device_type == "cuda" else None
        ctx.save_for_backward(hidden_states)
        with torch.autocast(ctx.device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            output = run(hidden_states)
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"activation_offloading wraps decoder layers that return one tensor; this layer returned "
                f"{type(output).__name__}", field="activation_offloading",
                fix="drop activation_offloading and use gradient_checkpointing=True for this architecture",
            )
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (saved,) = ctx.saved_tensors
        params = ctx.needs_input_grad[2:]
        hidden_states = saved.detach().requires_grad_(ctx.needs_input_grad[1])
        devices = [saved.device] if ctx.device_type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, saved.device)
            with torch.autocast(ctx.device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                output = ctx.run(hidden_states)
        inputs = ([hidden_states] if ctx.needs_input_grad[1] else []) + [
            p for p, needed in zip(ctx.param_refs, params) if needed
        ]
        grads = iter(torch.autograd.grad(output, inputs, grad_output, allow_unused=True)) if inputs else iter(())
        grad_hidden = next(grads) if ctx.needs_input_grad[1] else None
        grad_params = [next(grads) if needed else None for needed in params]
        ctx.run = ctx.param_refs = None
        return (None, grad_hidden, *grad_params)


@contextmanager
def _own_checkpointing_off(layer: nn.Module):
    """Keep transformers' own checkpointing of ``layer`` out of the way while the layer runs here."""
    own = layer.__dict__.get("gradient_checkpointing", None)
    layer.gradient_checkpointing = False
    try:
        yield
    finally:
        if own is None:
            del layer.gradient_checkpointing
        else:
            layer.gradient_checkpointing = own


def _offloaded_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    plain_forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return plain_forward(self, hidden_states, *args, **kwargs)  # no backward to prepare for
    # as under transformers' own checkpointing: a KV cache would be written a second time by the recompute
    # (a training forward only fills one it made itself; prompt sharing is off while layers are offloaded)
    for name in ("cache", "past_key_values", "past_key_value"):
        if kwargs.get(name) is not None:
            kwargs[name] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False

    def run(layer_input: torch.Tensor) -> torch.Tensor:
        with _own_checkpointing_off(self):
            return plain_forward(self, layer_input, *args, **kwargs)

    params = [p for p in self.parameters() if p.requires_grad]
    offloader = self._posttrain_offloader
    with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
        return _OffloadedCheckpoint.apply(run, hidden_states, *params)


def enable_activation_offloading(model: nn.Module) -> int:
    """Run every decoder layer of ``model`` through offloaded checkpointing (in place); the number wrapped.

    Idempotent. The layers' parameters and state-dict keys are unchanged. A model without
    transformers decoder layers is a :class:`ConfigError`.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"activation_offloading found no transformer decoder layers in {type(model).__name__}",
            field="activation_offloading",
            fix="drop activation_offloading (use gradient_checkpointing=True) for this model",
        )
    offloader = _BoundaryOffloader()
    for layer in layers:
        if getattr(layer, _MARK, False):
            continue
        layer._posttrain_offloader = offloader
        layer.forward = types.MethodType(_offloaded_forward, layer)
        setattr(layer, _MARK, True)
    return len(layers)


def activation_offloading_enabled(model: nn.Module) -> bool:
    return any(getattr(module, _MARK, False) for module in model.modules())

