"""`posttrain vllm-serve`: a generation server that a trainer with ``use_vllm=True, vllm_mode="server"`` samples from.

    posttrain vllm-serve --model Qwen/Qwen3-0.6B --tensor_parallel_size 2 --port 8000    # vLLM on 2 GPUs
    posttrain vllm-serve --model ./tiny-model --backend hf --port 8000                   # no vLLM: transformers

The trainer pushes its weights to the server after every optimizer step and asks it for completions
(endpoints in :mod:`posttrain.rollout.server_engine`). Run it on GPUs the trainer does not use, e.g.
``CUDA_VISIBLE_DEVICES=2,3 posttrain vllm-serve ...`` beside ``CUDA_VISIBLE_DEVICES=0,1 posttrain grpo ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.cli.parser import parse_command


@dataclass
class ServeArguments:
    """What to serve, where, and with which backend (names as in TRL's ``trl vllm-serve``)."""

    model: str = field(metadata={"help": "Model directory or hub id to serve: the model the trainer starts from."})
    backend: str = field(
        default="auto",
        metadata={"help": "vllm (needs the vllm package and a CUDA GPU), hf (transformers, runs on CPU), or auto "
                  "(vllm; an error without it)."},
    )
    host: str = field(default="0.0.0.0", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on (0: any free port, printed at start)."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs vLLM shards the model over (vllm backend)."})
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "Fraction of each GPU's memory vLLM may take (vllm backend)."}
    )
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto (the checkpoint's), float32, bfloat16, float16."})
    max_model_len: int | None = field(
        default=None, metadata={"help": "Longest prompt + completion vLLM must hold (vllm backend; default: the model's)."}
    )
    enforce_eager: bool = field(default=False, metadata={"help": "Run vLLM without CUDA graphs (vllm backend)."})
    vllm_model_impl: str = field(
        default="vllm", metadata={"help": "vLLM's model code: vllm (its own) or transformers (vllm backend)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code to run when loading."})
    device: str | None = field(default=None, metadata={"help": "hf backend: cpu or cuda (default: cuda when present)."})


def main(argv: list[str]) -> int:
    from posttrain.errors import ConfigError
    from posttrain.rollout.generation_server import GenerationServer, build_backend

    (args,) = parse_command("posttrain vllm-serve", (ServeArguments,), argv,
                            description="Serve generation and weight updates for vllm_mode='server'.")
    if args.vllm_model_impl not in ("vllm", "transformers"):
        raise ConfigError(f"unknown vllm_model_impl {args.vllm_model_impl!r}", field="vllm_model_impl",
                          fix="use vllm or transformers")
    options = dict(tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
                   dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                   vllm_model_impl=args.vllm_model_impl, trust_remote_code=args.trust_remote_code, device=args.device)
    backend = build_backend(args.backend, args.model, **options)
    server = GenerationServer(backend, args.host, args.port)
    # the line a launcher (or a test) reads to learn the port when --port 0 picked one
    print(f"posttrain vllm-serve: {backend.name} backend serving {args.model} at http://{args.host}:{server.port}",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    return 0
