"""The `posttrain` command: one sub-command per method, plus demo, eval, env and init-model."""

from __future__ import annotations

import importlib
import logging
import os
import sys

# sub-command -> "module:function"; each function takes the remaining argv and returns an exit code
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("posttrain.cli.sft:main", "supervised fine-tuning"),
    "reward": ("posttrain.cli.reward:main", "reward modeling (Bradley-Terry)"),
    "dpo": ("posttrain.cli.dpo:main", "direct preference optimisation and its variants"),
    "grpo": ("posttrain.cli.grpo:main", "group relative policy optimisation"),
    "rloo": ("posttrain.cli.rloo:main", "REINFORCE leave-one-out"),
    "ppo": ("posttrain.cli.ppo:main", "PPO with a reward model and a value head"),
    "online-dpo": ("posttrain.cli.online_dpo:main", "online DPO with a reward model or judge"),
    "demo": ("posttrain.cli.demo:main", "the offline demo pipeline on an embedded task"),
    "eval": ("posttrain.cli.evaluate:main", "evaluate a model on an embedded task"),
    "init-model": ("posttrain.models.tiny:init_model_main", "create a tiny random model and tokenizer offline"),
    "env": ("posttrain.cli.env:main", "print versions and devices"),
    "vllm-serve": ("posttrain.cli.vllm_serve:main", "serve generation and weight sync for vllm_mode='server'"),
}


def _usage() -> str:
    lines = ["usage: posttrain <command> [flags] [--debug]   (posttrain <command> --help for its flags; --debug shows tracebacks)",
             "       posttrain <command> --num_processes N [--accelerate_config ddp|fsdp2|zero2|zero3|multi_node|FILE] "
             "[flags]   (starts `accelerate launch`)", "", "commands:"]
    for name, (target, summary) in COMMANDS.items():
        if _available(target):
            lines.append(f"  {name:<12} {summary}")
    return "\n".join(lines)


def _available(target: str) -> bool:
    module = target.split(":")[0]
    return importlib.util.find_spec(module) is not None


# sub-commands that train, and so may start several processes (posttrain.cli.launch)
LAUNCHABLE = ("sft", "reward", "dpo", "grpo", "rloo", "ppo", "online-dpo")

_TRAINER_DEBUG_VALUES = ("underflow_overflow", "tpu_metrics_debug")


def _take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove a bare ``--debug`` (show tracebacks); ``--debug underflow_overflow`` stays the Trainer's option."""
    kept, debug = [], False
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if arg == "--debug" and not following.startswith(_TRAINER_DEBUG_VALUES):
            debug = True
            continue
        kept.append(arg)
    return kept, debug


def _configure_logging() -> None:
    level = os.environ.get("POSTTRAIN_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("posttrain").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    from posttrain.errors import PosttrainError

    argv = list(sys.argv[1:] if argv is None else argv)
    argv, debug = _take_debug_flag(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS or not _available(COMMANDS[command][0]):
        known = ", ".join(name for name, (target, _) in COMMANDS.items() if _available(target))
        print(f"posttrain: error: unknown command '{command}'. Fix: use one of: {known}", file=sys.stderr)
        return 2
    _configure_logging()
    module_name, function_name = COMMANDS[command][0].split(":")
    try:
        if command in LAUNCHABLE:
            from posttrain.cli.launch import launch, split_launch_flags, wants_launch

            options, rest = split_launch_flags(rest)
            if wants_launch(options):
                return launch(command, options, rest + (["--debug"] if debug else []))
        function = getattr(importlib.import_module(module_name), function_name)
        code = function(rest)
        return int(code or 0)
    except PosttrainError as err:
        if debug:
            raise
        print(f"posttrain {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"posttrain {command}: interrupted; checkpoints already written are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
