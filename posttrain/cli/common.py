"""Steps every training sub-command shares: check the model flag, load the data, train and save."""

from __future__ import annotations

import logging
import os
from typing import Any

from posttrain.errors import ConfigError

logger = logging.getLogger("posttrain")


def require_model(model_args, flag: str = "model_name_or_path") -> str:
    path = getattr(model_args, flag)
    if not path:
        raise ConfigError("no model given", field=flag,
                          fix=f"pass --{flag} DIR_OR_HUB_ID (`posttrain init-model DIR` makes a tiny offline model)")
    return path


def load_datasets(script_args, config) -> tuple[Any, Any]:
    """The train dataset and, when the config evaluates, an eval dataset (None otherwise)."""
    from posttrain.data.load import load_data, load_mixture

    mixture = getattr(script_args, "dataset_mixture", None)
    if mixture:
        train = load_mixture(mixture, seed=config.seed, split=script_args.dataset_train_split)
    elif script_args.dataset_name:
        train = load_data(script_args.dataset_name, config_name=script_args.dataset_config,
                          split=script_args.dataset_train_split)
    else:
        raise ConfigError("no dataset given", field="dataset_name",
                          fix="pass --dataset_name FILE_OR_DIR_OR_HUB_ID (or `datasets:` in a --config YAML)")
    evaluation = None
    if str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no":
        source = script_args.eval_dataset_name or script_args.dataset_name
        split = script_args.dataset_test_split
        if source is None:
            raise ConfigError("evaluation needs a dataset", field="eval_dataset_name", fix="pass --eval_dataset_name")
        evaluation = load_data(source, config_name=script_args.dataset_config, split=split)
    return train, evaluation


def merge_model_kwargs(config, model_args) -> None:
    extra = model_args.model_init_kwargs()
    if extra:
        config.model_init_kwargs = {**(config.model_init_kwargs or {}), **extra}


def train_and_save(trainer, config) -> str:
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        print(f"saved to {os.path.abspath(config.output_dir)}")
    return config.output_dir
