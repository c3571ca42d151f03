"""`posttrain demo --quick`: the whole pipeline runs end to end and writes its report."""

import json
import os

from posttrain.cli.main import main


def test_quick_demo_runs_every_stage_and_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("random init", "sft", "reward", "ppo", "grpo"):
        assert f"[demo] {stage}" in printed
    results = json.loads((out / "demo_results.json").read_text())
    assert [r["name"] for r in results] == ["random init", "sft", "reward", "ppo", "grpo"]
    for r in results:
        if r["name"] != "reward":
            assert 0.0 <= r["accuracy"]["test"] <= 1.0
    report = (out / "report.md").read_text()
    assert "| sft |" in report and "| grpo |" in report
    assert os.path.isfile(out / "sft" / "metrics.jsonl")


def test_demo_rejects_unknown_or_incomplete_stages(tmp_path, capsys):
    assert main(["demo", "--stages", "sft,frobnicate", "--output_dir", str(tmp_path)]) == 2
    assert "frobnicate" in capsys.readouterr().err
    assert main(["demo", "--stages", "ppo", "--output_dir", str(tmp_path)]) == 2
    assert "needs" in capsys.readouterr().err
