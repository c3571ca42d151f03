"""GRPO with three reward functions on the embedded arithmetic task, offline, TRL-style.

    python examples/grpo.py            # a few steps on a tiny random model, to see the loop run
    python examples/grpo.py --lora     # the same with a LoRA adapter and a KL penalty

The reward functions follow the protocol ``f(prompts, completions, **kwargs) -> list[float | None]``:
``completions`` are assistant message lists for conversational prompts, and every extra dataset column
(here ``answer``) arrives as a keyword argument. ``trainer.generate_completions(dataset[:1])`` scores
a few samples without training: check your rewards with it before a long run.
"""

import re
import sys

from posttrain import GRPOConfig, GRPOTrainer, get_task
from posttrain.models.tiny import tiny_model_path

SYSTEM_PROMPT = "Think inside <think></think>, then give the number inside <answer></answer>."
STRICT_FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)


def incremental_format(completions, **kwargs):
    """Partial credit, 0.25 per tag present once: a dense signal while the strict format is still rare."""
    texts = [completion[0]["content"] for completion in completions]
    return [sum(0.25 for tag in ("<think>", "</think>", "<answer>", "</answer>") if text.count(tag) == 1)
            for text in texts]


def strict_format(completions, **kwargs):
    return [1.0 if STRICT_FORMAT.match(completion[0]["content"].strip()) else 0.0 for completion in completions]


def correctness(completions, answer, **kwargs):
    """1 when the number inside <answer> equals the row's `answer` column; None when there is no answer."""
    rewards = []
    for completion, expected in zip(completions, answer):
        if expected is None:
            rewards.append(None)  # not scored: left out of the total, not counted as 0
            continue
        found = re.search(r"<answer>\s*(-?\d+)\s*</answer>", completion[0]["content"])
        rewards.append(1.0 if found and int(found.group(1)) == int(expected) else 0.0)
    return rewards


def main(use_lora: bool = False) -> None:
    task = get_task("arithmetic", max_operand=10)
    dataset = task.as_prompt_only(64, system_prompt=SYSTEM_PROMPT)  # columns: prompt (messages), answer

    peft_config = None
    if use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")

    args = GRPOConfig(
        output_dir="runs/example-grpo",
        per_device_train_batch_size=4,      # completions per micro-step
        gradient_accumulation_steps=2,
        num_generations=4,                  # completions per prompt
        max_completion_length=32,
        learning_rate=1e-5,
        beta=0.04 if use_lora else 0.0,     # KL to the reference (the base model, when training LoRA)
        reward_weights=[0.5, 1.0, 2.0],
        logging_steps=1,
        max_steps=4,
        log_completions=True,               # a table every log, and runs/example-grpo/completions.jsonl
        num_completions_to_print=4,
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=tiny_model_path("qwen2", "tiny"),
        reward_funcs=[incremental_format, strict_format, correctness],
        args=args,
        train_dataset=dataset,
        peft_config=peft_config,
    )
    for row in trainer.generate_completions(dataset[:1]):
        print(row["rewards"], repr(row["completion"][:60]))
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main(use_lora="--lora" in sys.argv[1:])
