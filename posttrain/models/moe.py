"""The load-balancing loss of Mixture-of-Experts models (``router_aux_loss_coef``).

A MoE model in transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) declares ``output_router_logits`` in
its config; when it is True its forward returns ``aux_loss``, the auxiliary loss that keeps the
router spreading tokens over its experts, and SFT and DPO add ``router_aux_loss_coef * aux_loss`` to
their loss (:func:`posttrain.models.lm_head.router_loss_term`). This module turns a trainer's
``router_aux_loss_coef`` field into those two config values.
"""

from __future__ import annotations

from torch import nn

from posttrain.errors import ConfigError
from posttrain.models.lm_head import unwrap_model


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def configure_router_aux_loss(model: nn.Module, coef: float | None) -> float:
    """Set the model's config so that its forward reports the router loss weighted by ``coef``; return the weight.

    Args:
        model: the trained model (any wrapper).
        coef: the weight; ``None`` keeps the model config's own settings (``output_router_logits`` and
            ``router_aux_loss_coef``); 0.0 turns the loss off; a positive value turns it on.

    Raises:
        ConfigError: a non-zero ``coef`` for a model that is not a Mixture of Experts.
    """
    base = unwrap_model(model)
    config = _text_config(base)
    is_moe = config is not None and hasattr(config, "output_router_logits")
    if coef and not is_moe:
        raise ConfigError(
            f"router_aux_loss_coef={coef} but {type(base).__name__} is not a Mixture-of-Experts model "
            "(its config has no output_router_logits)",
            field="router_aux_loss_coef", fix="leave router_aux_loss_coef unset for a dense model",
        )
    if not is_moe:
        return 0.0
    if coef is None:
        return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if config.output_router_logits else 0.0
    config.output_router_logits = coef != 0.0  # 0.0 also stops a model loaded with output_router_logits=True
    if hasattr(config, "router_aux_loss_coef"):
        config.router_aux_loss_coef = float(coef)
    return float(coef)
