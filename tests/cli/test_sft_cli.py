"""`posttrain sft` and the shared CLI behaviour: flags from the config, YAML, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from posttrain.cli.main import main


def _write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def _chat_rows(n=12):
    return [{"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(n)]


def test_sft_from_flags_trains_and_saves(tiny_model_dir, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "train.jsonl", _chat_rows())
    code = main(["sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir",
                 str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--max_steps", "2",
                 "--save_strategy", "no", "--learning_rate", "1e-3", "--logging_steps", "1"])
    assert code == 0
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert any("loss" in r for r in records)


def test_yaml_config_with_flag_override_and_lora(tiny_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", _chat_rows())
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'yaml-out'}\n"
        "max_steps: 5\nper_device_train_batch_size: 2\nsave_strategy: 'no'\nuse_peft: true\nlora_r: 4\n"
    )
    code = main(["sft", "--config", str(config), "--max_steps", "1"])
    assert code == 0
    trainer_state = tmp_path / "yaml-out" / "adapter_config.json"
    assert trainer_state.is_file()
    records = [json.loads(line) for line in open(tmp_path / "yaml-out" / "metrics.jsonl")]
    assert max(r["step"] for r in records) == 1  # the flag overrode max_steps: 5


def test_bad_flag_is_one_line_exit_2(capsys):
    assert main(["sft", "--no_such_flag", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_such_flag" in err and "Traceback" not in err


def test_missing_dataset_column_is_one_line_naming_file_and_row(tiny_model_dir, tmp_path, capsys):
    rows = _chat_rows(3) + [{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}]
    data = _write_jsonl(tmp_path / "bad.jsonl", rows)
    code = main(["sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", data,
                 "--output_dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("posttrain sft: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "bad.jsonl" in errors[0] and "row 3" in errors[0] and "robot" in errors[0]


def test_missing_model_and_dataset_flags(capsys, tmp_path):
    assert main(["sft", "--dataset_name", "x.jsonl"]) == 2
    assert "--model_name_or_path" in capsys.readouterr().err
    assert main(["sft", "--model_name_or_path", str(tmp_path)]) == 2
    assert "--dataset_name" in capsys.readouterr().err


def test_debug_flag_shows_traceback():
    with pytest.raises(Exception):
        main(["sft", "--no_such_flag", "3", "--debug"])


@pytest.mark.slow  # renders the whole help text, about 5 s
def test_help_lists_config_fields_with_their_docs():
    out = subprocess.run([sys.executable, "-m", "posttrain", "sft", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--max_length" in out.stdout and "--packing" in out.stdout and "--use_peft" in out.stdout
    assert "Pack several sequences" in out.stdout


def test_unknown_command_and_env(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["env"]) == 0
    assert "torch" in capsys.readouterr().out
