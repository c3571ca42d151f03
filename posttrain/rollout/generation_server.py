"""The generation server behind ``posttrain vllm-serve``: the HTTP side of :mod:`posttrain.rollout.server_engine`.

Two backends answer the same requests:

* ``vllm``: :class:`~posttrain.rollout.vllm_engine.VLLMRolloutEngine` in this process (CUDA + vllm),
  with tensor parallelism, memory fraction, ``max_model_len`` and the model implementation passed through;
* ``hf``: :class:`~posttrain.rollout.hf_engine.HFRolloutEngine` on a ``transformers`` model, on CPU or one
  GPU; for machines without vLLM, and what the tests run against.

One lock serialises generation and weight updates (a request from one trainer process waits for
another's), while ``/health`` answers at once.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from posttrain.errors import ConfigError, PosttrainError
from posttrain.rollout.sampling import SamplingParams

logger = logging.getLogger("posttrain")

BACKENDS = ("auto", "vllm", "hf")


class HFBackend:
    """Serves generation with a ``transformers`` causal LM and posttrain's HF engine."""

    name = "hf"

    def __init__(self, model: str, *, dtype: str = "auto", device: str | None = None, tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from posttrain.rollout.hf_engine import HFRolloutEngine

        if tensor_parallel_size != 1:
            raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} with the hf backend, which runs the model "
                              "in one process on one device", field="tensor_parallel_size",
                              fix="use --backend vllm on a machine with that many GPUs, or --tensor_parallel_size 1")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        self.model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.engine = HFRolloutEngine(self.model, tokenizer, sampler_logprobs=True)
        self.parameters = dict(self.model.named_parameters())
        self.info = {"backend": self.name, "model": model, "logprobs_mode": "processed_logprobs",
                     "tensor_parallel_size": 1, "dtype": str(next(self.model.parameters()).dtype)}

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("structured_outputs_regex"):
            raise ConfigError("structured outputs (vllm_structured_outputs_regex) need the vllm backend",
                              field="vllm_structured_outputs_regex", fix="start the server with --backend vllm, or unset it")
        self.engine.eos_token_ids = [int(t) for t in request["eos_token_ids"]]
        self.engine.pad_token_id = int(request["pad_token_id"])
        keys = request.get("prompt_keys")
        device = self.engine.device
        generator = None
        if keys is None and request.get("seed") is not None:
            generator = torch.Generator(device=device).manual_seed(int(request["seed"]))
        batch = self.engine.generate(
            request["prompts"], num_generations=int(request["num_generations"]),
            sampling=SamplingParams(**request["sampling"]), generator=generator,
            prompt_keys=None if keys is None else torch.tensor(keys, dtype=torch.int64, device=device),
        )
        completions = batch.completion_token_lists()
        logps = [row[: len(ids)] for row, ids in zip(batch.sampler_logps.tolist(), completions)]
        return {"completion_ids": completions, "is_truncated": batch.is_truncated.tolist(), "sampler_logps": logps}

    def logprobs(self, prompts: list[list[int]], completions: list[list[int]], temperature: float) -> list[list[float]]:
        from posttrain.rollout.batch import left_pad, right_pad
        from posttrain.rollout.sequences import RolloutSequences, completion_token_logps

        device = self.engine.device
        prompt_ids, prompt_mask = left_pad(prompts, self.engine.pad_token_id, device)
        completion_ids, completion_mask = right_pad(completions, self.engine.pad_token_id, device)
        rows = RolloutSequences(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                                completion_mask=completion_mask, loss_mask=completion_mask,
                                is_truncated=torch.zeros(len(prompts), dtype=torch.bool, device=device))
        with torch.no_grad():
            logps, _ = completion_token_logps(self.model, rows, temperature=temperature)
        return [row[: len(ids)] for row, ids in zip(logps.tolist(), completions)]

    def load_named(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():  # the whole chunk is checked before any of it is copied
            target = self.parameters.get(name)
            if target is None:
                raise ConfigError(f"the trainer sent a parameter {name!r} that the served model does not have",
                                  field="model", fix="serve the same model the trainer trains")
            if target.shape != tensor.shape:
                raise ConfigError(f"parameter {name!r}: the trainer sent shape {tuple(tensor.shape)}, the served "
                                  f"model has {tuple(target.shape)}", field="model",
                                  fix="serve the same model the trainer trains")
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.parameters[name].copy_(tensor.to(self.parameters[name].device))

    def expected_names(self) -> set[str] | None:
        return set(self.parameters)

    def after_weight_update(self) -> None:
        """Nothing cached depends on the weights."""


class VLLMBackend:
    """Serves generation with vLLM in this process; each weight chunk goes straight into vLLM's model."""

    name = "vllm"

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 dtype: str = "auto", max_model_len: int | None = None, vllm_model_impl: str = "vllm",
                 enforce_eager: bool = False, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        from posttrain.rollout.vllm_engine import VLLMRolloutEngine

        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        # processed log-probs: after temperature and top-k/top-p, the distribution tokens were drawn from
        llm_kwargs = {"logprobs_mode": "processed_logprobs", "enforce_eager": enforce_eager,
                      "trust_remote_code": trust_remote_code}
        self.engine = VLLMRolloutEngine(
            model, tokenizer, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, dtype=dtype,
            tensor_parallel_size=tensor_parallel_size, model_impl=vllm_model_impl, sampler_logprobs=True,
            llm_kwargs=llm_kwargs,
        )
        self.info = {"backend": self.name, "model": model, "logprobs_mode": "processed_logprobs",
                     "tensor_parallel_size": tensor_parallel_size, "dtype": dtype}

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        self.engine.eos_token_ids = [int(t) for t in request["eos_token_ids"]]
        self.engine.pad_token_id = int(request["pad_token_id"])
        self.engine.structured_outputs_regex = request.get("structured_outputs_regex")
        keys = request.get("prompt_keys")
        generator = None
        if keys is None and request.get("seed") is not None:
            generator = torch.Generator().manual_seed(int(request["seed"]))
        batch = self.engine.generate(
            request["prompts"], num_generations=int(request["num_generations"]),
            sampling=SamplingParams(**request["sampling"]), generator=generator,
            prompt_keys=None if keys is None else torch.tensor(keys, dtype=torch.int64),
        )
        completions = batch.completion_token_lists()
        logps = None
        if batch.sampler_logps is not None:
            logps = [row[: len(ids)] for row, ids in zip(batch.sampler_logps.tolist(), completions)]
        return {"completion_ids": completions, "is_truncated": batch.is_truncated.tolist(), "sampler_logps": logps}

    def logprobs(self, prompts: list[list[int]], completions: list[list[int]], temperature: float) -> list[list[float]]:
        return self.engine.sequence_logps(prompts, completions, temperature)

    def load_named(self, tensors: dict[str, torch.Tensor]) -> None:
        self.engine.load_named_weights(list(tensors.items()))

    def expected_names(self) -> set[str] | None:
        return None  # vLLM fuses and renames layers; it checks names itself

    def after_weight_update(self) -> None:
        self.engine.llm.reset_prefix_cache()


def build_backend(backend: str, model: str, **options: Any):
    """The backend ``backend`` names (``auto``: vllm when it is installed and a GPU is present, else an error)."""
    import importlib.util

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}", field="backend", fix=f"use one of {', '.join(BACKENDS)}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "auto":
        if not has_vllm:
            raise ConfigError(
                "`posttrain vllm-serve` serves with vLLM, and the vllm package is not installed",
                field="backend", fix="`pip install vllm` on a machine with a CUDA GPU, or pass --backend hf to serve "
                "with transformers (slower; for CPU machines and tests)",
            )
        backend = "vllm"
    if backend == "vllm":
        hf_only = {"device"}
        return VLLMBackend(model, **{k: v for k, v in options.items() if k not in hf_only})
    vllm_only = {"gpu_memory_utilization", "max_model_len", "vllm_model_impl", "enforce_eager"}
    return HFBackend(model, **{k: v for k, v in options.items() if k not in vllm_only})


class GenerationServer:
    """The HTTP endpoints of :mod:`posttrain.rollout.server_engine` around one backend."""

    def __init__(self, backend, host: str = "0.0.0.0", port: int = 8000) -> None:
        self.backend = backend
        self.lock = threading.Lock()
        self.weights_version = 0
        self._received: set[str] | None = None
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self) -> None:
        logger.info("posttrain vllm-serve: %s backend serving %s on port %d", self.backend.name,
                    self.backend.info["model"], self.port)
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ the endpoints

    def handle(self, method: str, path: str, payload: Any, body: bytes) -> dict[str, Any]:
        if (method, path) == ("GET", "/health"):
            return {"status": "ok"}
        with self.lock:
            if (method, path) == ("GET", "/server_info"):
                return {**self.backend.info, "weights_version": self.weights_version}
            if (method, path) == ("POST", "/generate"):
                return self.backend.generate(payload)
            if (method, path) == ("POST", "/logprobs"):
                return {"logps": self.backend.logprobs(payload["prompts"], payload["completions"],
                                                       float(payload.get("temperature", 1.0)))}
            if (method, path) == ("POST", "/start_weight_update"):
                self._received = set()
                return {}
            if (method, path) == ("POST", "/update_weights"):
                from safetensors.torch import load

                if self._received is None:
                    raise ConfigError("a weight chunk arrived outside a weight update", field="vllm_server_base_url",
                                      fix="POST /start_weight_update first")
                tensors = load(body)
                self.backend.load_named(tensors)
                self._received |= set(tensors)
                return {"loaded": len(tensors)}
            if (method, path) == ("POST", "/finish_weight_update"):
                expected, received = self.backend.expected_names(), self._received or set()
                self._received = None
                if expected is not None and expected - received:
                    missing = sorted(expected - received)
                    raise ConfigError(f"the weight update lacked {len(missing)} parameters, e.g. {missing[:3]}",
                                      field="model", fix="serve the same model the trainer trains")
                self.backend.after_weight_update()
                self.weights_version += 1
                return {"weights_version": self.weights_version}
        raise KeyError(path)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002  (the base class's name)
                logger.debug("vllm-serve: " + format, *args)

            def _answer(self, status: HTTPStatus, content: dict[str, Any]) -> None:
                data = json.dumps(content).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                try:
                    is_json = self.headers.get("Content-Type", "").startswith("application/json")
                    payload = json.loads(body) if is_json and body else None
                    self._answer(HTTPStatus.OK, server.handle(method, path, payload, body))
                except KeyError as error:
                    if error.args and error.args[0] == path:
                        self._answer(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {method} {path}"})
                    else:
                        self._answer(HTTPStatus.BAD_REQUEST, {"error": f"the request lacks {error}"})
                except PosttrainError as error:
                    self._answer(HTTPStatus.BAD_REQUEST, {"error": str(error)})
                except Exception as error:  # report it to the trainer instead of dropping the connection
                    logger.exception("vllm-serve: %s %s failed", method, path)
                    self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"})

            def do_GET(self):  # noqa: N802  (http.server's naming)
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

        return Handler
