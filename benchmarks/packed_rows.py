"""Packed rows with SDPA: transformers' (tokens x tokens) mask against posttrain's per-sequence attention.

    python -m benchmarks.packed_rows                            # one forward and backward, small Qwen2
    python -m benchmarks.packed_rows --sequences 8 --sequence-tokens 2048
    python -m benchmarks.packed_rows --sft --sequences 8 --sequence-tokens 1024   # SFTTrainer, big vocabulary
    python -m benchmarks.packed_rows --padded --sequences 4 --sequence-tokens 8192  # a padded rollout batch
    python -m benchmarks.packed_rows --sft --padded --sequences 4 --sequence-tokens 4096   # padded SFT batches
    python -m benchmarks.packed_rows --reward --sequences 4 --sequence-tokens 8192  # a reward model's padded batch

A padding-free row holds ``--sequences`` sequences of ``--sequence-tokens`` tokens, position ids
restarting at 0. ``masked`` is transformers' SDPA (a ``(1, 1, T, T)`` mask over the row),
``packed`` is ``posttrain_packed_sdpa`` (each sequence attended alone). Each runs in its own
process (peak memory is per process). Without ``--sft``: one forward and backward of a random
Qwen2 (hidden 64, 2 layers), the rise of peak RSS over the model. With ``--sft``: SFTTrainer with
``padding_free=True`` on the benchmarks' big-vocabulary model, two steps, the process's peak RSS
(for ``masked`` the trainer's switch to packed attention is undone after it is built). With
``--padded``: a padded batch of ``--sequences`` rows, log-probs of its completions and their backward
(``token_logps``, as online methods score rollouts); ``packed`` runs it as one packed row; with
``--sft --padded``, SFTTrainer on padded batches whose rows are 0, 300, 600, ... tokens shorter. With
``--reward``: the same padded batch scored by a reward model (a one-label Qwen2 sequence classifier of
that size) and the backward of its scores, as RewardTrainer trains and PPO's value model runs.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SETTINGS = ("masked", "packed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _high_water_mb() -> float:
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith("VmHWM")).split()[1]) / 1024


def _model_child(setting: str, sequences: int, sequence_tokens: int, padded: bool = False,
                 reward: bool = False) -> dict:
    import torch
    import transformers

    from posttrain.models.packed_attention import use_packed_attention

    torch.set_num_threads(1)
    total = sequence_tokens if padded else sequences * sequence_tokens
    config = transformers.Qwen2Config(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=total)
    torch.manual_seed(0)
    if reward:
        config.num_labels, config.pad_token_id = 1, 0
        model = transformers.Qwen2ForSequenceClassification(config).train()
    else:
        model = transformers.Qwen2ForCausalLM(config).train()
    if setting == "packed":
        assert use_packed_attention(model) == [True]
    if reward:
        return _padded_rows(model, sequences, sequence_tokens, scores=True)
    if padded:
        return _padded_rows(model, sequences, sequence_tokens)
    input_ids = torch.randint(0, 1024, (1, total), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(sequence_tokens).repeat(sequences)[None]
    labels = input_ids.masked_fill(position_ids == 0, -100)
    before = _high_water_mb()
    start = time.perf_counter()
    loss = model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    loss.backward()
    return {"seconds": time.perf_counter() - start, "peak_rise_mb": _high_water_mb() - before, "loss": loss.item()}


def _padded_rows(model, rows: int, width: int, scores: bool = False) -> dict:
    """Scores of a padded batch as online methods compute them: a 64-token prompt, completions ending at different
    columns (row r loses 300 r of ``width``), log-probs of the completion tokens and their backward; with
    ``scores``, a reward model's score of each row (read at its last token) and their backward."""
    import torch

    from posttrain.models.lm_head import token_logps
    from posttrain.models.reward_scoring import sequence_scores

    input_ids = torch.randint(0, 1024, (rows, width), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    for row in range(rows):
        attention_mask[row, width - 300 * row:] = 0
    completion_mask = attention_mask.clone()
    completion_mask[:, :64] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    before = _high_water_mb()
    start = time.perf_counter()
    if scores:
        row_scores = sequence_scores(model, input_ids, attention_mask)
        row_scores.sum().backward()
        return {"seconds": time.perf_counter() - start, "peak_rise_mb": _high_water_mb() - before,
                "loss": row_scores.mean().item()}
    scored = token_logps(model, input_ids, completion_mask, attention_mask, position_ids)
    scored.logps.sum().backward()
    return {"seconds": time.perf_counter() - start, "peak_rise_mb": _high_water_mb() - before,
            "loss": -scored.logps.sum().item() / int(scored.mask.sum())}


def _sft_child(setting: str, sequences: int, sequence_tokens: int, steps: int, padded: bool = False) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from benchmarks.workloads import long_workload, model_dir
    from posttrain import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    path = model_dir(long_workload(2 * sequences * sequence_tokens))  # positions for the whole row
    words = [f"w{i}" for i in range(97)]
    rows = [{"messages": [{"role": "user", "content": f"w{i} w{i + 1}"},
                          {"role": "assistant", "content": " ".join(words[(i + j) % 97] for j in range(
                              sequence_tokens - (300 * (i % sequences) if padded else 0)))}]}
            for i in range(sequences * steps)]
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=sequences, padding_free=not padded, max_length=None,
                         max_steps=steps, learning_rate=1e-5, logging_steps=1, save_strategy="no", disable_tqdm=True,
                         report_to="none", seed=0)
        trainer = SFTTrainer(AutoModelForCausalLM.from_pretrained(path), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=PreTrainedTokenizerFast.from_pretrained(path))
        if setting == "masked":
            trainer.model.set_attn_implementation("sdpa")
        row_tokens = sum(len(trainer.train_dataset[i]["input_ids"]) for i in range(sequences))
        start = time.perf_counter()
        trainer.train()
        seconds = (time.perf_counter() - start) / steps
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": losses[0], "losses": losses, "row_tokens": row_tokens,
            "attention": trainer.model.config._attn_implementation}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--sequence-tokens", type=int, default=2048)
    parser.add_argument("--sft", action="store_true", help="SFTTrainer with padding_free on the big-vocabulary model")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (with --sft)")
    parser.add_argument("--padded", action="store_true",
                        help="a padded batch of --sequences rows of --sequence-tokens columns, scored as GRPO scores "
                             "rollouts (token_logps; long padded batches run padding-free with the packed attention)")
    parser.add_argument("--reward", action="store_true",
                        help="a padded batch as with --padded, scored by a reward model (sequence_scores) with backward")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "packed_rows.json"))
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reward and args.sft:
        parser.error("--reward scores a padded batch with a reward model; --sft trains SFTTrainer: pick one")
    if args.child:
        result = (_sft_child(args.child, args.sequences, args.sequence_tokens, args.steps, args.padded) if args.sft
                  else _model_child(args.child, args.sequences, args.sequence_tokens, args.padded, args.reward))
        print("RESULT " + json.dumps(result))
        return 0
    results = []
    for setting in SETTINGS:
        command = [sys.executable, "-m", "benchmarks.packed_rows", "--child", setting, "--sequences", str(args.sequences),
                   "--sequence-tokens", str(args.sequence_tokens), "--steps", str(args.steps)]
        command += (["--sft"] if args.sft else []) + (["--padded"] if args.padded else [])
        command += ["--reward"] if args.reward else []
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0 or "RESULT " not in done.stdout:
            print(f"{setting}: the run failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append({"setting": setting, **json.loads(done.stdout.split("RESULT ", 1)[1])})
    memory_key = "peak_rss_mb" if args.sft else "peak_rise_mb"
    what = "SFTTrainer, big-vocabulary model, s/step" if args.sft else "Qwen2 h64 L2, one forward and backward, s"
    if args.reward:
        what = "a Qwen2 h64 L2 reward model's scores, forward and backward, s; 'loss' is the mean score"
    if args.sft and args.padded:
        what += "; rows of the batch shorter by 0, 300, 600, ... tokens"
    layout = (f"a padded batch of {args.sequences} rows x {args.sequence_tokens} columns" if args.padded or args.reward
              else f"{args.sequences} sequences x {args.sequence_tokens} tokens in one packed row")
    print(f"{layout} ({what})")
    print(f"{'attention':<10} {'seconds':>9} {memory_key.replace('_', ' '):>14} {'loss':>12}")
    for result in results:
        print(f"{result['setting']:<10} {result['seconds']:>9.2f} {result[memory_key]:>14,.0f} {result['loss']:>12.6f}")
    masked, packed = results
    print(f"packed/masked: {packed[memory_key] / masked[memory_key]:.2f}x memory, "
          f"{masked['seconds'] / packed['seconds']:.1f}x speed, loss difference {abs(packed['loss'] - masked['loss']):.2e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"argv": sys.argv[1:] if argv is None else argv, "sft": args.sft, "padded": args.padded,
                   "reward": args.reward,
                   "sequences": args.sequences,
                   "sequence_tokens": args.sequence_tokens, "results": results}, handle, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
