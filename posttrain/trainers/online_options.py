"""TRL's generation and logging options of the online configs: each is read here, mapped onto what
posttrain does, or refused with the reason.

:func:`resolve_online_options` runs in ``OnlineConfig.__post_init__``. ``generation_kwargs`` keys that
posttrain's sampler has (:class:`posttrain.rollout.SamplingParams`) override the matching config
fields, as they override TRL's ``GenerationConfig``; any other key is a ConfigError listing the
known ones. The rest are checked against what posttrain supports.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import ConfigError
from posttrain.trainers.config import parse_json_field, parse_pad_to_multiple_of

#: generation_kwargs key -> the config field it overrides (the sampler reads these fields)
GENERATION_KWARG_FIELDS = {
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "stop_strings": "stop_strings",
}
#: keys accepted when they agree with the config (posttrain samples and scores with one value)
GENERATION_KWARG_CHECKS = {"temperature": "temperature", "max_new_tokens": "max_completion_length"}
#: transformers' KV-cache implementations the sampler is equivalent to: it grows a DynamicCache itself
DYNAMIC_CACHES = ("dynamic",)


def resolve_online_options(config: Any) -> None:
    """Parse, check and apply the generation and logging options of an online config, in place."""
    config.pad_to_multiple_of = parse_pad_to_multiple_of(config.pad_to_multiple_of)
    config.chat_template_kwargs = parse_json_field(config.chat_template_kwargs, "chat_template_kwargs")
    config.generation_kwargs = parse_json_field(config.generation_kwargs, "generation_kwargs")
    config.transformers_continuous_batching_config = parse_json_field(
        config.transformers_continuous_batching_config, "transformers_continuous_batching_config")
    if config.generation_kwargs:
        apply_generation_kwargs(config, config.generation_kwargs)
    _refuse_unsupported(config)


def apply_generation_kwargs(config: Any, generation_kwargs: dict[str, Any]) -> None:
    """Set the sampling fields ``generation_kwargs`` names; refuse keys the sampler does not have."""
    for key, value in generation_kwargs.items():
        if key in GENERATION_KWARG_FIELDS:
            setattr(config, GENERATION_KWARG_FIELDS[key], value)
        elif key in GENERATION_KWARG_CHECKS:
            name = GENERATION_KWARG_CHECKS[key]
            if value != getattr(config, name):
                raise ConfigError(
                    f"generation_kwargs sets {key}={value!r} but {name}={getattr(config, name)!r}: posttrain "
                    f"samples and computes the training log-probs with the same {name}",
                    field="generation_kwargs", fix=f"set {name}={value!r} instead and drop {key!r} from generation_kwargs",
                )
        elif key == "do_sample":
            if value is not True:
                raise ConfigError(
                    "generation_kwargs do_sample=False would decode greedily: every completion of a group would be "
                    "the same and their advantages zero", field="generation_kwargs",
                    fix="drop do_sample (sampling is always on in training)",
                )
        else:
            known = sorted([*GENERATION_KWARG_FIELDS, *GENERATION_KWARG_CHECKS, "do_sample"])
            raise ConfigError(
                f"generation_kwargs key {key!r} is not supported: posttrain samples with its own batched, "
                "KV-cached sampler rather than transformers' generate()", field="generation_kwargs",
                fix=f"use only {', '.join(known)}",
            )


def _refuse_unsupported(config: Any) -> None:
    cache = config.cache_implementation
    refusals = [
        (cache is not None and cache not in DYNAMIC_CACHES, "cache_implementation",
         f"cache_implementation={cache!r}: posttrain's sampler keeps its own dynamic KV cache (one prefill per "
         "prompt, shared by its group), not one of transformers' cache implementations",
         "leave it unset (or 'dynamic')"),
        (not config.ds3_gather_for_generation, "ds3_gather_for_generation",
         "ds3_gather_for_generation=False (sampling from DeepSpeed ZeRO-3 shards without gathering the weights) "
         "is not supported: posttrain's sampler runs on the whole policy",
         "leave it True, or use a smaller model / LoRA so the policy fits one device for sampling"),
        (config.use_transformers_continuous_batching or config.use_transformers_paged,
         "use_transformers_continuous_batching",
         "transformers' continuous-batching (paged) generation is not used: posttrain samples with its own batched "
         "sampler (one prefill per prompt, counter-based draws that make a run independent of the process layout)",
         "drop use_transformers_continuous_batching / use_transformers_paged; use use_vllm on a GPU for faster sampling"),
        (bool(config.transformers_continuous_batching_config) and not config.use_transformers_continuous_batching,
         "transformers_continuous_batching_config",
         "transformers_continuous_batching_config configures transformers' continuous batching, which posttrain "
         "does not use", "drop it"),
    ]
    for refused, name, problem, fix in refusals:
        if refused:
            raise ConfigError(problem, field=name, fix=fix)
