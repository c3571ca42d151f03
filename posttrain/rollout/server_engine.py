"""Generation on a separate server (``vllm_mode="server"``), behind the same interface as the in-process engines.

The trainer keeps the policy; a server started with ``posttrain vllm-serve`` holds a copy of it and
samples. The client speaks JSON over HTTP (standard library only):

====================  ======  ============================================================================
path                  method  what it does
====================  ======  ============================================================================
``/health``           GET     200 once the server can generate
``/server_info``      GET     backend (``vllm`` or ``hf``), model, weights version, logprobs mode, tp size
``/generate``         POST    token-id prompts, sampling settings and one sampling key per prompt ->
                              completion ids, truncation flags and the sampler's log-prob of each token
``/logprobs``         POST    prompt + completion ids -> the server's log-probs of the completion tokens
``/start_weight_update``  POST  begin a weight push
``/update_weights``   POST    one chunk of named tensors as safetensors bytes (``application/octet-stream``)
``/finish_weight_update`` POST  check every parameter arrived, bump the weights version
====================  ======  ============================================================================

After every optimizer step the trainer pushes the policy's weights (PEFT adapters merged, plain
Hugging Face names) in chunks of at most ``chunk_bytes``. That moves the weights through the host on
both sides; with vLLM on other GPUs, TRL's server instead joins an NCCL group (``vllm_group_port``) and
broadcasts GPU to GPU, which is the faster path for large models and not implemented here.

Sampling keys travel with the prompts, so the server draws each prompt's completions from its own key:
the same prompts give the same completions whatever the batch or the number of trainer processes.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.rollout.batch import RolloutBatch, check_num_generations, left_pad, normalize_prompts, right_pad
from posttrain.rollout.sampling import SamplingParams

#: the ``/generate`` request carries these fields of :class:`SamplingParams`
SAMPLING_FIELDS = ("max_completion_length", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "stop_strings", "do_sample")
DEFAULT_CHUNK_BYTES = 256 * 2**20


def server_url(base_url: str | None, host: str = "0.0.0.0", port: int = 8000) -> str:
    """``base_url`` without its trailing slash, else ``http://host:port`` (TRL's precedence)."""
    if base_url:
        return base_url.rstrip("/")
    return f"http://{host}:{port}"


def _default_eos_and_pad(tokenizer, eos_token_ids, pad_token_id) -> tuple[list[int], int]:
    if eos_token_ids is None:
        eos_token_ids = [] if getattr(tokenizer, "eos_token_id", None) is None else [tokenizer.eos_token_id]
    eos = [eos_token_ids] if isinstance(eos_token_ids, int) else [int(t) for t in eos_token_ids]
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None and eos:
        pad_token_id = eos[0]
    if pad_token_id is None:
        raise ConfigError("no pad token id", field="pad_token_id", fix="pass pad_token_id= or set tokenizer.pad_token")
    return eos, int(pad_token_id)


class ServerRolloutEngine:
    """Samples completions on a generation server; pushes the policy's weights to it on :meth:`load_weights`.

    Args:
        model: the policy (its device is where returned tensors go; its weights are pushed at construction),
            or None to sample with whatever the server holds.
        tokenizer: for the default EOS / pad ids.
        base_url / host / port: where the server listens (``base_url`` wins, as in TRL).
        timeout: seconds to wait for ``/health`` to answer before giving up (``vllm_server_timeout``).
        request_timeout: seconds one generation or weight request may take.
        chunk_bytes: most tensor bytes per ``/update_weights`` request.
        structured_outputs_regex: constrain completions to this regex (vLLM backend only).
        sync_weights: whether this client pushes weights. The server holds one copy, so with several trainer
            processes one pushes (True) and the others pass False and wait for it.

    Raises ConfigError when the server does not answer within ``timeout`` or answers with an error.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        tokenizer=None,
        *,
        base_url: str | None = None,
        host: str = "0.0.0.0",
        port: int = 8000,
        timeout: float = 240.0,
        request_timeout: float = 3600.0,
        eos_token_ids: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        structured_outputs_regex: str | None = None,
        sync_weights: bool = True,
    ) -> None:
        self.url = server_url(base_url, host, port)
        self.timeout = float(timeout)
        self.request_timeout = float(request_timeout)
        self.chunk_bytes = int(chunk_bytes)
        self.structured_outputs_regex = structured_outputs_regex
        self.sync_weights = sync_weights
        eos, pad = _default_eos_and_pad(tokenizer, eos_token_ids, pad_token_id)
        self.eos_token_ids = eos
        self.pad_token_id = pad
        parameter = next(iter(model.parameters()), None) if model is not None else None
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        self.wait_until_ready()
        self.info = self._request("GET", "/server_info")
        if model is not None:
            self.load_weights(model)

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, payload: Any = None, *, body: bytes | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
        headers = {}
        if payload is not None:
            body, headers["Content-Type"] = json.dumps(payload).encode(), "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.request_timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            try:
                detail = json.loads(error.read()).get("error", "")
            except ValueError:
                detail = ""
            raise ConfigError(f"the generation server at {self.url} refused {path}: {detail or error}",
                              field="vllm_server_base_url",
                              fix="check that the server serves the policy's model (posttrain vllm-serve --model ...)") from None
        except (urllib.error.URLError, OSError) as error:
            raise ConfigError(f"lost the generation server at {self.url} during {path}: {error}",
                              field="vllm_server_base_url", fix="check that `posttrain vllm-serve` is still running") from None

    def wait_until_ready(self) -> None:
        """Poll ``/health`` until it answers 200; ConfigError naming ``vllm_server_timeout`` after ``timeout`` seconds."""
        deadline = time.monotonic() + self.timeout
        last_error: object = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=max(0.05, min(remaining, 5.0))) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as error:
                last_error = getattr(error, "reason", error)
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        raise ConfigError(
            f"the generation server at {self.url} did not answer /health within vllm_server_timeout="
            f"{self.timeout:g} s (last: {last_error})", field="vllm_server_timeout",
            fix="start it first (`posttrain vllm-serve --model MODEL --port PORT`), check vllm_server_base_url / "
            "vllm_server_host / vllm_server_port, or raise vllm_server_timeout while a large model loads",
        )

    # ------------------------------------------------------------------ the engine interface

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
        """Same contract as :meth:`HFRolloutEngine.generate`; ``RolloutBatch.sampler_logps`` holds the
        server's log-probs. ``generator`` gives one seed for the whole request (one draw from it)."""
        sampling = sampling if sampling is not None else SamplingParams()
        check_num_generations(num_generations)
        prompts = normalize_prompts(prompt_ids, self.pad_token_id, prompt_mask)
        if prompt_keys is not None and prompt_keys.numel() != len(prompts):
            raise ConfigError(f"{prompt_keys.numel()} prompt_keys for {len(prompts)} prompts", field="prompt_keys",
                              fix="pass one sampling key per prompt")
        seed = None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        payload = {
            "prompts": prompts, "num_generations": num_generations,
            "sampling": {name: getattr(sampling, name) for name in SAMPLING_FIELDS},
            "prompt_keys": None if prompt_keys is None else [int(key) for key in prompt_keys.tolist()],
            "seed": seed, "eos_token_ids": self.eos_token_ids, "pad_token_id": self.pad_token_id,
            "structured_outputs_regex": self.structured_outputs_regex,
        }
        answer = self._request("POST", "/generate", payload)
        return rollout_batch_from_answer(prompts, answer, num_generations, self.pad_token_id, self.device)

    def load_weights(self, model: torch.nn.Module) -> None:
        """Push ``model``'s current weights to the server (PEFT adapters merged; plain Hugging Face names);
        nothing when this client does not ``sync_weights``."""
        from posttrain.rollout.vllm_engine import _named_weights_for_vllm

        if not self.sync_weights:
            return
        self._request("POST", "/start_weight_update", {})
        for chunk in _chunks(_named_weights_for_vllm(model), self.chunk_bytes):
            self._request("POST", "/update_weights", body=chunk)
        self.info["weights_version"] = self._request("POST", "/finish_weight_update", {})["weights_version"]

    def sequence_logps(
        self, prompts: list[list[int]], completions: list[list[int]], temperature: float = 1.0
    ) -> list[list[float]]:
        """The server's log-prob of each completion token after its prompt (logits divided by ``temperature``)."""
        answer = self._request("POST", "/logprobs",
                               {"prompts": prompts, "completions": completions, "temperature": temperature})
        return answer["logps"]


def _chunks(named: Iterator[tuple[str, torch.Tensor]], chunk_bytes: int) -> Iterator[bytes]:
    """safetensors bytes of consecutive groups of tensors, each group at most ``chunk_bytes`` (or one tensor)."""
    from safetensors.torch import save

    group: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in named:
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > chunk_bytes:
            yield save(group)
            group, size = {}, 0
        group[name] = tensor
        size += nbytes
    if group:
        yield save(group)


def rollout_batch_from_answer(
    prompts: list[list[int]], answer: dict[str, Any], group_size: int, pad_token_id: int, device: torch.device
) -> RolloutBatch:
    """A :class:`RolloutBatch` from a ``/generate`` answer (completion lists, flags and log-probs, prompt-major)."""
    completions = answer["completion_ids"]
    if len(completions) != len(prompts) * group_size:
        raise ConfigError(f"the server returned {len(completions)} completions for {len(prompts)} prompts x {group_size}",
                          field="vllm_server_base_url", fix="use a server started by `posttrain vllm-serve`")
    unique_ids, unique_mask = left_pad(prompts, pad_token_id, device)
    completion_ids, completion_mask = right_pad(completions, pad_token_id, device)
    sampler_logps = None
    if answer.get("sampler_logps") is not None:
        width = completion_ids.shape[1]
        rows = [[float("nan") if v is None else float(v) for v in row] + [0.0] * (width - len(row))
                for row in answer["sampler_logps"]]
        sampler_logps = torch.tensor(rows, dtype=torch.float32, device=device)
    return RolloutBatch(
        prompt_ids=unique_ids.repeat_interleave(group_size, dim=0),
        prompt_mask=unique_mask.repeat_interleave(group_size, dim=0),
        completion_ids=completion_ids, completion_mask=completion_mask,
        is_truncated=torch.tensor(answer["is_truncated"], dtype=torch.bool, device=device),
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
        group_size=group_size, sampler_logps=sampler_logps,
    )
