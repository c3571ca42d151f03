"""`posttrain dpo`: direct preference optimisation (and its variants) from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.cli.args import ModelArguments, ScriptArguments
from posttrain.cli.common import load_datasets, merge_model_kwargs, require_model, train_and_save
from posttrain.cli.parser import parse_command


@dataclass
class ReferenceArguments:
    """Where the reference model comes from."""

    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model directory or hub id (default: a frozen copy of the model, or the base "
                          "model under a disabled LoRA adapter)."},
    )


def main(argv: list[str]) -> int:
    from posttrain.trainers.dpo import DPOConfig, DPOTrainer

    script_args, model_args, reference_args, config = parse_command(
        "posttrain dpo", (ScriptArguments, ModelArguments, ReferenceArguments, DPOConfig), argv,
        description="Direct preference optimisation. Every DPOConfig / TrainingArguments field is a flag.",
    )
    model = require_model(model_args)
    merge_model_kwargs(config, model_args)
    if config.output_dir == "trainer_output":
        config.output_dir = f"{model.rstrip('/').split('/')[-1]}-DPO"
    train, evaluation = load_datasets(script_args, config)
    trainer = DPOTrainer(model=model, ref_model=reference_args.ref_model_name_or_path, args=config,
                         train_dataset=train, eval_dataset=evaluation, peft_config=model_args.peft_config())
    train_and_save(trainer, config)
    return 0
