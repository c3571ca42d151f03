"""`posttrain <method> --num_processes N --accelerate_config NAME`: the shipped configs and the launch line."""

import filecmp
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser

from posttrain import ConfigError
from posttrain.cli import launch
from posttrain.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "accelerate"
EXPECTED_TYPES = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
                  "multi_node": "MULTI_GPU"}


@pytest.mark.parametrize("name", launch.SHIPPED_CONFIGS)
def test_every_shipped_config_loads_with_accelerate(name):
    path = launch.shipped_config_path(name)
    config = load_config_from_file(path)
    assert str(config.distributed_type.value) == EXPECTED_TYPES[name]
    assert config.mixed_precision == "no"  # precision is posttrain's bf16 default, one source of truth
    assert filecmp.cmp(path, EXAMPLES / f"{name}.yaml", shallow=False), "examples/accelerate/ drifted from the package"
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2


def test_examples_folder_has_no_config_the_cli_cannot_name():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(launch.SHIPPED_CONFIGS)


def test_launch_line_is_what_accelerate_launch_parses(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real_find_spec(name, *a))
    options, rest = launch.split_launch_flags(
        ["--model_name_or_path", "m", "--accelerate_config", "zero2", "--learning_rate", "1e-5",
         "--num_processes=8", "--main_process_port", "29600"])
    line = launch.build_launch_command("sft", options, rest)
    assert line[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    parsed = launch_command_parser().parse_args(line[3:])
    assert parsed.config_file == launch.shipped_config_path("zero2")
    assert parsed.num_processes == 8 and parsed.main_process_port == 29600 and parsed.module
    assert parsed.training_script == "posttrain"
    assert parsed.training_script_args == ["sft", "--model_name_or_path", "m", "--learning_rate", "1e-5"]


def test_num_processes_alone_uses_ddp_and_a_config_path_is_taken_as_is(tmp_path):
    options, rest = launch.split_launch_flags(["--num_processes", "2", "--max_steps", "1"])
    assert launch.wants_launch(options) and rest == ["--max_steps", "1"]
    assert launch.build_launch_command("dpo", options, rest)[4] == launch.shipped_config_path("ddp")
    own = tmp_path / "mine.yaml"
    own.write_text(open(launch.shipped_config_path("ddp")).read())
    assert launch.resolve_accelerate_config(str(own)) == str(own)
    assert not launch.wants_launch(launch.split_launch_flags(["--num_processes", "1"])[0])


def test_main_hands_the_other_flags_to_the_launched_command(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda line: calls.append(line) or 0)
    assert main(["dpo", "--num_processes", "2", "--beta", "0.2", "--debug"]) == 0
    assert calls[0][-5:] == ["posttrain", "dpo", "--beta", "0.2", "--debug"]
    assert "--num_processes" in calls[0] and calls[0].index("--num_processes") < calls[0].index("posttrain")


@pytest.mark.parametrize("argv, names", [
    (["--accelerate_config", "zero9"], ["zero9", "ddp, fsdp2"]),
    (["--num_processes", "two"], ["--num_processes", "two"]),
    (["--num_processes"], ["--num_processes needs a value"]),
])
def test_bad_launch_flags_are_one_line_exit_2(argv, names, capsys):
    assert main(["sft", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert all(name in err for name in names)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed here")
def test_zero_without_deepspeed_says_how_to_get_it(capsys):
    assert main(["sft", "--accelerate_config", "zero3", "--num_processes", "2"]) == 2
    assert "pip install deepspeed" in capsys.readouterr().err


def test_launch_flags_inside_a_launched_process_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="already started by a launcher"):
        launch.launch("sft", {"num_processes": "2"}, [])


def test_a_flag_prefix_is_not_taken_for_the_flag(tiny_model_dir, capsys):
    assert main(["sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", "x.jsonl", "--learning_rat", "1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--learning_rat" in err and "unrecognized" in err
    assert main(["sft", "--conf", "missing.yaml"]) == 2  # nor for --config
    assert "unrecognized arguments: --conf" in capsys.readouterr().err
