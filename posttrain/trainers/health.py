"""One-line warnings, each logged once per run, for logs that say a run is going wrong while it still runs.

* the training loss grows tenfold within a few logs (a learning rate too high, a bad batch);
* the gradient norm is exactly 0 for several logs in a row (nothing is learned: empty loss masks,
  frozen parameters, equal rewards within every group);
* preference rows whose chosen and rejected tokens are identical (after truncation), checked at
  the start of training: they carry no preference, and a DPO or reward loss on them is constant.
"""

from __future__ import annotations

import logging
import math
from collections import deque

from transformers import TrainerCallback

logger = logging.getLogger("posttrain")

LOSS_JUMP_FACTOR = 10.0
LOSS_JUMP_WINDOW = 5  # logs
LOSS_FLOOR = 1e-2  # below this a tenfold change is noise, not divergence
ZERO_GRAD_LOGS = 3


class HealthWarnings(TrainerCallback):
    """Watches the training logs; each warning is logged at most once per run."""

    def __init__(self, dataset_source=None) -> None:
        # an object with a `train_dataset` (the trainer), read at the start of training
        self.dataset_source = dataset_source
        self.recent_losses: deque[float] = deque(maxlen=LOSS_JUMP_WINDOW)
        self.zero_grad_since: int | None = None
        self.zero_grad_logs = 0
        self.warned: set[str] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        dataset = getattr(self.dataset_source, "train_dataset", None)
        if state.is_world_process_zero and dataset is not None:
            self._check_preference_pairs(dataset)
        return control

    def _check_preference_pairs(self, dataset) -> None:
        columns = getattr(dataset, "column_names", None) or []
        if "chosen_input_ids" not in columns or "rejected_input_ids" not in columns or not hasattr(dataset, "iter"):
            return
        equal, first, total = 0, None, 0
        for batch in dataset.select_columns(["chosen_input_ids", "rejected_input_ids"]).iter(batch_size=1024):
            for chosen, rejected in zip(batch["chosen_input_ids"], batch["rejected_input_ids"]):
                if list(chosen) == list(rejected):
                    equal += 1
                    first = total if first is None else first
                total += 1
        if equal:
            self._warn_once(
                "equal_pairs",
                f"{equal} of {total} preference rows have identical chosen and rejected tokens (the first is row "
                f"{first} of the tokenized training set); they carry no preference: fix the data, or raise "
                "max_length if truncation cut off the difference",
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return control
        step = state.global_step
        loss = logs.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self._check_loss(step, float(loss))
        grad_norm = logs.get("grad_norm")
        if isinstance(grad_norm, (int, float)):
            self._check_grad_norm(step, float(grad_norm))
        return control

    def _check_loss(self, step: int, loss: float) -> None:
        lowest = min(self.recent_losses, default=None)
        if lowest is not None and lowest > LOSS_FLOOR and loss > LOSS_JUMP_FACTOR * lowest:
            self._warn_once(
                "loss_jump",
                f"step {step}: the loss rose from {lowest:.4g} to {loss:.4g} (x{loss / lowest:.0f}) within "
                f"{len(self.recent_losses)} logs; the learning rate may be too high, or this batch is unusual",
            )
        self.recent_losses.append(loss)

    def _check_grad_norm(self, step: int, grad_norm: float) -> None:
        if grad_norm != 0.0:
            self.zero_grad_logs, self.zero_grad_since = 0, None
            return
        self.zero_grad_logs += 1
        self.zero_grad_since = step if self.zero_grad_since is None else self.zero_grad_since
        if self.zero_grad_logs >= ZERO_GRAD_LOGS:
            self._warn_once(
                "zero_grad",
                f"step {step}: the gradient norm has been 0 in every log since step {self.zero_grad_since}: "
                "nothing is learned (empty loss masks? frozen parameters? equal rewards within every group?)",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            logger.warning(message)
