"""The rollout engine of an online trainer: built once from the config, kept in sync with the policy, and
watched for a gap between the sampler's log-probs and the trainer's (:mod:`posttrain.trainers.sampler_gap`)."""

from __future__ import annotations

from typing import Any

from posttrain.rollout.sequences import RolloutSequences


class RolloutEngineMixin:
    """Engine handling for :class:`~posttrain.trainers.online.OnlineTrainer`; expects ``_engine``,
    ``_sampler_gap`` and ``_engine_synced_step`` set in its ``__init__``."""

    _engine: Any
    _sampler_gap: Any
    _engine_synced_step: int

    def _rollout_engine(self):
        from posttrain.rollout import make_rollout_engine

        policy = self.accelerator.unwrap_model(self.model)
        if self._engine is None:
            from posttrain.trainers.sampler_gap import SamplerGapMonitor, has_active_dropout

            kind, options = self.args.rollout_engine_options()
            if kind == "vllm":
                options["sampler_logprobs"] = True
            if kind == "hf":
                options["max_batch_tokens"] = self.args.rollout_max_batch_tokens
            if kind == "server":  # one copy of the weights on the server: one process pushes them
                options["sync_weights"] = self.accelerator.is_main_process
            self._engine = make_rollout_engine(kind, policy, self._tokenizer, **options)
            self._sampler_gap = SamplerGapMonitor(kind, deterministic_forward=not has_active_dropout(policy))
            self._engine_synced_step = self.state.global_step
            if kind == "server":
                self.accelerator.wait_for_everyone()
        elif self.args.use_vllm and self._engine_synced_step != self.state.global_step:
            self._engine.load_weights(policy)  # vLLM holds its own copy of the weights
            self._engine_synced_step = self.state.global_step
            if self.args.vllm_mode == "server":
                self.accelerator.wait_for_everyone()
        return self._engine

    def _prepare_engine_for(self, mode: str) -> None:
        """Before a generation: the engine exists, the gap monitor too (also for an engine set from outside,
        e.g. a test's scripted engine), and the in-process engine reports its log-probs only when they are used."""
        engine = self._rollout_engine()
        if self._sampler_gap is None:
            from posttrain.trainers.sampler_gap import SamplerGapMonitor, has_active_dropout

            self._sampler_gap = SamplerGapMonitor(self.args.rollout_engine_options()[0], deterministic_forward=not
                                                  has_active_dropout(self.accelerator.unwrap_model(self.model)))
        if self._sampler_gap.engine_kind == "hf":
            engine.sampler_logprobs = self._sampler_gap.wants_sampler_logps(
                self.args, mode, corrects=self.sampling_correction() is not None)

    def _inspect_sampler_gap(self, rows: RolloutSequences) -> dict[str, float]:
        """``sampling/*`` metrics of the sampler/trainer gap; the correction weights; the agreement check."""
        if rows.sampler_logps is None:
            return {}
        correction = self.sampling_correction()
        metrics = self._sampler_gap.inspect(rows, self.args, self._gathered, corrects=correction is not None,
                                            **(correction or {"mode_name": "", "clip_min": None, "clip_max": None}))
        rows.sampler_logps = None
        return metrics
