"""`posttrain dpo`: the issue's command line on a CPU with no other flags, loss mixtures, the reference flag."""

import json
import os

from transformers import AutoModelForCausalLM

from posttrain.cli.main import main


def _write_preferences(path, n=4):
    from posttrain.tasks import get_task

    with open(path, "w") as handle:
        for row in get_task("arithmetic").as_preference(n):
            handle.write(json.dumps(row) + "\n")
    return str(path)


def test_issue_command_line_trains_and_saves(tiny_model_dir, tmp_path):
    data = _write_preferences(tmp_path / "prefs.jsonl")
    code = main(["dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir",
                 str(tmp_path / "O"), "--per_device_train_batch_size", "4", "--learning_rate", "5e-7", "--beta", "0.1"])
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "O"))
    assert model.config.num_hidden_layers == 2
    records = [json.loads(line) for line in open(tmp_path / "O" / "metrics.jsonl")]
    assert max(r["step"] for r in records) == 3  # 4 pairs, batch 4, the Trainer's default 3 epochs


def test_loss_mixture_reference_path_and_yaml(tiny_model_dir, tmp_path):
    data = _write_preferences(tmp_path / "prefs.jsonl")
    config = tmp_path / "dpo.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'mix'}\n"
                      "loss_type: [sigmoid, ipo]\nloss_weights: [0.7, 0.3]\nmax_steps: 1\nsave_strategy: 'no'\n"
                      "logging_steps: 1\nper_device_train_batch_size: 4\n")
    code = main(["dpo", "--config", str(config), "--ref_model_name_or_path", tiny_model_dir, "--rpo_alpha", "1.0"])
    assert code == 0
    record = next(json.loads(line) for line in open(tmp_path / "mix" / "metrics.jsonl") if "loss/ipo" in line)
    expected = 0.7 * record["loss/sigmoid"] + 0.3 * record["loss/ipo"] + record["loss/nll"]
    assert abs(record["loss"] - expected) < 1e-4 * max(1.0, abs(expected))


def test_unknown_loss_type_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    code = main(["dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", "x.jsonl", "--loss_type", "sigmod"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--loss_type" in err and "sigmoid" in err and "Traceback" not in err
    assert not os.path.exists("x.jsonl")
