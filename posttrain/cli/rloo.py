"""`posttrain rloo`: REINFORCE leave-one-out from the command line (same flags as `posttrain grpo`)."""

from __future__ import annotations

from posttrain.cli.grpo import run_online


def main(argv: list[str]) -> int:
    from posttrain.trainers.rloo import RLOOConfig, RLOOTrainer

    return run_online(
        "posttrain rloo", RLOOConfig, RLOOTrainer, argv,
        description="RLOO: sample --num_generations completions per prompt of --dataset_name, score them with "
        "--reward_funcs, and learn from each one's reward minus the mean of its siblings'. Every RLOOConfig / "
        "TrainingArguments field is a flag.",
    )
