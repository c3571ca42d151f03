"""Measure what sharing the prompt prefill across a group saves.

    python -m posttrain.rollout.benchmark --prompts 16 --prompt-length 200 --group-size 8 --new-tokens 32

Builds a random Qwen2 model of the given size (nothing downloaded), then times ``generate`` with
``share_prompt_prefill=True`` (each prompt prefilled once, its KV cache copied to the G rows) and
``False`` (each prompt repeated G times before the prefill). EOS is disabled so both paths decode
exactly ``--new-tokens`` tokens per row, and greedy decoding lets the two outputs be compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from posttrain.rollout.hf_engine import HFRolloutEngine
from posttrain.rollout.sampling import SamplingParams


def build_model(vocab_size: int, hidden_size: int, layers: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 64),
        num_key_value_heads=max(1, hidden_size // 128),
        intermediate_size=hidden_size * 3,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()


def time_generate(engine: HFRolloutEngine, prompts, group_size: int, sampling: SamplingParams, repeats: int, device: str):
    timings = []
    batch = None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = engine.generate(prompts, num_generations=group_size, sampling=sampling)
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return timings, batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=200)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-reserve-cache", action="store_true", help="grow the KV cache by concatenation")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.vocab_size, args.hidden_size, args.layers, args.device, getattr(torch, args.dtype))
    generator = torch.Generator().manual_seed(0)
    # prompt lengths vary around the target so left padding is part of the measurement
    lengths = [max(1, args.prompt_length + int(torch.randint(-20, 21, (1,), generator=generator))) for _ in range(args.prompts)]
    prompts = [torch.randint(3, args.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    sampling = SamplingParams(max_completion_length=args.new_tokens, do_sample=False)

    results, prefill_only = {}, {}
    first_token = SamplingParams(max_completion_length=1, do_sample=False)
    for share in (True, False):
        engine = HFRolloutEngine(
            model, None, eos_token_ids=[], pad_token_id=0, share_prompt_prefill=share, reserve_cache=not args.no_reserve_cache
        )
        engine.generate(prompts[:2], num_generations=2, sampling=SamplingParams(max_completion_length=2, do_sample=False))
        results[share] = time_generate(engine, prompts, args.group_size, sampling, args.repeats, args.device)
        # one new token = the prefill (plus the cache copy for the shared path) and nothing else
        prefill_timings, _ = time_generate(engine, prompts, args.group_size, first_token, args.repeats, args.device)
        prefill_only[share] = statistics.median(prefill_timings)

    shared_s = statistics.median(results[True][0])
    naive_s = statistics.median(results[False][0])
    same = torch.equal(results[True][1].completion_ids, results[False][1].completion_ids)
    rows = args.prompts * args.group_size
    print(
        f"model: Qwen2 hidden={args.hidden_size} layers={args.layers} vocab={args.vocab_size} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {args.device} {args.dtype}, "
        f"{torch.get_num_threads()} threads, KV cache {'grown by concatenation' if args.no_reserve_cache else 'reserved'}"
    )
    print(
        f"workload: {args.prompts} prompts x ~{args.prompt_length} tokens, G={args.group_size} "
        f"({rows} rows), {args.new_tokens} new tokens, median of {args.repeats}"
    )
    print(f"shared prefill : {shared_s:.3f} s  ({rows * args.new_tokens / shared_s:.0f} new tokens/s)")
    print(f"naive prefill  : {naive_s:.3f} s  ({rows * args.new_tokens / naive_s:.0f} new tokens/s)")
    print(f"speed-up       : {naive_s / shared_s:.2f}x   identical greedy outputs: {same}")
    print(
        f"prefill alone  : shared {prefill_only[True]:.3f} s, naive {prefill_only[False]:.3f} s "
        f"({prefill_only[False] / prefill_only[True]:.2f}x)"
    )


if __name__ == "__main__":
    main()
