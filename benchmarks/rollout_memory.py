"""Peak memory of one long rollout, the whole batch at once against slices (``rollout_max_batch_tokens``).

    python -m benchmarks.rollout_memory --rows 16 --new-tokens 1024 --slice-rows 0,4,1

Each setting runs in its own process (peak RSS is per process) on the same random Qwen2 model,
prompts and sampling keys; EOS is off, so every row decodes ``--new-tokens`` tokens. Prints, per
setting, seconds, peak RSS, the KV cache the whole batch would hold, and whether the completions
equal those of the unsliced run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PROMPT_LENGTH = 64


def _child(args) -> dict:
    import torch
    import transformers

    from posttrain.rollout import HFRolloutEngine, SamplingParams, sampling_keys

    torch.set_num_threads(1)
    config = transformers.Qwen2Config(
        vocab_size=2048, hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=args.kv_heads, intermediate_size=3 * args.hidden_size,
        max_position_embeddings=PROMPT_LENGTH + args.new_tokens + 8,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    prompts_count = args.rows // args.group_size
    prompts = [torch.randint(3, 2048, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(prompts_count)]
    row_positions = PROMPT_LENGTH + args.new_tokens
    budget = args.slice_rows * row_positions if args.slice_rows else None
    engine = HFRolloutEngine(model, None, eos_token_ids=[], pad_token_id=0, max_batch_tokens=budget)
    sampling = SamplingParams(max_completion_length=args.new_tokens, temperature=1.0)
    keys = sampling_keys(0, "train", 0, positions=range(prompts_count))
    start = time.perf_counter()
    batch = engine.generate(prompts, num_generations=args.group_size, sampling=sampling, prompt_keys=keys)
    seconds = time.perf_counter() - start
    head_dim = args.hidden_size // 8
    kv_bytes = 2 * args.layers * args.kv_heads * head_dim * 4 * args.rows * row_positions
    return {"slice_rows": args.slice_rows, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "whole_batch_kv_mb": kv_bytes / 2**20, "completion_ids": batch.completion_ids.tolist()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="completions (prompts x group size)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--slice-rows", default="0,4,1", help="rows per slice for each run (0: whole batch)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.slice_rows = int(args.slice_rows)
        print("RESULT " + json.dumps(_child(args)))
        return 0
    reference = None
    for rows in [int(r) for r in args.slice_rows.split(",")]:
        command = [sys.executable, "-m", "benchmarks.rollout_memory", "--child", "--slice-rows", str(rows)]
        for name in ("rows", "group_size", "new_tokens", "hidden_size", "layers", "kv_heads"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(output.split("RESULT ", 1)[1])
        ids = result.pop("completion_ids")
        reference = ids if reference is None else reference
        print(f"rows per slice {rows or args.rows:>4}: {result['seconds']:7.2f} s, peak RSS {result['peak_rss_mb']:7,.0f} MB "
              f"(whole-batch KV cache {result['whole_batch_kv_mb']:,.0f} MB), same completions: {ids == reference}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
