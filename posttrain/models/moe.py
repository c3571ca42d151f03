"""The load-balancing loss of Mixture-of-Experts models (``router_aux_loss_coef``).

A MoE model in transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) declares ``output_router_logits`` in
its config; when it is True its forward returns ``aux_loss``, the auxiliary loss that keeps the
router spreading tokens over its experts. Trainers ask the model for hidden states only
(:func:`posttrain.models.lm_head.forward_hidden_states`), so the loss of that same forward is read
by a hook on the model's output rather than from a second call.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.errors import ConfigError
from posttrain.models.lm_head import unwrap_model


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class RouterAuxLoss:
    """Reads the router's auxiliary loss of each forward of ``model``, and its weight.

    Args:
        model: the trained model (any wrapper).
        coef: the weight; ``None`` takes the model config's own ``router_aux_loss_coef`` (0.0 when
            it declares none); 0.0 turns the loss off.

    Raises:
        ConfigError: a non-zero ``coef`` for a model that is not a Mixture of Experts.
    """

    def __init__(self, model: nn.Module, coef: float | None) -> None:
        base = unwrap_model(model)
        config = _text_config(base)
        is_moe = config is not None and hasattr(config, "output_router_logits")
        if coef and not is_moe:
            raise ConfigError(
                f"router_aux_loss_coef={coef} but {type(base).__name__} is not a Mixture-of-Experts model "
                "(its config has no output_router_logits)",
                field="router_aux_loss_coef", fix="leave router_aux_loss_coef unset for a dense model",
            )
        declared = getattr(config, "router_aux_loss_coef", 0.0) if is_moe else 0.0
        self.coef = float(declared if coef is None else coef)
        self.enabled = is_moe and self.coef != 0.0
        self._last: torch.Tensor | None = None
        if is_moe:
            # set both ways, so that 0.0 also stops a model loaded with output_router_logits=True
            config.output_router_logits = self.enabled
            if hasattr(config, "router_aux_loss_coef"):
                config.router_aux_loss_coef = self.coef
        if self.enabled:
            base.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs, output) -> None:
        self._last = getattr(output, "aux_loss", None)

    def pop(self) -> torch.Tensor | None:
        """The (unweighted) ``aux_loss`` of the latest forward, then forgotten; ``None`` when off."""
        aux, self._last = self._last, None
        return aux if self.enabled else None
