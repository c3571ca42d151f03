"""Command-line parsing: flags generated from config dataclasses, YAML files, one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import yaml
from transformers import HfArgumentParser

from posttrain.errors import ConfigError


LAUNCH_EPILOG = (
    "Several processes: --num_processes N [--accelerate_config ddp|fsdp2|zero2|zero3|multi_node|FILE] "
    "[--num_machines M --machine_rank R --main_process_ip IP --main_process_port P] starts `accelerate launch` "
    "(docs/distributed.md)."
)


class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` that raises :class:`ConfigError` instead of printing usage and exiting."""

    def error(self, message: str):  # argparse calls this on a bad flag
        raise ConfigError(message.replace("the following arguments are required", "missing required flags"),
                          fix=f"see `{self.prog} --help`")


def parse_command(prog: str, dataclass_types: tuple, argv: list[str], description: str = "") -> tuple:
    """Parse ``argv`` into one instance per dataclass; ``--config file.yaml`` sets defaults, flags win.

    A YAML key may be any field of any of the dataclasses; ``datasets:`` (a list of mixture entries)
    is returned as the extra field ``dataset_mixture`` on the first instance that has it.
    """
    # allow_abbrev=False: a misspelt flag (`--learning_rat`) is an error, not another flag it prefixes
    parser = ArgumentParser(dataclass_types, prog=prog, description=description, epilog=LAUNCH_EPILOG,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file of flag values; command-line flags override it.")
    pre, _ = _config_only_parser().parse_known_args(argv)
    mixture = None
    if pre.config:
        values = load_yaml_config(pre.config)
        mixture = values.pop("datasets", None)
        known = {f.name for dc in dataclass_types for f in dataclasses.fields(dc)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{pre.config}: unknown key(s) {', '.join(unknown)}", field="config",
                fix=f"use flag names without dashes; see `{prog} --help`",
            )
        parser.set_defaults(**{k: _yaml_value_for_parser(v) for k, v in values.items()})
    # parse_args_into_dataclasses builds each dataclass with the parsed values (defaults included)
    try:
        *outputs, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ConfigError:
        raise
    except ValueError as err:  # a TrainingArguments consistency check
        raise ConfigError(str(err).strip().splitlines()[0], fix=f"see `{prog} --help`") from None
    if remaining:
        raise ConfigError(f"unrecognized arguments: {' '.join(remaining)}", fix=f"see `{prog} --help` for the flags")
    instances = [o for o in outputs if dataclasses.is_dataclass(o)]
    if mixture is not None:
        instances[0].dataset_mixture = mixture
    return tuple(instances)


def _yaml_value_for_parser(value: Any) -> Any:
    # HfArgumentParser converts strings itself; YAML already typed scalars and lists
    return value


def _config_only_parser() -> argparse.ArgumentParser:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    return pre


def load_yaml_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist", field="config", fix="check the path")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})", field="config",
                          fix="fix the YAML syntax") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values", field="config",
                          fix="write one `name: value` per line")
    return values
