"""`posttrain grpo`: group relative policy optimisation from the command line.

    posttrain grpo --model_name_or_path M --dataset_name D --output_dir O --num_generations 4 --reward_funcs accuracy

``--reward_funcs`` takes built-in names, ``module:function``, ``path/to/file.py:function`` or reward
model directories; ``--reward_model_name_or_path`` adds a reward model. The RLOO command shares this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.cli.args import ModelArguments, ScriptArguments
from posttrain.cli.common import load_datasets, merge_model_kwargs, require_model, train_and_save
from posttrain.cli.parser import parse_command
from posttrain.errors import ConfigError


@dataclass
class RewardArguments:
    """Which reward functions score the sampled completions."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions: built-in names (e.g. accuracy format), module:function, "
                  "file.py:function, or reward model directories. module:function and file.py:function "
                  "import and run that code (a file's top-level statements too): pass only code you trust."},
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A reward model directory, added to --reward_funcs."}
    )

    def specs(self) -> list[str]:
        from posttrain.rewards import describe_builtins

        specs = list(self.reward_funcs or [])
        if self.reward_model_name_or_path:
            specs.append(self.reward_model_name_or_path)
        if not specs:
            raise ConfigError("no reward functions given", field="reward_funcs",
                              fix=f"pass --reward_funcs NAME [NAME ...]. {describe_builtins()}")
        return specs


def run_online(prog: str, config_class: type, trainer_class: type, argv: list[str], description: str) -> int:
    """Parse the flags of an online method, build its trainer, train and save."""
    script_args, model_args, reward_args, config = parse_command(
        prog, (ScriptArguments, ModelArguments, RewardArguments, config_class), argv, description=description,
    )
    model = require_model(model_args)
    specs = reward_args.specs()  # before loading anything: a missing reward is the likeliest mistake
    merge_model_kwargs(config, model_args)
    if config.output_dir == "trainer_output":
        config.output_dir = f"{model.rstrip('/').split('/')[-1]}-{trainer_class.method_name}"
    train, evaluation = load_datasets(script_args, config)
    trainer = trainer_class(model=model, reward_funcs=specs, args=config, train_dataset=train,
                            eval_dataset=evaluation, peft_config=model_args.peft_config())
    train_and_save(trainer, config)
    return 0


def main(argv: list[str]) -> int:
    from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer

    return run_online(
        "posttrain grpo", GRPOConfig, GRPOTrainer, argv,
        description="GRPO: sample --num_generations completions per prompt of --dataset_name, score them with "
        "--reward_funcs, and learn from each one's reward relative to its group. Every GRPOConfig / "
        "TrainingArguments field is a flag.",
    )
