"""`posttrain sft`: supervised fine-tuning from the command line."""

from __future__ import annotations

from posttrain.cli.args import ModelArguments, ScriptArguments
from posttrain.cli.common import load_datasets, merge_model_kwargs, require_model, train_and_save
from posttrain.cli.parser import parse_command


def main(argv: list[str]) -> int:
    from posttrain.trainers.sft import SFTConfig, SFTTrainer

    script_args, model_args, config = parse_command(
        "posttrain sft", (ScriptArguments, ModelArguments, SFTConfig), argv,
        description="Supervised fine-tuning. Every SFTConfig / TrainingArguments field is a flag.",
    )
    model = require_model(model_args)
    merge_model_kwargs(config, model_args)
    if config.output_dir == "trainer_output":
        config.output_dir = f"{model.rstrip('/').split('/')[-1]}-SFT"
    train, evaluation = load_datasets(script_args, config)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                         peft_config=model_args.peft_config())
    train_and_save(trainer, config)
    return 0
