"""Activation offloading: per-layer checkpointing whose saved layer inputs leave the accelerator.

With ``activation_offloading=True`` (TRL's name) each decoder layer of the model runs its forward
without keeping any intermediate tensor. The one tensor it keeps is its input hidden state
``(B, T, d)``, the boundary between layers, and that tensor goes through a
``torch.autograd.graph.saved_tensors_hooks`` pair:

* on CUDA the pack hook copies it into pinned CPU memory on a side stream (asynchronously, so the
  next layer's forward overlaps the copy), and the unpack hook copies it back when the backward
  reaches the layer;
* on the CPU the process's memory is what there is to save, so it is written to an unlinked temporary
  file (in ``tempfile.gettempdir()``, i.e. ``$TMPDIR``) with plain ``write`` and read back with
  ``readinto``. Written pages sit in the kernel's page cache, which is not the process's resident
  memory and which the kernel can write out and evict; memory-mapping the file instead did not lower
  the peak resident memory (mapped pages count as resident; see docs/long-sequences.md).

In the backward each layer is recomputed from its input (under the same autocast and random-number
state as the forward) and differentiated at once, so at most one layer's intermediates exist at a
time. On the CPU the tensors that recompute saves for its own backward (normalised inputs, queries,
keys, values, the attention output, ...) are spilled the same way, so while the backward goes
through the MLP the attention's saved tensors are on file rather than in memory, and the recomputed
layer output and the layer input read back from file, whose values no gradient reads, are freed
unless something else holds them. Values are
unchanged: a spilled tensor comes back with the same bytes, shape and strides. Gradients reach the
layer input and the layer's parameters exactly as without offloading.
"""

from __future__ import annotations

import ctypes
import sys
import tempfile
import types
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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


SPILL_MIN_BYTES = 1 << 20
"""CPU tensors smaller than this stay in memory (a file per tensor costs more than it saves)."""


def _is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill one gap-free, non-overlapping stretch of its storage (any order)."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a dense CPU tensor, in storage order (a view, no copy; valid while ``tensor`` lives).

    Through ctypes rather than ``.numpy()``, which would make the storage non-resizable for good, and the
    backward frees some of these storages by resizing them (:meth:`_CpuSpill.release`).
    """
    start = tensor.detach().as_strided((tensor.numel(),), (1,)).data_ptr()
    return memoryview((ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(start)).cast("B")


class SpilledTensor:
    """A CPU tensor's bytes in an unlinked temporary file; :meth:`load` gives back the same tensor.

    Written with plain ``write``: the pages go to the kernel's page cache, not to the process's
    resident memory, and the file's space is freed when this object is (the file was unlinked at once).
    """

    __slots__ = ("_file", "shape", "stride", "dtype")

    def __init__(self, tensor: torch.Tensor, directory: str | None = None) -> None:
        self.shape, self.stride, self.dtype = tensor.shape, tensor.stride(), tensor.dtype
        self._file = tempfile.TemporaryFile(dir=directory)
        self._file.write(_raw_bytes(tensor))
        self._file.flush()

    def load(self) -> torch.Tensor:
        tensor = torch.empty_strided(self.shape, self.stride, dtype=self.dtype)
        target = _raw_bytes(tensor)
        self._file.seek(0)
        filled = 0
        while filled < len(target):
            count = self._file.readinto(target[filled:])
            if not count:
                raise OSError(f"activation_offloading: spill file ended after {filled} of {len(target)} bytes")
            filled += count
        return tensor

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()


class _CpuSpill:
    """``saved_tensors_hooks`` callbacks that spill large dense CPU tensors to files, except those in ``keep``.

    ``keep``: storage addresses of tensors held in memory anyway (a layer's parameters, buffers and
    call arguments), whose spilled copy would only add a write and, in the backward, a second copy.
    """

    released = 0
    """How many storages :meth:`release` has freed in this process."""

    def __init__(self, keep: frozenset[int] = frozenset(), min_bytes: int | None = None) -> None:
        self.keep = keep
        self.min_bytes = SPILL_MIN_BYTES if min_bytes is None else min_bytes
        self.held: set[int] = set()  # storages of the tensors saved by reference rather than spilled

    def pack(self, tensor: torch.Tensor) -> Any:
        if (tensor.device.type != "cpu" or tensor.numel() * tensor.element_size() < self.min_bytes
                or type(tensor) is not torch.Tensor or tensor.layout != torch.strided or tensor.is_quantized
                or not _is_dense(tensor) or tensor.untyped_storage().data_ptr() in self.keep):
            return self._by_reference(tensor)
        try:
            return SpilledTensor(tensor)
        except OSError as error:  # e.g. a full or read-only $TMPDIR: keep it, as the plain path would
            warnings.warn(f"activation_offloading could not spill a saved tensor to {tempfile.gettempdir()} "
                          f"({error}); keeping it in memory. Point TMPDIR at a disk with free space.", stacklevel=2)
            return self._by_reference(tensor)

    def _by_reference(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu":
            self.held.add(tensor.untyped_storage().data_ptr())
        return tensor

    def release(self, tensor: torch.Tensor) -> None:
        """Free the memory of ``tensor``, an end of a graph recomputed under these hooks (its output, or its
        input when that is a private copy read back from file), unless the backward may read it.

        The backward reads what the graph saved: a spilled copy, or the tensor itself when saved by reference
        (recorded by :meth:`pack`). A view of the storage or another tensor on it elsewhere raises torch's
        count of the storage's holders, and then the memory stays too, as it does without torch's count.
        """
        if (tensor.device.type != "cpu" or tensor.untyped_storage().data_ptr() in self.held | self.keep
                or not _storage_unshared(tensor)):
            return
        tensor.untyped_storage().resize_(0)
        _CpuSpill.released += 1

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.load() if isinstance(packed, SpilledTensor) else packed


def _storage_unshared(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is the only tensor on its storage (no view, no saved copy of its handle elsewhere).
    False when this torch has no count of a storage's holders."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    # the storage's holders while asking: the tensor and the storage object taken from it here
    return use_count is not None and use_count(tensor.untyped_storage()._cdata) == 2


def _private(tensor: torch.Tensor) -> bool:
    """Whether only the caller's one variable holds ``tensor`` and its memory: no other reference to it and no
    other tensor on its storage."""
    # getrefcount counts its argument and this function's parameter besides the caller's variable
    return sys.getrefcount(tensor) == 3 and _storage_unshared(tensor)


def _storages(tensors) -> frozenset[int]:
    return frozenset(t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor))


class _BoundaryOffloader:
    """``saved_tensors_hooks`` callbacks that move saved layer inputs out of the device's memory and back.

    CUDA tensors go to pinned CPU memory on a side stream; CPU tensors go to a temporary file
    (:class:`SpilledTensor`).
    """

    def __init__(self) -> None:
        self._stream = None

    def __deepcopy__(self, memo) -> "_BoundaryOffloader":
        return _BoundaryOffloader()  # a copied model (a reference) gets its own side stream

    def pack(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type != "cuda":
            return _CpuSpill().pack(tensor)
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
        if isinstance(packed, SpilledTensor):
            return packed.load()
        host, device, copied = packed
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)


class _OffloadedCheckpoint(torch.autograd.Function):
    """``run(hidden_states)`` with only ``hidden_states`` saved; recomputed and differentiated in backward.

    Parameters that need gradients are inputs of the function, so their gradients come back through
    autograd (and its hooks) like any other input's.
    """

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], torch.Tensor], keep: frozenset[int], hidden_states: torch.Tensor,
                *params: torch.Tensor):
        ctx.run = run
        ctx.keep = keep
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
        hidden_states = saved
        del saved
        params = ctx.needs_input_grad[3:]
        needs_input_grad = ctx.needs_input_grad[2]
        hidden_states = hidden_states.detach().requires_grad_(needs_input_grad)
        devices = [hidden_states.device] if ctx.device_type == "cuda" else []
        # a layer input read back from file is this backward's own copy: what the recompute saves of it is
        # spilled and the copy freed below. One held elsewhere (by the caller) stays, never worth a file
        private_input = ctx.device_type == "cpu" and _private(hidden_states)
        # on the CPU the recompute's own saved tensors go to files too: while the backward runs through the
        # MLP, the attention's queries, keys, values and output wait on file instead of in memory
        keep = ctx.keep if private_input else ctx.keep | _storages([hidden_states])
        spill = _CpuSpill(keep) if ctx.device_type == "cpu" else None
        hooks = torch.autograd.graph.saved_tensors_hooks(spill.pack, spill.unpack) if spill else nullcontext()
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), hooks:
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, hidden_states.device)
            with torch.autocast(ctx.device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                output = ctx.run(hidden_states)
        if spill is not None:
            # the graph's ends: differentiating needs their shapes, not their values. Freed unless something
            # saved them by reference: a (T, hidden) tensor each less while this layer's backward runs
            spill.release(output)
            if private_input:
                spill.release(hidden_states)
        inputs = ([hidden_states] if needs_input_grad else []) + [
            p for p, needed in zip(ctx.param_refs, params) if needed
        ]
        grads = iter(torch.autograd.grad(output, inputs, grad_output, allow_unused=True)) if inputs else iter(())
        del output, inputs
        grad_hidden = next(grads) if needs_input_grad else None
        grad_params = [next(grads) if needed else None for needed in params]
        ctx.run = ctx.param_refs = None
        return (None, None, grad_hidden, *grad_params)


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


def plain_without_grad(forward: Callable) -> Callable:
    """Mark ``forward`` as a memory lever's replacement forward that, without gradients, is the module's own.

    The rollout engine's lean decode step reads a model's weights instead of calling its forwards, which is
    only equivalent for forwards it knows; these (activation offloading, the tiled MLP) it may skip.
    """
    forward._posttrain_plain_without_grad = True
    return forward


def runs_plain_without_grad(module: nn.Module) -> bool:
    """Whether ``module``'s forward was replaced by one marked with :func:`plain_without_grad`."""
    replaced = vars(module).get("forward")
    return getattr(getattr(replaced, "__func__", replaced), "_posttrain_plain_without_grad", False)


def _is_kv_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


@plain_without_grad
def _offloaded_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    plain_forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return plain_forward(self, hidden_states, *args, **kwargs)  # no backward to prepare for
    # as under transformers' own checkpointing: a KV cache would be written a second time by the recompute
    # (a training forward only fills one it made itself; prompt sharing is off while layers are offloaded).
    # Some models pass it by position (GPT-2's blocks take it second), so it is found by type, not by name
    args = tuple(None if _is_kv_cache(value) else value for value in args)
    for name, value in kwargs.items():
        if name in ("cache", "past_key_values", "past_key_value", "layer_past") or _is_kv_cache(value):
            kwargs[name] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False

    def run(layer_input: torch.Tensor) -> torch.Tensor:
        with _own_checkpointing_off(self):
            return plain_forward(self, layer_input, *args, **kwargs)

    if getattr(self._posttrain_model_config, "output_router_logits", False):
        # a MoE model's router logits are collected by hooks for its load-balancing loss; inside the offloaded
        # function (which runs without a graph) they would be collected detached and that loss would train
        # nothing. Plain non-reentrant checkpointing keeps their graph; the layer input then stays in memory
        return checkpoint(run, hidden_states, use_reentrant=False)
    params = [p for p in self.parameters() if p.requires_grad]
    # held in memory anyway while the layer's backward runs: never worth a spilled copy
    keep = _storages([*self.parameters(), *self.buffers(), *args, *kwargs.values(),
                      *(t for value in kwargs.values() if isinstance(value, tuple) for t in value)])
    offloader = self._posttrain_offloader
    with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
        return _OffloadedCheckpoint.apply(run, keep, hidden_states, *params)


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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for layer in layers:
        if getattr(layer, _MARK, False):
            continue
        layer._posttrain_offloader = offloader
        # read at every forward: a trainer may turn the router loss on or off after this
        layer._posttrain_model_config = text_config
        layer.forward = types.MethodType(_offloaded_forward, layer)
        setattr(layer, _MARK, True)
    return len(layers)


def activation_offloading_enabled(model: nn.Module) -> bool:
    return any(getattr(module, _MARK, False) for module in model.modules())

