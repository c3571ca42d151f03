"""Seeing through the wrappers a trained model wears (DDP, ``torch.compile``, PEFT).

Lives with the models, not the trainers, so that model code (value heads) and every trainer can ask
the same questions without importing upward.
"""

from __future__ import annotations

from torch import nn


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (False when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def unwrap_model_keep_peft(model: nn.Module) -> nn.Module:
    """Strip DDP / compile wrappers but keep a PEFT wrapper (so adapters save and switch as adapters)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "peft_config"):
            model = model.module
        else:
            return model
