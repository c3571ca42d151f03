"""Skip optimizer steps whose loss or gradients are not finite, and stop a run that keeps producing them.

One NaN batch (an overflow, a corrupt row, a bad reward) would otherwise reach the optimizer, turn
every weight into NaN and every later step, checkpoint and the final model with it. The guard:

* notes, for every micro-batch, whether its loss is finite (:meth:`NonFiniteGuard.observe_loss`,
  called from the trainer's ``training_step``);
* wraps the prepared optimizer's ``step``: when a loss of the accumulation window or any gradient
  is NaN/inf, on any process, the step is skipped -- no parameter, no optimizer moment, no step
  count changes -- and counted as ``nonfinite_steps`` (logged with every record from then on);
  the learning-rate schedule still advances, as the step still counts as one;
* after ``max_consecutive_nonfinite_steps`` skipped steps in a row, raises
  :class:`NonFiniteTrainingError` naming the step (the command line exits 2).

The decision is taken once per step for all processes together (one all-reduced flag), so that
every process skips the same steps and the replicas stay identical.

Not guarded: fp16 runs with a gradient scaler (the scaler already skips overflowing steps and
lowers its scale, which is the expected start of such a run) and DeepSpeed (its engine steps the
optimizer itself and has its own overflow handling).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from transformers import TrainerCallback

from posttrain.errors import PosttrainError
from posttrain.ops.distributed import all_reduce_sum, is_distributed

logger = logging.getLogger("posttrain")

NONFINITE_METRIC = "nonfinite_steps"


class NonFiniteTrainingError(PosttrainError, RuntimeError):
    """Training produced non-finite losses or gradients for too many steps in a row."""


def gradients_finite(parameters) -> torch.Tensor | None:
    """A 0-d bool tensor: True when every gradient of ``parameters`` is finite (None without gradients).

    One fused norm per device instead of a check per tensor: a NaN or inf anywhere makes the norm
    non-finite (so do gradients beyond ~1e19, where the Trainer's clipping would zero them anyway).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    finite = [torch.isfinite(torch.stack(torch._foreach_norm(group)).sum()) for group in by_device.values()]
    first = finite[0]
    return torch.stack([flag.to(first.device) for flag in finite]).all()


class NonFiniteGuard(TrainerCallback):
    """The per-run state of the guard, installed by :class:`~posttrain.trainers.base.PosttrainTrainer`."""

    def __init__(self, trainer, max_consecutive: int) -> None:
        self.trainer = trainer
        self.max_consecutive = max_consecutive
        self.skipped_total = 0
        self.skipped_in_a_row = 0
        self._window_loss_nonfinite = False

    @property
    def enabled(self) -> bool:
        return self.max_consecutive > 0

    # -- called by the trainer

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Remember whether one micro-batch's loss was finite (no device sync: stays a tensor flag)."""
        if not self.enabled or not torch.is_tensor(loss):
            return
        bad = ~torch.isfinite(loss.detach()).all()
        flag = self._window_loss_nonfinite
        self._window_loss_nonfinite = bad if flag is False else (flag | bad.to(flag.device))

    def after_log(self) -> None:
        """Clear the Trainer's running loss total once a NaN in it has been logged.

        The Trainer empties it with ``total -= total`` after each log, which leaves a NaN in place:
        every later record would read NaN although the steps after a skipped one are finite.
        """
        total = getattr(self.trainer, "_tr_loss", None)
        if torch.is_tensor(total) and not bool(torch.isfinite(total).all()):
            total.zero_()

    # -- the wrapped optimizer step

    def on_train_begin(self, args, state, control, **kwargs):
        self.skipped_in_a_row = 0
        self._window_loss_nonfinite = False
        if self.enabled:
            self._wrap(self.trainer.optimizer)
        return control

    def _wrap(self, optimizer) -> None:
        if optimizer is None or getattr(optimizer, "_posttrain_guarded", False):
            return
        accelerator = self.trainer.accelerator
        if getattr(accelerator, "scaler", None) is not None or getattr(self.trainer, "is_deepspeed_enabled", False):
            return
        original_step = optimizer.step

        @functools.wraps(original_step)
        def guarded_step(*args: Any, **kwargs: Any):
            if self._step_is_finite(optimizer):
                self.skipped_in_a_row = 0
                return original_step(*args, **kwargs)
            self._skip()
            return None

        optimizer.step = guarded_step
        optimizer._posttrain_guarded = True

    def _step_is_finite(self, optimizer) -> bool:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads_ok = gradients_finite(params)
        device = params[0].device if params else torch.device("cpu")
        bad = torch.zeros((), device=device)
        if grads_ok is not None:
            bad = bad + (~grads_ok).to(device).float()
        if self._window_loss_nonfinite is not False:
            bad = bad + self._window_loss_nonfinite.to(device).float()
        self._window_loss_nonfinite = False
        if is_distributed():
            bad = all_reduce_sum(bad)
        return bool(bad.item() == 0)

    def _skip(self) -> None:
        self.skipped_in_a_row += 1
        # kept with the trainer's running totals, which are logged with every record (and PPO checkpoints them)
        totals = self.trainer._cumulative
        totals[NONFINITE_METRIC] = totals.get(NONFINITE_METRIC, 0.0) + 1.0
        self.skipped_total = int(totals[NONFINITE_METRIC])
        # global_step is incremented after the optimizer step: this step is the next one
        step = self.trainer.state.global_step + 1
        logger.warning(
            "step %d: the loss or the gradients are NaN/inf; this optimizer step is skipped "
            "(%d in a row, %d in this run)", step, self.skipped_in_a_row, self.skipped_total,
        )
        if self.skipped_in_a_row >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"step {step}: the loss or the gradients were NaN/inf for {self.skipped_in_a_row} optimizer "
                f"steps in a row (steps {step - self.skipped_in_a_row + 1}-{step}); training stopped. The weights "
                "are those before the first of them. Fix: lower --learning_rate, check the data of these steps, "
                "or raise --max_consecutive_nonfinite_steps"
            )


def parameters_finite(model: torch.nn.Module) -> bool:
    """True when every floating-point parameter and buffer of ``model`` is finite on every process.

    Checked before a checkpoint is written; agreed over all processes (each may hold a shard), so that
    either all of them refuse the save or none does.
    """
    flags = [torch.isfinite(t.detach()).all() for t in list(model.parameters()) + list(model.buffers())
             if t.is_floating_point() and t.numel()]
    bad = torch.stack([~flag for flag in flags]).sum().float() if flags else torch.zeros(())
    if is_distributed():
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        bad = all_reduce_sum(bad.to(device))
    return bool(bad.item() == 0)
