"""Sequence tiling of the MLP: the ``(tokens x intermediate)`` activations never live whole.

A Llama/Qwen2-style MLP, ``down(act(gate(x)) * up(x))``, acts on each position on its own, so it
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

_MARK = "_posttrain_sequence_tile_size"


def position_wise_mlps(model: nn.Module) -> list[nn.Module]:
    """The dense gated MLPs (``gate_proj``, ``up_proj``, ``down_proj``) of ``model``'s layers.

    Mixture-of-experts blocks are not among them: their routing is position-wise too, but they return
    router logits beside the hidden states and some drop tokens by capacity over the whole batch.
    """
    return [
        module for name, module in model.named_modules()
        # nn.Module, not nn.Linear: a LoRA-wrapped projection is still position-wise
        if name.rsplit(".", 1)[-1] == "mlp" and all(isinstance(getattr(module, proj, None), nn.Module)
                                                   for proj in ("gate_proj", "up_proj", "down_proj"))
    ]


def _tiled_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    plain_forward = type(self).forward
    tile_size = getattr(self, _MARK)
    if hidden_states.dim() < 2 or hidden_states.shape[-2] <= tile_size:
        return plain_forward(self, hidden_states)
    tiles = hidden_states.split(tile_size, dim=-2)
    if torch.is_grad_enabled():
        outputs = [checkpoint(plain_forward, self, tile, use_reentrant=False) for tile in tiles]
    else:
        outputs = [plain_forward(self, tile) for tile in tiles]
    return torch.cat(outputs, dim=-2)


def enable_tiled_mlp(model: nn.Module, sequence_tile_size: int) -> int:
    """Make every gated MLP of ``model`` run over tiles of ``sequence_tile_size`` positions (in place).

    Returns how many MLPs were tiled; calling it again changes the tile size. Parameters and
    state-dict keys are unchanged. A model with no such MLP is a :class:`ConfigError`.
    """
    if isinstance(sequence_tile_size, bool) or not isinstance(sequence_tile_size, int) or sequence_tile_size < 1:
        raise ConfigError(f"sequence_tile_size must be a positive integer, got {sequence_tile_size!r}",
                          field="sequence_tile_size", fix="pass e.g. --sequence_tile_size 2048")
    mlps = position_wise_mlps(model)
    if not mlps:
        raise ConfigError(
            f"tiled_mlp found no gated MLP (gate_proj, up_proj, down_proj) in {type(model).__name__}",
            field="tiled_mlp", fix="drop tiled_mlp for this architecture",
        )
    for mlp in mlps:
        setattr(mlp, _MARK, sequence_tile_size)
        mlp.forward = types.MethodType(_tiled_forward, mlp)
    return len(mlps)
