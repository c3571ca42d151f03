"""The matrix products of one GRPO step alone, timed at their real shapes: a floor under any library's step.

    python -m benchmarks.matmul_floor                       # the small workload, the benchmark's GRPO settings
    python -m benchmarks.matmul_floor --measure --rounds 2  # also both libraries' steps, alternated

Whatever the library, a GRPO step of ``rows`` completions (``groups`` prompts x G) of ``new_tokens``
tokens does at least these products with the model's weights:

- prefill: every linear layer over the prompt tokens, and the head over the last prompt position;
- decode: ``new_tokens - 1`` steps, each every linear layer and the head over ``(rows, in)``;
- training forward: every linear layer over the training tokens, the head over the completion positions;
- training backward: two products per linear layer and for the head (the input's gradient, the weight's).

The training tokens are ``groups x prompt + rows x completion`` when the completions of a prompt share
its forward (posttrain's ``share_prompt_forward``), ``rows x (prompt + completion)`` when each row runs
whole (TRL). A pass of each phase is timed with ``F.linear`` / ``torch.mm`` on random float32
tensors of the step's shapes, every occurrence with operands of its own so that the weights come
from memory as in the step, not from cache (one thread, the best of ``--repeats``), and multiplied
by how often the step makes that pass. Nothing else is counted (attention scores, norms,
activations, sampling, the loss, the optimizer, Python), so no step of either library can be faster
than its floor, and TRL's step divided by posttrain's floor bounds the speed-up any implementation
of posttrain's arithmetic could show.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class StepShape:
    """What one GRPO step processes."""

    groups: int  # distinct prompts
    rows: int  # completions (groups x G)
    prompt_tokens: int
    new_tokens: int


def linear_shapes(config) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear layer of a Llama/Qwen2-style decoder's layers (the head excluded)."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    query = config.num_attention_heads * head_dim
    key_value = config.num_key_value_heads * head_dim
    per_layer = [(hidden, query), (hidden, key_value), (hidden, key_value), (query, hidden),
                 (hidden, config.intermediate_size), (hidden, config.intermediate_size),
                 (config.intermediate_size, hidden)]
    return per_layer * config.num_hidden_layers


def step_products(config, shape: StepShape, share_prompt: bool) -> dict[str, tuple[int, Counter]]:
    """Per phase, ``(passes, products)``: the phase runs ``passes`` times a pass that does each product
    ``(kind, m, k, n)`` (an ``(m, k) x (k, n)`` product; ``kind`` "forward" for ``F.linear``, "grad_input" or
    "grad_weight") as often as counted, each time with another layer's weight."""
    layers = linear_shapes(config)
    head = (config.hidden_size, config.vocab_size)

    def forward(tokens: int, head_tokens: int) -> Counter:
        counts = Counter((("forward", tokens, k, n) for k, n in layers))
        counts[("forward", head_tokens, *head)] += 1
        return counts

    def backward(tokens: int, head_tokens: int) -> Counter:
        counts: Counter = Counter()
        for (k, n), m in [*((layer, tokens) for layer in layers), (head, head_tokens)]:
            counts[("grad_input", m, n, k)] += 1  # (m, out) x (out, in)
            counts[("grad_weight", n, m, k)] += 1  # (out, m) x (m, in)
        return counts

    prefill_tokens = shape.groups * shape.prompt_tokens
    completion_tokens = shape.rows * shape.new_tokens
    train_tokens = (prefill_tokens if share_prompt else shape.rows * shape.prompt_tokens) + completion_tokens
    return {
        "prefill": (1, forward(prefill_tokens, shape.groups)),
        "decode": (shape.new_tokens - 1, forward(shape.rows, shape.rows)),
        "training forward": (1, forward(train_tokens, completion_tokens)),
        "training backward": (1, backward(train_tokens, completion_tokens)),
    }


def flops(phase: tuple[int, Counter]) -> int:
    passes, counts = phase
    return passes * sum(2 * m * k * n * count for (_, m, k, n), count in counts.items())


def _operands(kind: str, m: int, k: int, n: int):
    """Random float32 operands of one product, laid out as the step has them, and the call that multiplies them."""
    if kind == "forward":
        left, weight = torch.randn(m, k), torch.randn(n, k)  # nn.Linear's (out, in) weight
        return lambda: torch.nn.functional.linear(left, weight)
    if kind == "grad_input":
        left, weight = torch.randn(m, k), torch.randn(k, n)  # the gradient times the (out, in) weight
        return lambda: torch.mm(left, weight)
    grad, inputs = torch.randn(k, m), torch.randn(k, n)  # the gradient's transpose (strided, as autograd
    return lambda: torch.mm(grad.t(), inputs)  # passes it) times the layer input


def time_pass(counts: Counter, repeats: int) -> float:
    """Best seconds of one pass of ``counts``' products, each occurrence with operands of its own: every
    layer has its own weights, so a pass reads them all from memory as the step does (a single weight
    timed in a loop would stay in cache and look faster than it is in a decode step)."""
    calls = [_operands(*key) for key, count in counts.items() for _ in range(count)]
    for call in calls:
        call()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - started)
    return best


def floor_seconds(phases: dict[str, tuple[int, Counter]], repeats: int) -> dict[str, float]:
    """Seconds of each phase's products: the best pass times the number of passes."""
    return {phase: passes * time_pass(counts, repeats) for phase, (passes, counts) in phases.items()}


def small_workload_shape(new_tokens: int) -> tuple[object, StepShape]:
    """The small workload's model config and the shape of the benchmark's GRPO step (8 rows, G = 4)."""
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from benchmarks.workloads import WORKLOADS, model_dir, prompt_dataset_file

    workload = WORKLOADS["small"]
    path = model_dir(workload)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)  # word-level, as the worker loads it
    with open(prompt_dataset_file(workload)) as handle:
        prompts = [json.loads(line)["prompt"] for line in handle]
    lengths = [len(tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"])
               for p in prompts]
    return AutoConfig.from_pretrained(path), StepShape(groups=2, rows=8, prompt_tokens=max(lengths),
                                                       new_tokens=new_tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens sampled per completion")
    parser.add_argument("--repeats", type=int, default=5, help="timings per product (the best is kept)")
    parser.add_argument("--measure", action="store_true", help="also run both libraries' GRPO steps (benchmarks.run's "
                        "worker, alternated) and set them against the floors")
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs per library with --measure")
    parser.add_argument("--steps", type=int, default=6, help="steps per run with --measure")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "matmul_floor.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    config, shape = small_workload_shape(args.new_tokens)
    result: dict = {"shape": vars(shape), "threads": 1, "floors": {}}
    print(f"GRPO step, small workload: {shape.groups} prompts of {shape.prompt_tokens} tokens, {shape.rows} "
          f"completions of {shape.new_tokens} tokens, one thread")
    print(f"{'training forward':<32} {'phase':<18} {'GFLOP':>7} {'ms':>8}")
    for label, share in (("prompt shared (posttrain)", True), ("each row whole (TRL)", False)):
        phases = step_products(config, shape, share)
        seconds = floor_seconds(phases, args.repeats)
        for phase, products in phases.items():
            print(f"{label:<32} {phase:<18} {flops(products) / 1e9:>7.2f} {seconds[phase] * 1e3:>8.1f}")
        total = sum(seconds.values())
        print(f"{label:<32} {'floor':<18} {sum(map(flops, phases.values())) / 1e9:>7.2f} {total * 1e3:>8.1f}")
        result["floors"][label] = {"phases_ms": {p: s * 1e3 for p, s in seconds.items()}, "floor_ms": total * 1e3,
                                   "gflop": sum(map(flops, phases.values())) / 1e9}
    if args.measure:
        from benchmarks.run import run_worker

        steps: dict[str, list[float]] = {"posttrain": [], "trl": []}
        for round_index in range(args.rounds):
            for impl in (("posttrain", "trl") if round_index % 2 == 0 else ("trl", "posttrain")):
                run = run_worker(impl, "grpo", "small", args.steps, {"activation_checkpointing": False})
                if "error" in run:
                    print(f"{impl}: {run['error'].splitlines()[-1]}")
                    return 1
                steps[impl].append(run["sec_per_step"])
        posttrain_ms = statistics.median(steps["posttrain"]) * 1e3
        trl_ms = statistics.median(steps["trl"]) * 1e3
        floor_ms = result["floors"]["prompt shared (posttrain)"]["floor_ms"]
        result["measured_ms"] = {"posttrain": posttrain_ms, "trl": trl_ms, "runs": steps}
        result["speedup"] = trl_ms / posttrain_ms
        result["speedup_bound"] = trl_ms / floor_ms
        print(f"measured: posttrain {posttrain_ms:.0f} ms/step, TRL {trl_ms:.0f} ms/step: {result['speedup']:.2f}x; "
              f"TRL's step over posttrain's floor: {result['speedup_bound']:.2f}x at most")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
