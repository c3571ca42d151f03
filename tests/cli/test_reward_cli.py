"""`posttrain reward`: flags in, a reward model that transformers' pipeline loads out."""

import json

from transformers import pipeline

from posttrain.cli.main import main


def test_reward_command_trains_a_model_the_pipeline_loads(tiny_model_dir, tmp_path, capsys):
    from posttrain.tasks import get_task

    data = tmp_path / "prefs.jsonl"
    with open(data, "w") as handle:
        for row in get_task("arithmetic").as_preference(8, conversational=False):
            handle.write(json.dumps(row) + "\n")
    code = main(["reward", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--output_dir",
                 str(tmp_path / "rm"), "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no"])
    assert code == 0
    scores = pipeline("text-classification", model=str(tmp_path / "rm"))(["Question: 1 + 1?\nAnswer: 2", "nonsense"])
    assert len(scores) == 2 and all(0.0 < s["score"] < 1.0 for s in scores)
    records = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert any("accuracy" in r for r in records)


def test_reward_without_model_is_one_line_exit_2(capsys):
    assert main(["reward", "--dataset_name", "prefs.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--model_name_or_path" in err
