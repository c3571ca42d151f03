"""Sequence tiling of the MLP: the ``(tokens x intermediate)`` activations never live whole.

A transformer's MLP -- Llama/Qwen2-style ``down(act(gate(x)) * up(x))``, Phi-3's with gate and up
in one projection, GPT-2's two ``Conv1D`` layers -- acts on each position on its own, so it
can run over tiles of the sequence and the outputs be concatenated. With ``tiled_mlp=True`` each
tile of ``sequence_tile_size`` positions runs under non-reentrant checkpointing: the forward keeps
only the tile's input (a view of the MLP input, which the layer holds anyway) and the backward
recomputes one tile at a time. The largest MLP tensor alive is then ``(tile, intermediate)`` rather
than ``(T, intermediate)``, in the forward and in the backward; the result equals the untiled MLP
(the same operations on the same rows). The idea is Snowflake's Arctic Long Sequence Training
("TiledMLP", arXiv:2506.13996); the name ``tiled_mlp`` follows Axolotl's option.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from posttrain.errors import ConfigError
from posttrain.models.offload import plain_without_grad

_MARK = "_posttrain_sequence_tile_size"


# the projections that identify a dense position-wise MLP: gated (Llama, Qwen, Mistral, Gemma, Granite, OLMo),
# gated with gate and up fused in one projection (Phi-3), two layers (GPT-2's Conv1D pair)
MLP_PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj"), ("c_fc", "c_proj"))


def _is_position_wise_mlp(name: str, module: nn.Module) -> bool:
    if name.rsplit(".", 1)[-1] != "mlp" or hasattr(module, "experts"):
        return False
    # nn.Module, not nn.Linear: a LoRA-wrapped projection is still position-wise
    return any(all(isinstance(getattr(module, proj, None), nn.Module) for proj in projections)
               for projections in MLP_PROJECTIONS)


def position_wise_mlps(model: nn.Module) -> list[nn.Module]:
    """The dense MLPs of ``model``'s layers (modules named ``mlp`` with the projections of :data:`MLP_PROJECTIONS`).

    Mixture-of-experts blocks are not among them: their routing is position-wise too, but they return
    router logits beside the hidden states and some drop tokens by capacity over the whole batch.
    """
    return [module for name, module in model.named_modules() if _is_position_wise_mlp(name, module)]


@plain_without_grad  # a single position per row (decoding) is never tiled
def _tiled_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    plain_forward = type(self).forward
    tile_size = getattr(self, _MARK)
    if hidden_states.dim() < 2 or hidden_states.shape[-2] <= tile_size:
        return plain_forward(self, hidden_states)
    tiles = hidden_states.split(tile_size, dim=-2)

    def run(tile: torch.Tensor) -> torch.Tensor:
        # a tile of a batch of several rows is strided; GPT-2's Conv1D views its input flat. Made contiguous
        # inside the checkpoint, so that what the forward keeps is the view, not a copy
        return plain_forward(self, tile.contiguous())

    if torch.is_grad_enabled():
        outputs = [checkpoint(run, tile, use_reentrant=False) for tile in tiles]
    else:
        outputs = [run(tile) for tile in tiles]
    return torch.cat(outputs, dim=-2)


def enable_tiled_mlp(model: nn.Module, sequence_tile_size: int) -> int:
    """Make every dense MLP of ``model`` run over tiles of ``sequence_tile_size`` positions (in place).

    Returns how many MLPs were tiled; calling it again changes the tile size. Parameters and
    state-dict keys are unchanged. A model with no such MLP is a :class:`ConfigError`.
    """
    if isinstance(sequence_tile_size, bool) or not isinstance(sequence_tile_size, int) or sequence_tile_size < 1:
        raise ConfigError(f"sequence_tile_size must be a positive integer, got {sequence_tile_size!r}",
                          field="sequence_tile_size", fix="pass e.g. --sequence_tile_size 2048")
    mlps = position_wise_mlps(model)
    if not mlps:
        raise ConfigError(
            f"tiled_mlp found no dense MLP in {type(model).__name__} (a module named 'mlp' with "
            f"{' / '.join('+'.join(projections) for projections in MLP_PROJECTIONS)}; mixture-of-experts blocks "
            "are not tiled)", field="tiled_mlp", fix="drop tiled_mlp for this architecture",
        )
    for mlp in mlps:
        setattr(mlp, _MARK, sequence_tile_size)
        mlp.forward = types.MethodType(_tiled_forward, mlp)
    return len(mlps)
