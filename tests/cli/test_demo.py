"""`posttrain demo --quick`: the whole pipeline runs end to end and writes its report."""

import json
import os

import pytest

from posttrain.cli.main import main


@pytest.mark.slow  # the whole pipeline (~10 s); the fast subset covers each stage on its own
def test_quick_demo_runs_every_stage_and_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("random init", "sft", "dpo", "reward", "ppo", "grpo"):
        assert f"[demo] {stage}" in printed
    results = json.loads((out / "demo_results.json").read_text())
    assert [r["name"] for r in results] == ["random init", "sft", "dpo", "reward", "ppo", "grpo"]
    for r in results:
        if r["name"] != "reward":
            assert 0.0 <= r["accuracy"]["test"] <= 1.0
    report = (out / "report.md").read_text()
    assert "| sft |" in report and "| grpo |" in report
    assert os.path.isfile(out / "sft" / "metrics.jsonl")
    # the closing `posttrain eval` table: every stage's model, held-out accuracy for the policies
    evaluation = {r["model"]: r["figures"] for r in json.loads((out / "eval" / "eval.json").read_text())["results"]}
    assert set(evaluation) == {"model", "sft", "dpo", "reward", "ppo", "grpo"}
    held_out = {r["name"]: r["accuracy"]["test"] for r in results if r["accuracy"]}
    for name in ("sft", "dpo", "ppo", "grpo"):
        assert evaluation[name]["correct/greedy"]["mean"] == held_out[name]
        assert evaluation[name]["correct/greedy"]["n"] == 92
    assert "preference_accuracy" in evaluation["reward"] and "win_rate_vs_sft" in evaluation["dpo"]
    assert "## Every stage side by side" in report and os.path.isfile(out / "eval" / "eval.png")


def test_demo_rejects_unknown_or_incomplete_stages(tmp_path, capsys):
    assert main(["demo", "--stages", "sft,frobnicate", "--output_dir", str(tmp_path)]) == 2
    assert "frobnicate" in capsys.readouterr().err
    assert main(["demo", "--stages", "ppo", "--output_dir", str(tmp_path)]) == 2
    assert "needs" in capsys.readouterr().err
