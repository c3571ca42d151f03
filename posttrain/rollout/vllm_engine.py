"""Generation with a colocated vLLM engine, behind the same ``generate`` interface as the HF engine.

vLLM is imported only when this engine is built. The policy being trained stays a Hugging Face
model; :meth:`VLLMRolloutEngine.load_weights` copies its current weights into vLLM before a rollout.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.rollout.batch import RolloutBatch, check_num_generations, left_pad, normalize_prompts, right_pad
from posttrain.rollout.sampling import SamplingParams


def _check_vllm_available() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "the vLLM rollout engine needs the vllm package, which is not installed",
            field="rollout_engine",
            fix="use the default engine ('hf'), or `pip install vllm` on a machine with a CUDA GPU",
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "the vLLM rollout engine needs a CUDA GPU and none is available",
            field="rollout_engine",
            fix="use the default engine ('hf'), or run on a machine with a CUDA GPU",
        )


class VLLMRolloutEngine:
    """Samples completions with ``vllm.LLM`` running in this process, next to the trained model.

    Args:
        model: a Hugging Face model directory or hub id for vLLM to load, or the policy model itself
            (its ``name_or_path`` is loaded, then its current weights are copied in).
        tokenizer: the policy's tokenizer, for the default EOS / pad ids.
        eos_token_ids, pad_token_id: as for :class:`~posttrain.rollout.HFRolloutEngine`.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (the trainer needs the rest).
        max_model_len: longest prompt + completion vLLM must hold; default: the model's own limit.
        dtype: vLLM's dtype argument ("auto" follows the checkpoint).
        llm_kwargs: passed unchanged to ``vllm.LLM``.

    Raises ConfigError at construction when vllm is not installed or no CUDA GPU is present.
    """

    def __init__(
        self,
        model: Any,
        tokenizer=None,
        *,
        eos_token_ids: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _check_vllm_available()
        # vLLM's V1 engine otherwise runs the model in a separate process, where weights cannot be loaded in
        # place after each optimizer step; in-process it exposes the model under ``llm_engine.model_executor``
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm  # noqa: PLC0415  (optional dependency, imported only here)

        self._vllm = vllm
        self.tokenizer = tokenizer
        policy = None if isinstance(model, str) else model
        model_path = model if isinstance(model, str) else getattr(_unwrap_peft(model), "name_or_path", None)
        if not model_path:
            raise ConfigError(
                "the vLLM engine needs a model directory to start from and the model has no name_or_path",
                field="model",
                fix="save the model with save_pretrained and pass that directory",
            )
        if eos_token_ids is None:
            eos_token_ids = [] if getattr(tokenizer, "eos_token_id", None) is None else [tokenizer.eos_token_id]
        self.eos_token_ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None and self.eos_token_ids:
            pad_token_id = self.eos_token_ids[0]
        if pad_token_id is None:
            raise ConfigError("no pad token id", field="pad_token_id", fix="pass pad_token_id= or set tokenizer.pad_token")
        self.pad_token_id = int(pad_token_id)
        # rollout tensors go where the policy is trained (vLLM itself always runs on the current CUDA device)
        policy_parameter = next(iter(policy.parameters()), None) if policy is not None else None
        self.device = (policy_parameter.device if policy_parameter is not None
                       else torch.device("cuda", torch.cuda.current_device()))

        kwargs = dict(
            model=str(model_path),
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=True,  # the G completions of a prompt share its KV blocks
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs or {})
        self.llm = vllm.LLM(**kwargs)
        if policy is not None:
            self.load_weights(policy)

    def _vllm_model(self):
        """The ``torch.nn.Module`` inside vLLM that owns ``load_weights`` (location varies across versions)."""
        engine = self.llm.llm_engine
        for path in ("model_executor.driver_worker.model_runner.model", "model_executor.driver_worker.worker.model_runner.model"):
            target = engine
            try:
                for attribute in path.split("."):
                    target = getattr(target, attribute)
                return target
            except AttributeError:
                continue
        return None

    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into vLLM (PEFT adapters are merged for the copy, then unmerged)."""
        vllm_model = self._vllm_model()
        if vllm_model is not None:
            # one tensor at a time, while the adapters are merged: no second copy of the model
            for name, tensor in _named_weights_for_vllm(model):
                vllm_model.load_weights([(name, tensor)])
        else:
            # Newer vLLM runs the model in worker processes; ask each worker to load a snapshot.
            named = [(name, tensor.clone()) for name, tensor in _named_weights_for_vllm(model)]
            self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(named))
        self.llm.reset_prefix_cache()

    def generate(
        self,
        prompt_ids: list[list[int]] | torch.Tensor,
        *,
        num_generations: int = 1,
        sampling: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        prompt_mask: torch.Tensor | None = None,
        prompt_keys: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """Same contract as :meth:`HFRolloutEngine.generate`. ``generator`` seeds vLLM's sampler per
        request (one draw from it), since vLLM cannot take a torch generator; ``prompt_keys`` seed each
        prompt's request from its own key instead (the draws differ from the HF engine's)."""
        sampling = sampling if sampling is not None else SamplingParams()
        check_num_generations(num_generations)
        prompts = normalize_prompts(prompt_ids, self.pad_token_id, prompt_mask)
        seed = None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        if prompt_keys is not None:
            seeds = [int(key) % (2**31 - 1) for key in prompt_keys.tolist()]
            params = [self._sampling_params(sampling, num_generations, s) for s in seeds]
        else:
            params = self._sampling_params(sampling, num_generations, seed)
        requests = [{"prompt_token_ids": ids} for ids in prompts]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        return self._to_batch(prompts, outputs, num_generations)

    def _sampling_params(self, sampling: SamplingParams, num_generations: int, seed: int | None):
        return self._vllm.SamplingParams(
            n=num_generations,
            max_tokens=sampling.max_completion_length,
            temperature=0.0 if sampling.is_greedy else sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k else -1,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            stop=sampling.stop_strings,
            include_stop_str_in_output=True,
            stop_token_ids=self.eos_token_ids or None,
            seed=seed,
        )

    def _to_batch(self, prompts: list[list[int]], outputs: list[Any], group_size: int) -> RolloutBatch:
        completions: list[list[int]] = []
        truncated: list[bool] = []
        for request in outputs:
            for sample in request.outputs:
                completions.append(list(sample.token_ids))
                truncated.append(sample.finish_reason == "length")
        device = self.device
        unique_ids, unique_mask = left_pad(prompts, self.pad_token_id, device)
        completion_ids, completion_mask = right_pad(completions, self.pad_token_id, device)
        return RolloutBatch(
            prompt_ids=unique_ids.repeat_interleave(group_size, dim=0),
            prompt_mask=unique_mask.repeat_interleave(group_size, dim=0),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            is_truncated=torch.tensor(truncated, dtype=torch.bool, device=device),
            prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
            group_size=group_size,
        )


def _unwrap_peft(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """``{base weight name: delta}`` for every LoRA layer, or None when some adapter layer is not LoRA."""
    deltas: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if not hasattr(module, "base_layer") or not hasattr(module, "active_adapters"):
            continue
        if not hasattr(module, "lora_A") or not hasattr(module, "get_delta_weight"):
            return None
        if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A or a in getattr(module, "lora_embedding_A", {})]
        if active:
            deltas[f"{module_name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in active)
    return deltas


def _named_weights_for_vllm(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs under the plain Hugging Face names vLLM expects.

    For a LoRA model each adapted weight is sent as ``W + scale * B @ A``, computed aside: the model's
    own weights are never touched (merging and unmerging in place would add rounding error to the
    frozen base weights at every sync). Other PEFT adapters are merged while the generator runs and
    unmerged when it finishes. PEFT's name decorations (``base_model.model.``, ``.base_layer``,
    ``.modules_to_save.<adapter>``) are removed.
    """
    if not hasattr(model, "peft_config"):
        for name, param in model.named_parameters():
            yield name, param.data
        return
    with torch.no_grad():
        deltas = _lora_deltas(model)
        merged_in_place = deltas is None
        if merged_in_place:
            model.merge_adapter()
        try:
            for name, param in model.named_parameters():
                # adapter matrices are folded into their base weight; `original_module` is the frozen
                # twin of a `modules_to_save` layer, whose trained copy is the one to send
                if "lora_" in name or ".original_module." in name:
                    continue
                tensor = param.data
                if not merged_in_place and name in deltas:
                    tensor = tensor + deltas[name].to(tensor.dtype)
                clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
                yield re.sub(r"\.modules_to_save\.[^.]+", "", clean), tensor
        finally:
            if merged_in_place:
                model.unmerge_adapter()
