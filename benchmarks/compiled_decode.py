"""The lean decode step under ``torch.compile`` (inductor) on the small GRPO workload's model.

    python -m benchmarks.compiled_decode                 # every variant, 8 rows, 36-token prompts, 32 new tokens
    python -m benchmarks.compiled_decode --variants compiled,fixed --rows 8 --new-tokens 32

Each variant runs in its own process (inductor's settings are per process) and times, in that
process, the eager :class:`~posttrain.rollout.lean_decode.LeanDecoder` step as the rollout engine
runs it (the reserved KV cache, each step's keys a view of the filled columns) before and after the
compiled one. Greedy decoding from a random prompt batch, one thread:

- ``compiled``: ``torch.compile(lean.step)`` on the engine's cache as it is;
- ``fixed``: the same step over KV buffers of the final width written in place at a position tensor,
  with a mask over the unwritten columns, so every step has the same shapes;
- ``fixed-cpp``: ``fixed`` with inductor's C++ wrapper (``cpp_wrapper``);
- ``fixed-frozen``: ``fixed-cpp`` with ``freezing``, which folds the weights into the compiled code
  as constants: a bound only, as the optimizer changes the weights after every generation.

Per variant: compile seconds (the first generation), ms per token eager and compiled (the best of
``--repeats`` generations), whether the greedy tokens equal the eager step's, the largest logit
difference, and whether the compiled step follows a weight changed in place after compiling.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("compiled", "fixed", "fixed-cpp", "fixed-frozen")
INDUCTOR_SETTINGS = {"compiled": {}, "fixed": {}, "fixed-cpp": {"cpp_wrapper": True},
                     "fixed-frozen": {"cpp_wrapper": True, "freezing": True}}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FixedWidthLayer:
    """A KV-cache layer of constant width: ``update`` writes the step's column at ``column`` (a one-element
    tensor the caller advances) and returns the whole buffers, whose unwritten columns the mask hides."""

    def __init__(self, keys, values, column) -> None:
        self.keys, self.values, self.column = keys, values, column

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values


class FixedWidthCache:
    """The prompt's KV cache copied into buffers ``width`` columns wide, one :class:`FixedWidthLayer` per layer."""

    def __init__(self, cache, width: int) -> None:
        import torch

        self.column = torch.zeros(1, dtype=torch.long)
        self.layers = []
        for layer in cache.layers:
            filled = layer.keys.shape[-2]
            keys = layer.keys.new_zeros(*layer.keys.shape[:2], width, layer.keys.shape[-1])
            values = layer.values.new_zeros(*layer.values.shape[:2], width, layer.values.shape[-1])
            keys[:, :, :filled], values[:, :, :filled] = layer.keys, layer.values
            self.layers.append(FixedWidthLayer(keys, values, self.column))


def greedy_decode(model, lean, step, prompt_ids, new_tokens: int, fixed: bool):
    """Prefill ``prompt_ids`` with the model's forward, then ``new_tokens`` greedy steps through ``step``.
    Returns (seconds per step, tokens ``(B, new_tokens)``, the last step's logits)."""
    import torch

    from posttrain.rollout.kv_cache import reserved_dynamic_cache

    rows, prompt_width = prompt_ids.shape
    width = prompt_width + new_tokens + 1
    with torch.no_grad():
        cache = reserved_dynamic_cache(model.config, width)
        logits = model(input_ids=prompt_ids, past_key_values=cache, use_cache=True).logits[:, -1]
        if fixed:
            cache = FixedWidthCache(cache, width)
        attention = torch.zeros(rows, width, dtype=torch.long) if fixed else torch.ones(rows, width, dtype=torch.long)
        attention[:, :prompt_width] = 1
        tokens, chosen = logits.argmax(-1), []
        start = time.perf_counter()
        for index in range(new_tokens):
            column = prompt_width + index
            positions = torch.full((rows,), column)
            if fixed:
                cache.column.fill_(column)
                attention[:, column] = 1
                logits = step(tokens, attention, positions, cache)
            else:
                logits = step(tokens, attention[:, : column + 1], positions, cache)
            tokens = logits.argmax(-1)
            chosen.append(tokens)
        seconds = (time.perf_counter() - start) / new_tokens
    return seconds, torch.stack(chosen, 1), logits


def _child(variant: str, rows: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    import torch
    import torch._inductor.config as inductor_config
    from transformers import AutoModelForCausalLM

    from benchmarks.workloads import WORKLOADS, model_dir
    from posttrain.rollout.lean_decode import LeanDecoder

    torch.set_num_threads(1)
    for name, value in INDUCTOR_SETTINGS[variant].items():
        setattr(inductor_config, name, value)
    model = AutoModelForCausalLM.from_pretrained(model_dir(WORKLOADS["small"])).eval()
    lean = LeanDecoder.build(model)
    lean.prepare(prompt_tokens + new_tokens + 1, torch.device("cpu"))
    prompt_ids = torch.randint(10, model.config.vocab_size, (rows, prompt_tokens), generator=torch.Generator().manual_seed(0))
    fixed = variant != "compiled"

    def best(step, as_fixed):
        runs = [greedy_decode(model, lean, step, prompt_ids, new_tokens, as_fixed) for _ in range(repeats)]
        return min(run[0] for run in runs), runs[-1]

    eager_before, (_, eager_tokens, eager_logits) = best(lean.step, False)
    compiled_step = torch.compile(lean.step, dynamic=False if fixed else None)
    start = time.perf_counter()
    greedy_decode(model, lean, compiled_step, prompt_ids, new_tokens, fixed)
    compile_seconds = time.perf_counter() - start
    compiled, (_, compiled_tokens, compiled_logits) = best(compiled_step, fixed)
    eager_after, _ = best(lean.step, False)

    # a weight changed in place after compiling, as an optimizer step changes it
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    _, _, eager_changed = greedy_decode(model, lean, lean.step, prompt_ids, new_tokens, False)
    _, _, compiled_changed = greedy_decode(model, lean, compiled_step, prompt_ids, new_tokens, fixed)
    return {
        "variant": variant, "inductor": INDUCTOR_SETTINGS[variant], "compile_seconds": compile_seconds,
        "eager_ms": 1e3 * statistics.mean((eager_before, eager_after)), "eager_ms_runs": [1e3 * eager_before, 1e3 * eager_after],
        "compiled_ms": 1e3 * compiled, "same_tokens": bool(torch.equal(eager_tokens, compiled_tokens)),
        "max_logit_difference": (eager_logits - compiled_logits).abs().max().item(),
        "follows_weight_change": bool(torch.allclose(eager_changed, compiled_changed, atol=1e-4)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--rows", type=int, default=8, help="completions decoded together (the small workload's batch)")
    parser.add_argument("--prompt-tokens", type=int, default=36)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="generations per timing; the best is kept")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "compiled_decode.json"))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [str(args.rows), str(args.prompt_tokens), str(args.new_tokens), str(args.repeats)]
    if args.child:
        result = _child(args.child, args.rows, args.prompt_tokens, args.new_tokens, args.repeats)
        print("RESULT " + json.dumps(result))
        return 0
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: pick from {', '.join(VARIANTS)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for variant in variants:
        command = [sys.executable, "-m", "benchmarks.compiled_decode", "--child", variant, "--rows", sizes[0],
                   "--prompt-tokens", sizes[1], "--new-tokens", sizes[2], "--repeats", sizes[3]]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode != 0 or "RESULT " not in done.stdout:
            print(f"{variant}: the run failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.split("RESULT ", 1)[1]))
    print(f"lean decode step, small workload model, {args.rows} rows, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} greedy tokens, one thread (ms per token, best of {args.repeats})")
    print(f"{'variant':<13} {'compile s':>9} {'eager ms':>9} {'compiled ms':>11} {'speed-up':>8} {'same tokens':>11} "
          f"{'max logit diff':>14} {'follows weights':>15}")
    for r in results:
        print(f"{r['variant']:<13} {r['compile_seconds']:>9.1f} {r['eager_ms']:>9.2f} {r['compiled_ms']:>11.2f} "
              f"{r['eager_ms'] / r['compiled_ms']:>7.2f}x {str(r['same_tokens']):>11} {r['max_logit_difference']:>14.1e} "
              f"{str(r['follows_weight_change']):>15}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"argv": sys.argv[1:] if argv is None else argv, "rows": args.rows, "prompt_tokens": args.prompt_tokens,
                   "new_tokens": args.new_tokens, "repeats": args.repeats, "results": results}, handle, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
