"""What an online-RL checkpoint (GRPO, RLOO, online DPO) holds beyond ``transformers.Trainer``'s.

The Trainer writes the model, optimizer, scheduler, RNG states and ``trainer_state.json``. Sampling
needs no saved generator: completions are drawn from keys of (seed, generation round, prompt
position) (:func:`posttrain.rollout.sampling.sampling_keys`), and the micro-batch shuffle is seeded
per round. What remains is written per process to ``online_state.pt`` (``online_state_<rank>.pt``
with several processes):

* ``micro_step`` and ``buffer``: the micro-step counter and the micro-batches of the generation under
  way, when one generation serves several optimizer steps (``steps_per_generation`` or
  ``num_iterations`` > 1) and the checkpoint falls inside it;
* ``cumulative``: running totals (tokens seen), and the reward computer's running counts
  (:data:`REWARD_COUNTERS`);
* ``pending_metrics``: metrics recorded since the last log, averaged into the next one;
* ``loop_state``: a method's own controllers (:meth:`ResumableOnlineLoop.loop_state`).

Environments with a ``state_dict()`` (``environment_factory``) write their pooled states, as JSON, to
``environments.json`` (``environments_<rank>.json``), restored with ``load_state_dict``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from posttrain.rollout.sequences import RolloutSequences

# running counts a RewardComputer keeps between calls
REWARD_COUNTERS = ("num_all_none_rows",)


def reward_counters(reward_computer) -> dict[str, int]:
    """The running counts of ``reward_computer`` (None: a judge ranks instead) that a resume must restore."""
    return {name: int(getattr(reward_computer, name)) for name in REWARD_COUNTERS if hasattr(reward_computer, name)}


def restore_reward_counters(reward_computer, counters: Mapping[str, int]) -> None:
    for name, value in counters.items():
        if hasattr(reward_computer, name):
            setattr(reward_computer, name, value)


def online_state_file(args) -> str:
    """The name of this process's online state file inside a checkpoint."""
    return "online_state.pt" if args.world_size <= 1 else f"online_state_{args.process_index}.pt"


def agent_state_file(args) -> str:
    """The name of this process's environment-state file inside a checkpoint."""
    return "environments.json" if args.world_size <= 1 else f"environments_{args.process_index}.json"


def save_online_state(
    checkpoint: str,
    args,
    *,
    cumulative: Mapping[str, float],
    pending_metrics: Mapping[str, list[float]],
    micro_step: int = 0,
    buffer: list[RolloutSequences] | None = None,
    reward_computer=None,
    loop_state: Mapping[str, Any] | None = None,
) -> None:
    """Write this process's online-loop state into ``checkpoint`` (tensors moved to the CPU; each buffered
    micro-batch as a dict of its fields, :meth:`RolloutSequences.as_dict`)."""
    os.makedirs(checkpoint, exist_ok=True)
    state = {
        "micro_step": int(micro_step),
        "buffer": None if buffer is None else [
            {name: value.detach().cpu() for name, value in part.as_dict().items()} for part in buffer
        ],
        "cumulative": {name: float(value) for name, value in cumulative.items()},
        "pending_metrics": {name: [float(v) for v in values] for name, values in pending_metrics.items()},
        "reward_counters": reward_counters(reward_computer),
        "loop_state": dict(loop_state or {}),
    }
    torch.save(state, os.path.join(checkpoint, online_state_file(args)))


def load_online_state(checkpoint: str, args, device: torch.device) -> dict[str, Any] | None:
    """The state :func:`save_online_state` wrote for this process (buffer tensors on ``device``), or ``None``
    for a checkpoint without one (saved with ``save_only_model``, or by an older version)."""
    path = os.path.join(checkpoint, online_state_file(args))
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["buffer"] is not None:
        state["buffer"] = [RolloutSequences.from_dict(part).to(device) for part in state["buffer"]]
    return state


class ResumableOnlineLoop:
    """Mixed into an online method's Trainer (before ``PosttrainTrainer``): counts training micro-steps
    (the sampling round) and saves and restores the online loop's state with every checkpoint.

    The trainer provides ``_micro_step`` (``None`` until the first step of a run), ``_cumulative``,
    ``_metrics``, ``reward_computer`` and, when it buffers a generation across steps, ``_buffer``.
    """

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._micro_step is None:  # first step of this run, fresh or resumed
            self._micro_step = self.state.global_step * self.args.gradient_accumulation_steps
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._micro_step += 1

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not self.args.save_only_model:
            checkpoint = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_online_state(checkpoint, self.args, cumulative=self._cumulative, pending_metrics=self._metrics["train"],
                              micro_step=self._micro_step or 0, buffer=getattr(self, "_buffer", None),
                              reward_computer=self.reward_computer, loop_state=self.loop_state())
            agent_state = self.agent.state_dict() if getattr(self, "agent", None) is not None else None
            if agent_state is not None:  # environments that outlive an episode (posttrain.trainers.agent)
                with open(os.path.join(checkpoint, agent_state_file(self.args)), "w", encoding="utf-8") as handle:
                    json.dump(agent_state, handle)
        super()._save_checkpoint(model, trial)

    def loop_state(self) -> dict[str, Any]:
        """A method's own state to checkpoint (e.g. GRPO's adaptive entropy coefficient); plain values only."""
        return {}

    def restore_loop_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`loop_state` returned."""

    def _load_rng_state(self, checkpoint) -> None:
        # the Trainer calls this once when it resumes, before the first resumed step
        super()._load_rng_state(checkpoint)
        saved = load_online_state(checkpoint, self.args, self.accelerator.device) if checkpoint else None
        if saved is None:
            return
        agent_state = os.path.join(checkpoint, agent_state_file(self.args))
        if getattr(self, "agent", None) is not None and os.path.isfile(agent_state):
            with open(agent_state, encoding="utf-8") as handle:
                self.agent.load_state_dict(json.load(handle))
        self._micro_step = saved["micro_step"]
        if hasattr(self, "_buffer"):
            self._buffer = saved["buffer"]
        self._cumulative.update(saved["cumulative"])
        restore_reward_counters(self.reward_computer, saved.get("reward_counters", {}))
        self.restore_loop_state(saved.get("loop_state", {}))
        for name, values in saved["pending_metrics"].items():
            self._metrics["train"][name].extend(values)
