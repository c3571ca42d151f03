"""The gap between the sampler's log-probs and the trainer's for the same tokens: metrics, correction, checks.

Three situations, told apart by the engine and the config:

* the sampler and the trainer should compute the same numbers (the in-process HF engine, float32, no
  top-k/top-p/min-p or repetition penalty): the first training generation compares them, and a mean gap
  above :data:`AGREEMENT_TOLERANCE` stops the run with :class:`~posttrain.errors.RolloutMismatchError`
  (training on it would be silently off-policy);
* they legitimately differ (vLLM, a ``vllm-serve`` server, sampling in bf16/fp16): every training generation
  logs TRL's ``sampling/*`` metrics and, where the method corrects for it (GRPO's
  ``vllm_importance_sampling_correction``), weighs the loss by the bounded ratio
  (:mod:`posttrain.losses.sampling_correction`);
* truncated sampling (top-k/top-p/min-p) or a repetition penalty: the sampler's log-probs are those of
  the processed distribution, the trainer's of the full one, so the gap holds that bias too; one warning.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from posttrain.errors import RolloutMismatchError
from posttrain.losses.sampling_correction import SamplingCorrection, gap_metrics, sampling_correction_weights, sampling_gap_statistics
from posttrain.rollout.sequences import RolloutSequences

logger = logging.getLogger("posttrain")

#: mean |sampler - trainer| log-prob (nats) above which engines that should agree are taken to disagree; float32
#: kernels differ by about 1e-6, a re-rendered token or a stale weight by far more than this
AGREEMENT_TOLERANCE = 1e-3
#: a mean gap this large where the engines legitimately differ points at a fault rather than numerics
LARGE_GAP = 1.0


def processes_distribution(args: Any) -> bool:
    """Whether sampling changes the distribution beyond temperature (top-k, top-p, min-p, repetition penalty)."""
    return (args.top_p < 1.0 or (args.top_k or 0) > 0 or (args.min_p or 0.0) > 0.0
            or args.repetition_penalty != 1.0)


def mixed_precision(args: Any) -> bool:
    return bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))


_DROPOUT_CONFIG_NAMES = ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                         "hidden_dropout_prob", "attention_probs_dropout_prob")


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a training-mode forward of ``model`` is random (a dropout layer or a dropout rate in its config)."""
    if any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(isinstance(getattr(config, name, None), (int, float)) and getattr(config, name) > 0
               for name in _DROPOUT_CONFIG_NAMES)


class SamplerGapMonitor:
    """Per-run state of the gap checks: which engine samples, whether the agreement check has run, warnings given."""

    def __init__(self, engine_kind: str, deterministic_forward: bool = True) -> None:
        self.engine_kind = engine_kind
        self.deterministic_forward = deterministic_forward  # False with dropout: the trainer's forward is random
        self.agreement_checked = False
        self._warned: set[str] = set()

    def should_agree(self, args: Any) -> bool:
        return (self.engine_kind == "hf" and self.deterministic_forward and not mixed_precision(args)
                and not processes_distribution(args))

    def wants_sampler_logps(self, args: Any, mode: str, corrects: bool) -> bool:
        """Whether the in-process engine should report its log-probs for this generation."""
        if mode != "train":
            return False
        if self.should_agree(args):
            return not self.agreement_checked
        return self.engine_kind == "hf" and mixed_precision(args) and corrects

    def inspect(self, rows: RolloutSequences, args: Any, gather: Callable[[torch.Tensor], torch.Tensor], *,
                corrects: bool, mode_name: str, clip_min: float | None, clip_max: float | None) -> dict[str, float]:
        """Metrics of the gap between ``rows.sampler_logps`` and ``rows.old_logps``; sets ``rows.sampling_weights``
        when ``corrects``; raises RolloutMismatchError where the engines should agree and do not."""
        agreement_run = self.should_agree(args)
        correction: SamplingCorrection | None = None
        if corrects and not agreement_run:
            correction = sampling_correction_weights(rows.old_logps, rows.sampler_logps, rows.loss_mask, mode_name,
                                                     clip_min=clip_min, clip_max=clip_max)
            rows.sampling_weights = correction.weights
        statistics = sampling_gap_statistics(rows.old_logps, rows.sampler_logps, rows.loss_mask, correction)
        metrics = gap_metrics(gather(statistics))
        mean_gap = metrics["sampling/sampling_logp_difference/mean"]
        if agreement_run:
            self.agreement_checked = True
            if mean_gap > AGREEMENT_TOLERANCE:
                raise RolloutMismatchError(
                    f"the sampler's log-probs of the sampled tokens differ from the trainer's by {mean_gap:.3g} nats on "
                    f"average (max {metrics['sampling/sampling_logp_difference/max']:.3g}; tolerance "
                    f"{AGREEMENT_TOLERANCE:g}), where both run the same model in float32 and should agree. Likely "
                    "causes: the tokens the trainer scores are not the tokens that were sampled (a chat template "
                    "re-rendered between turns, a prompt re-tokenized), or the sampler ran other weights than the "
                    "policy (a custom rollout_func or engine that missed load_weights). Fix: score the exact sampled "
                    "token ids, and sync weights before sampling"
                )
        elif processes_distribution(args):
            self._warn_once("processed", "top_k / top_p / min_p / repetition_penalty change the distribution the "
                            "sampler draws from; its log-probs are of that distribution and the trainer's of the full "
                            "one, so the sampling/* gap (and any importance-sampling weight) includes that bias")
        elif mean_gap > LARGE_GAP:
            self._warn_once("large", f"the sampler's log-probs differ from the trainer's by {mean_gap:.3g} nats per "
                            "token on average, far beyond numerical noise: check that the server serves the policy's "
                            "model and receives its weights, and that sampled token ids are scored unchanged")
        return metrics

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)
