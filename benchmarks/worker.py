"""One measured training run in its own process (so peak RSS is its own): posttrain or TRL.

    python -m benchmarks.worker --impl posttrain --method sft --workload big-vocab --steps 6
prints one JSON line with seconds/step, tokens/s, peak RSS and the first-step loss.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _timing_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = []  # (time, tokens seen) at the end of each step

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(time.perf_counter(), state.num_input_tokens_seen)]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepTimer()


def _common_kwargs(workload, steps, out):
    return dict(
        output_dir=out, per_device_train_batch_size=workload.batch_size, max_steps=steps, logging_steps=1,
        save_strategy="no", report_to="none", learning_rate=2e-5, bf16=False, seed=0, data_seed=0,
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
    )


def build_trainer(impl: str, method: str, workload, steps: int, out: str, options: dict,
                  model_dtype: str = "float32"):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from benchmarks.workloads import chat_dataset_file, model_dir, preference_dataset_file, prompt_dataset_file

    import torch
    from transformers import AutoModelForSequenceClassification

    path = model_dir(workload)
    # word-level tokenizer: AutoTokenizer would rebuild it as a BPE Qwen2Tokenizer
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    torch.manual_seed(0)  # the same random score head for both libraries
    if method == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=model_dtype)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype)
    # options (e.g. bf16, activation_offloading) override the common values
    kwargs = {**_common_kwargs(workload, steps, out), **options}
    if impl == "posttrain":
        import posttrain as lib
    else:
        import trl as lib
    if method == "sft":
        data = load_dataset("json", data_files=chat_dataset_file(workload), split="train")
        config = lib.SFTConfig(max_length=workload.max_length, **kwargs)
        return lib.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    if method == "dpo":
        data = load_dataset("json", data_files=preference_dataset_file(workload), split="train")
        config = lib.DPOConfig(max_length=workload.max_length, beta=0.1, **kwargs)
        return lib.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    if method == "reward":
        data = load_dataset("json", data_files=preference_dataset_file(workload), split="train")
        config = lib.RewardConfig(max_length=workload.max_length, **kwargs)
        return lib.RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    if method in ("grpo", "rloo"):
        data = load_dataset("json", data_files=prompt_dataset_file(workload), split="train")
        config_class = lib.GRPOConfig if method == "grpo" else lib.RLOOConfig
        trainer_class = lib.GRPOTrainer if method == "grpo" else lib.RLOOTrainer
        # options (e.g. per_device_train_batch_size, max_completion_length) override these
        values = {**kwargs, "per_device_train_batch_size": 8, "num_generations": 4,
                  "max_completion_length": ONLINE_NEW_TOKENS, "temperature": 1.0, "beta": 0.0, **options}
        config = config_class(**values)
        return trainer_class(model=model, reward_funcs=distinct_token_reward, args=config, train_dataset=data,
                             processing_class=tok)
    raise SystemExit(f"unknown method {method}")


ONLINE_NEW_TOKENS = 32


def model_shape(model) -> dict:
    """Parameters (a tied embedding counted once), layers and attention width (heads x head size)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"model_params": sum(p.numel() for p in model.parameters()), "model_layers": config.num_hidden_layers,
            "attention_width": config.num_attention_heads * head_dim}


def distinct_token_reward(completions, **kwargs):
    """A cheap, deterministic reward both libraries can compute: share of distinct words."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(set(t.split())) / max(1, len(t.split())) for t in texts]


def main(argv=None) -> int:
    from benchmarks.workloads import workload_by_name

    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["posttrain", "trl"], required=True)
    parser.add_argument("--method", default="sft")
    parser.add_argument("--workload", default="small", help="small, big-vocab, or long-<tokens> (length sweep)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--options", default="{}", help="JSON of extra config fields")
    parser.add_argument("--model-dtype", default="float32", help="dtype the model is loaded in (e.g. bfloat16)")
    parser.add_argument("--gpu-memory-cap-mb", type=float, default=None,
                        help="limit this process's CUDA allocations to this many MB (an allocation past it fails)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_memory_cap_mb is not None and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_cap_mb * 2**20 / total))
    workload = workload_by_name(args.workload)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(args.impl, args.method, workload, args.steps, out, json.loads(args.options),
                                model_dtype=args.model_dtype)
        timer = _timing_callback()
        trainer.add_callback(timer)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        trainer.train()
        marks = timer.marks
    # step 1 pays one-off costs (allocator warm-up, lazy init): time steps 2..N
    (t1, n1), (tn, nn_) = marks[1], marks[-1]
    steps_timed = len(marks) - 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    result = {
        "impl": args.impl, "method": args.method, "workload": args.workload, "steps_timed": steps_timed,
        "sec_per_step": (tn - t1) / max(steps_timed, 1),
        "tokens_per_sec": (nn_ - n1) / max(tn - t1, 1e-9),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_before / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "first_step_loss": losses[0] if losses else None,
        # what the sweep's model-FLOPs estimate needs (tied embeddings count once)
        **model_shape(trainer.model),
        "losses": losses,
        "rewards": rewards,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
