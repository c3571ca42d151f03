"""`posttrain ppo` (also `python -m posttrain.scripts.ppo`): PPO with a reward model and a value model."""

from __future__ import annotations

from posttrain.cli.args import ModelArguments, ScriptArguments
from posttrain.cli.common import load_datasets, merge_model_kwargs, train_and_save
from posttrain.cli.parser import parse_command
from posttrain.errors import ConfigError


def main(argv: list[str]) -> int:
    from posttrain.trainers.ppo import PPOConfig, PPOTrainer

    script_args, model_args, config = parse_command(
        "posttrain ppo", (ScriptArguments, ModelArguments, PPOConfig), argv,
        description="PPO: policy from --model_name_or_path (the SFT model), rewards from --reward_model_path, "
        "prompts from --dataset_name. Every PPOConfig / TrainingArguments field is a flag.",
    )
    model = model_args.model_name_or_path or config.sft_model_path
    if not model:
        raise ConfigError("no policy model given", field="model_name_or_path",
                          fix="pass --model_name_or_path SFT_DIR (the supervised fine-tuned model)")
    if not config.reward_model_path:
        raise ConfigError("no reward model given", field="reward_model_path",
                          fix="pass --reward_model_path RM_DIR (train one with `posttrain reward`)")
    merge_model_kwargs(config, model_args)
    if config.output_dir == "trainer_output":
        config.output_dir = f"{model.rstrip('/').split('/')[-1]}-PPO"
    train, evaluation = load_datasets(script_args, config)
    trainer = PPOTrainer(args=config, model=model, reward_model=config.reward_model_path, train_dataset=train,
                         eval_dataset=evaluation, peft_config=model_args.peft_config())
    train_and_save(trainer, config)
    return 0
