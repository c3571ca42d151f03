"""Switching a model to evaluation mode for a while, and back to exactly the modes it had."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode; on exit give each its own ``training`` flag back.

    ``model.train(was_training)`` would not: it sets one flag on every submodule, so a module the
    caller had put in eval mode (a frozen part, a dropout switched off on purpose) would come back
    in train mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
