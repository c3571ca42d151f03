"""TRL's vLLM fields of the online configs, and the importance-sampling correction fields of GRPO.

``VLLMOptions`` is mixed into :class:`~posttrain.trainers.online_config.OnlineConfig` (GRPO and RLOO, as
in TRL); ``SamplingCorrectionOptions`` into ``GRPOConfig`` (TRL's RLOO has no such fields). Each is a
plain dataclass of fields plus a check method the config's ``__post_init__`` calls, and
:meth:`VLLMOptions.rollout_engine_options` turns the fields into an engine name and its arguments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.errors import ConfigError

logger = logging.getLogger("posttrain")

VLLM_MODES = ("colocate", "server")
VLLM_MODEL_IMPLS = ("vllm", "transformers")
DEFAULT_GROUP_PORT = 51216


@dataclass
class VLLMOptions:
    """How ``use_vllm=True`` samples: vLLM in the training process, or a server started with ``posttrain vllm-serve``."""

    vllm_mode: str = field(
        default="colocate",
        metadata={"help": "With use_vllm: 'colocate' (vLLM in the training process, sharing its GPU) or 'server' "
                  "(a separate `posttrain vllm-serve` process; weights pushed to it after every optimizer step)."},
    )
    vllm_model_impl: str = field(
        default="vllm", metadata={"help": "vLLM's model code: 'vllm' (its own) or 'transformers' (colocate mode)."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={"help": "Colocate mode: free vLLM's GPU memory between rollouts (weights offloaded, KV cache "
                  "dropped) so the optimizer step has it; waking costs a host-to-device copy."},
    )
    vllm_structured_outputs_regex: str | None = field(
        default=None, metadata={"help": "Constrain completions to this regular expression (vLLM only; None: off)."}
    )
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "Server mode: URL of the server, e.g. http://host:8000 (wins over host/port)."}
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: host of the server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: port of the server."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Server mode: seconds to wait for the server to answer before a clear error."}
    )
    vllm_group_port: int = field(
        default=DEFAULT_GROUP_PORT,
        metadata={"help": "TRL's NCCL weight-update port. posttrain's server takes weights over HTTP, so only the "
                  "default is accepted."},
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "Colocate mode: GPUs vLLM shards the model over (server mode: a vllm-serve flag)."}
    )

    def _check_vllm_options(self) -> None:
        checks = [
            (self.vllm_mode in VLLM_MODES, "vllm_mode", f"unknown vllm_mode {self.vllm_mode!r}",
             f"use one of {', '.join(VLLM_MODES)}"),
            (self.vllm_model_impl in VLLM_MODEL_IMPLS, "vllm_model_impl",
             f"unknown vllm_model_impl {self.vllm_model_impl!r}", f"use one of {', '.join(VLLM_MODEL_IMPLS)}"),
            (self.vllm_server_timeout > 0, "vllm_server_timeout",
             f"vllm_server_timeout must be > 0 seconds, got {self.vllm_server_timeout}", "use e.g. 240"),
            (self.vllm_tensor_parallel_size >= 1, "vllm_tensor_parallel_size",
             f"vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}", "use 1 or the GPU count"),
            (self.vllm_group_port == DEFAULT_GROUP_PORT, "vllm_group_port",
             f"vllm_group_port={self.vllm_group_port}: posttrain's server receives weights over its HTTP port, "
             "there is no NCCL group to place", "drop it (vllm_server_port / vllm_server_base_url say where the server is)"),
        ]
        for ok, name, problem, fix in checks:
            if not ok:
                raise ConfigError(problem, field=name, fix=fix)
        if not self.use_vllm:
            if self.vllm_structured_outputs_regex:
                raise ConfigError("vllm_structured_outputs_regex constrains vLLM's sampler, and use_vllm is False",
                                  field="vllm_structured_outputs_regex", fix="set use_vllm=True, or unset it")
            return
        if self.vllm_mode == "server":
            # these shape the server process, which the trainer does not start: TRL passes them to the server too
            server_flags = [("vllm_tensor_parallel_size", self.vllm_tensor_parallel_size, 1, "--tensor_parallel_size"),
                            ("vllm_model_impl", self.vllm_model_impl, "vllm", "--vllm_model_impl"),
                            ("vllm_enable_sleep_mode", self.vllm_enable_sleep_mode, False, None)]
            for name, value, default, flag in server_flags:
                if value != default:
                    where = f"pass {flag} {value} to `posttrain vllm-serve`" if flag else "leave it off in server mode"
                    raise ConfigError(f"{name}={value} applies to vllm_mode='colocate'; in server mode the server "
                                      "process owns its GPUs", field=name, fix=where)
        elif self.vllm_tensor_parallel_size > 1 and not torch.cuda.is_available():
            raise ConfigError(f"vllm_tensor_parallel_size={self.vllm_tensor_parallel_size} shards vLLM over GPUs and "
                              "no CUDA GPU is available", field="vllm_tensor_parallel_size",
                              fix="run on a machine with that many GPUs, or leave it at 1")

    def rollout_engine_options(self) -> tuple[str, dict[str, Any]]:
        """``(engine kind, constructor arguments)`` for :func:`~posttrain.rollout.make_rollout_engine`."""
        if not self.use_vllm:
            return "hf", {}
        if self.vllm_mode == "server":
            return "server", {"base_url": self.vllm_server_base_url, "host": self.vllm_server_host,
                              "port": self.vllm_server_port, "timeout": self.vllm_server_timeout,
                              "structured_outputs_regex": self.vllm_structured_outputs_regex}
        return "vllm", {"gpu_memory_utilization": self.vllm_gpu_memory_utilization,
                        "max_model_len": self.vllm_max_model_length,
                        "tensor_parallel_size": self.vllm_tensor_parallel_size, "model_impl": self.vllm_model_impl,
                        "enable_sleep_mode": self.vllm_enable_sleep_mode,
                        "structured_outputs_regex": self.vllm_structured_outputs_regex}


@dataclass
class SamplingCorrectionOptions:
    """Importance-sampling correction for the gap between the sampler's and the trainer's log-probs (TRL's names)."""

    vllm_importance_sampling_correction: bool = field(
        default=True,
        metadata={"help": "Reweigh the loss by pi_trainer / pi_sampler when the sampler reports its own log-probs "
                  "(vLLM, a vllm-serve server, in-process sampling in bf16/fp16)."},
    )
    vllm_importance_sampling_mode: str = field(
        default="sequence_mask",
        metadata={"help": "token_truncate, token_mask, sequence_truncate or sequence_mask: per token or per sequence; "
                  "clip the ratio to [clip_min, clip_max] or zero it outside."},
    )
    vllm_importance_sampling_clip_max: float | None = field(
        default=3.0, metadata={"help": "Upper bound of the importance-sampling ratio (None: none)."}
    )
    vllm_importance_sampling_clip_min: float | None = field(
        default=None, metadata={"help": "Lower bound of the importance-sampling ratio (None: none)."}
    )
    vllm_importance_sampling_cap: float | None = field(
        default=None, metadata={"help": "Older name of vllm_importance_sampling_clip_max."}
    )

    def _check_sampling_correction(self) -> None:
        from posttrain.losses.sampling_correction import check_sampling_bounds

        if self.vllm_importance_sampling_cap is not None:
            logger.warning("vllm_importance_sampling_cap is the older name of vllm_importance_sampling_clip_max; "
                           "using it as clip_max=%s", self.vllm_importance_sampling_cap)
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
            self.vllm_importance_sampling_cap = None
        if self.vllm_importance_sampling_correction:
            check_sampling_bounds(self.vllm_importance_sampling_mode, self.vllm_importance_sampling_clip_min,
                                  self.vllm_importance_sampling_clip_max)
