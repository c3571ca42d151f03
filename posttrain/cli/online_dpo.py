"""`posttrain online-dpo`: online DPO on prompts, pairs ranked by a reward model or reward functions."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.cli.args import ModelArguments, ScriptArguments
from posttrain.cli.common import load_datasets, merge_model_kwargs, require_model, train_and_save
from posttrain.cli.parser import parse_command
from posttrain.errors import ConfigError


@dataclass
class OnlineDPOScriptArguments:
    """How completions are ranked, besides --reward_model_path."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions instead of a reward model: built-in names, module:function, "
                          "file.py:function or model directories (scores are summed with --reward_weights)."},
    )


def main(argv: list[str]) -> int:
    from posttrain.trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    script_args, model_args, ranking, config = parse_command(
        "posttrain online-dpo", (ScriptArguments, ModelArguments, OnlineDPOScriptArguments, OnlineDPOConfig), argv,
        description="Online DPO: two samples per prompt, ranked by --reward_model_path (or --reward_funcs), "
        "then the DPO loss. Every OnlineDPOConfig / TrainingArguments field is a flag.",
    )
    model = require_model(model_args)
    reward_funcs = list(ranking.reward_funcs or [])
    if config.reward_model_path:
        reward_funcs.append(config.reward_model_path)
    if not reward_funcs:
        from posttrain.rewards import BUILTIN_REWARDS

        raise ConfigError("nothing ranks the completions", field="reward_model_path",
                          fix="pass --reward_model_path RM_DIR, or --reward_funcs with built-in names "
                          f"({', '.join(BUILTIN_REWARDS)}), module:function or file.py:function")
    merge_model_kwargs(config, model_args)
    if config.output_dir == "trainer_output":
        config.output_dir = f"{model.rstrip('/').split('/')[-1]}-OnlineDPO"
    train, evaluation = load_datasets(script_args, config)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=reward_funcs, args=config, train_dataset=train,
                               eval_dataset=evaluation, peft_config=model_args.peft_config())
    train_and_save(trainer, config)
    return 0
