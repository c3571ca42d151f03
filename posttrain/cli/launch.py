"""``posttrain <method> --num_processes N [--accelerate_config NAME|FILE]``: start ``accelerate launch`` ourselves.

The launch flags are taken out of the command line; the rest goes, unchanged, to ``python -m posttrain
<method>`` in each process that accelerate starts. A NAME is one of the configs shipped inside the package
(``accelerate_configs/``, package data, so an installed posttrain finds them without the source tree);
``examples/accelerate/`` holds the same files for reading and copying.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources

from posttrain.errors import ConfigError

# flag -> what its value must be; all are handed to `accelerate launch`
LAUNCH_FLAGS: dict[str, type] = {
    "accelerate_config": str,
    "num_processes": int,
    "num_machines": int,
    "machine_rank": int,
    "main_process_ip": str,
    "main_process_port": int,
}
SHIPPED_CONFIGS = ("ddp", "fsdp2", "zero2", "zero3", "multi_node")
DEFAULT_CONFIG = "ddp"


def split_launch_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``(launch options, the other arguments)``; accepts ``--flag value`` and ``--flag=value``."""
    options: dict[str, str] = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        name, has_value, value = arg[2:].partition("=") if arg.startswith("--") else ("", False, "")
        if name not in LAUNCH_FLAGS:
            rest.append(arg)
            index += 1
            continue
        if not has_value:
            if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a value", field=name, fix=f"pass --{name} VALUE")
            value = argv[index + 1]
            index += 1
        options[name] = _checked_value(name, value)
        index += 1
    return options, rest


def _checked_value(name: str, value: str) -> str:
    if LAUNCH_FLAGS[name] is int and not (value.isdigit() and (int(value) >= 1 or name == "machine_rank")):
        raise ConfigError(f"--{name} must be a positive whole number, got {value!r}", field=name,
                          fix=f"pass e.g. --{name} 2")
    return value


def wants_launch(options: dict[str, str]) -> bool:
    """A launch is asked for by a config, several processes, or several machines."""
    return "accelerate_config" in options or int(options.get("num_processes", 1)) > 1 \
        or int(options.get("num_machines", 1)) > 1


def shipped_config_path(name: str) -> str:
    """Path of a config shipped inside the package."""
    return str(resources.files("posttrain.cli").joinpath("accelerate_configs", f"{name}.yaml"))


def resolve_accelerate_config(value: str | None) -> str:
    """A shipped config's name (``zero2``) or a path to an accelerate YAML/JSON file, as a path."""
    if value is None:
        return shipped_config_path(DEFAULT_CONFIG)
    if value in SHIPPED_CONFIGS:
        return shipped_config_path(value)
    if os.path.isfile(value):
        return value
    raise ConfigError(f"no accelerate config named {value!r}", field="accelerate_config",
                      fix=f"use one of {', '.join(SHIPPED_CONFIGS)}, or the path of an accelerate config file")


def _distributed_type(config_path: str) -> str:
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        config = load_config_from_file(config_path)
    except Exception as err:  # accelerate raises plain exceptions on malformed files
        raise ConfigError(f"{config_path}: not an accelerate config ({err})", field="accelerate_config",
                          fix="write it with `accelerate config`, or start from examples/accelerate/") from None
    return str(getattr(config.distributed_type, "value", config.distributed_type))


def _check_engine_available(config_path: str, distributed_type: str) -> None:
    import importlib.util

    if distributed_type == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{os.path.basename(config_path)} uses DeepSpeed, which is not installed",
                          field="accelerate_config", fix="`pip install deepspeed`, or use --accelerate_config fsdp2")


def build_launch_command(command: str, options: dict[str, str], rest: list[str]) -> list[str]:
    """The ``accelerate launch`` command line that runs ``posttrain <command> <rest>`` on every process."""
    config_path = resolve_accelerate_config(options.get("accelerate_config"))
    _check_engine_available(config_path, _distributed_type(config_path))
    line = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_path]
    for name in LAUNCH_FLAGS:
        if name != "accelerate_config" and name in options:
            line += [f"--{name}", options[name]]
    return line + ["-m", "posttrain", command, *rest]


def launch(command: str, options: dict[str, str], rest: list[str]) -> int:
    """Run ``posttrain <command>`` under ``accelerate launch``; the exit code of the launch."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("this process was already started by a launcher", field="num_processes",
                          fix="drop --num_processes / --accelerate_config, or start `posttrain` without a launcher")
    line = build_launch_command(command, options, rest)
    print("posttrain: " + " ".join(line[1:]), file=sys.stderr, flush=True)
    return subprocess.call(line)
