"""Generation with a colocated vLLM engine, behind the same ``generate`` interface as the HF engine.

vLLM is imported only when this engine is built. The policy being trained stays a Hugging Face
model; :meth:`VLLMRolloutEngine.load_weights` copies its current weights into vLLM before a rollout.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable, Iterator, Sequence
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
        tensor_parallel_size: GPUs vLLM shards the model over (``vllm_tensor_parallel_size``).
        model_impl: ``"vllm"`` (vLLM's own model code) or ``"transformers"`` (``vllm_model_impl``).
        enable_sleep_mode: free vLLM's GPU memory between rollouts (weights offloaded, KV cache dropped),
            so the optimizer step has it; waking costs a host-to-device copy (``vllm_enable_sleep_mode``).
        sampler_logprobs: return each sampled token's log-prob (``RolloutBatch.sampler_logps``), for the
            importance-sampling correction.
        structured_outputs_regex: constrain completions to this regular expression (``vllm_structured_outputs_regex``).
        llm_kwargs: passed unchanged to ``vllm.LLM``.

    Raises ConfigError at construction when vllm is not installed, no CUDA GPU is present, or fewer GPUs
    than ``tensor_parallel_size``.
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
        tensor_parallel_size: int = 1,
        model_impl: str = "vllm",
        enable_sleep_mode: bool = False,
        sampler_logprobs: bool = False,
        structured_outputs_regex: str | None = None,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _check_vllm_available()
        if tensor_parallel_size > 1 and tensor_parallel_size > torch.cuda.device_count():
            raise ConfigError(f"vllm_tensor_parallel_size={tensor_parallel_size} but {torch.cuda.device_count()} CUDA "
                              "GPU(s) are visible", field="vllm_tensor_parallel_size",
                              fix="lower it to the number of GPUs, or make more GPUs visible")
        self.sampler_logprobs = sampler_logprobs
        self.structured_outputs_regex = structured_outputs_regex
        self.sleep_mode = enable_sleep_mode
        self._asleep = False
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
            tensor_parallel_size=tensor_parallel_size,
            model_impl=model_impl,
        )
        if enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if sampler_logprobs:  # log-probs of the distribution tokens are drawn from (after temperature, top-k/p)
            kwargs["logprobs_mode"] = "processed_logprobs"
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
        self.load_named_weights(_named_weights_for_vllm(model))
        self.llm.reset_prefix_cache()

    def load_named_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load ``(Hugging Face name, tensor)`` pairs into vLLM's model (the prefix cache is the caller's to reset)."""
        self._wake()
        vllm_model = self._vllm_model()
        if vllm_model is not None:
            # one tensor at a time, while the adapters are merged: no second copy of the model
            for name, tensor in named:
                vllm_model.load_weights([(name, tensor)])
        else:
            # Newer vLLM runs the model in worker processes; ask each worker to load a snapshot.
            snapshot = [(name, tensor.clone()) for name, tensor in named]
            self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(snapshot))

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def sleep(self) -> None:
        """With sleep mode, hand vLLM's GPU memory back until the next rollout or weight load."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def sequence_logps(
        self, prompts: list[list[int]], completions: list[list[int]], temperature: float = 1.0
    ) -> list[list[float]]:
        """vLLM's log-prob of each completion token after its prompt (its prompt-logprobs of prompt + completion)."""
        self._wake()
        params = self._vllm.SamplingParams(max_tokens=1, temperature=temperature, prompt_logprobs=0)
        requests = [{"prompt_token_ids": p + c} for p, c in zip(prompts, completions)]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        result = []
        for output, prompt, completion in zip(outputs, prompts, completions):
            positions = output.prompt_logprobs[len(prompt):]
            result.append([_token_logprob(entry, token) for entry, token in zip(positions, completion)])
        return result

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
        self._wake()
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        self.sleep()
        return self._to_batch(prompts, outputs, num_generations)

    def _sampling_params(self, sampling: SamplingParams, num_generations: int, seed: int | None):
        extra: dict[str, Any] = {}
        if self.sampler_logprobs:
            extra["logprobs"] = 0  # the sampled token's own log-prob
        if self.structured_outputs_regex:
            extra.update(_structured_outputs(self._vllm, self.structured_outputs_regex))
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
            **extra,
        )

    def _to_batch(self, prompts: list[list[int]], outputs: list[Any], group_size: int) -> RolloutBatch:
        completions: list[list[int]] = []
        truncated: list[bool] = []
        logps: list[list[float]] = []
        for request in outputs:
            for sample in request.outputs:
                completions.append(list(sample.token_ids))
                truncated.append(sample.finish_reason == "length")
                entries = getattr(sample, "logprobs", None) or [None] * len(sample.token_ids)
                logps.append([_token_logprob(entry, token) for entry, token in zip(entries, sample.token_ids)])
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
            sampler_logps=_pad_logps(logps, completion_ids.shape[1], device) if self.sampler_logprobs else None,
        )


def _token_logprob(entry: Any, token: int) -> float:
    """The log-prob of ``token`` in one position of vLLM's logprobs (a dict token -> Logprob), NaN if absent."""
    if entry is None:
        return float("nan")
    value = entry.get(token) if hasattr(entry, "get") else None
    if value is None:
        return float("nan")
    return float(getattr(value, "logprob", value))


def _pad_logps(rows: list[list[float]], width: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([row + [0.0] * (width - len(row)) for row in rows], dtype=torch.float32, device=device)


def _structured_outputs(vllm: Any, regex: str) -> dict[str, Any]:
    """The SamplingParams argument that constrains output to ``regex`` (its name changed across vLLM versions)."""
    sampling_params = getattr(vllm, "sampling_params", None)
    structured = getattr(sampling_params, "StructuredOutputsParams", None)
    if structured is not None:
        return {"structured_outputs": structured(regex=regex)}
    guided = getattr(sampling_params, "GuidedDecodingParams", None)
    if guided is not None:
        return {"guided_decoding": guided(regex=regex)}
    raise ConfigError("this vLLM version offers no regex-constrained decoding", field="vllm_structured_outputs_regex",
                      fix="upgrade vllm, or unset vllm_structured_outputs_regex")


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
