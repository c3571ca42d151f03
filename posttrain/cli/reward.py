"""`posttrain reward`: train a Bradley-Terry reward model from the command line."""

from __future__ import annotations

from posttrain.cli.args import ModelArguments, ScriptArguments
from posttrain.cli.common import load_datasets, merge_model_kwargs, require_model, train_and_save
from posttrain.cli.parser import parse_command


def main(argv: list[str]) -> int:
    from posttrain.trainers.reward import RewardConfig, RewardTrainer

    script_args, model_args, config = parse_command(
        "posttrain reward", (ScriptArguments, ModelArguments, RewardConfig), argv,
        description="Reward modeling on preference pairs. Every RewardConfig / TrainingArguments field is a flag.",
    )
    model = require_model(model_args)
    merge_model_kwargs(config, model_args)
    if config.output_dir == "trainer_output":
        config.output_dir = f"{model.rstrip('/').split('/')[-1]}-Reward"
    train, evaluation = load_datasets(script_args, config)
    # a LoRA on a reward model must also train the score head: RewardTrainer sets the task type to SEQ_CLS
    trainer = RewardTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                            peft_config=model_args.peft_config())
    train_and_save(trainer, config)
    return 0
