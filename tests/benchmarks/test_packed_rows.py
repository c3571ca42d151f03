"""The packed-rows benchmark runs both settings in their own processes and reports the same loss for both."""

from __future__ import annotations

import json

import pytest

from benchmarks import packed_rows


@pytest.mark.slow  # two processes, about 8 s
def test_both_settings_run_and_agree(tmp_path, capsys):
    out = tmp_path / "packed.json"
    assert packed_rows.main(["--sequences", "3", "--sequence-tokens", "24", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["setting"] for r in results] == ["masked", "packed"]
    assert abs(results[0]["loss"] - results[1]["loss"]) < 1e-5
    assert all(r["seconds"] > 0 and r["peak_rise_mb"] >= 0 for r in results)
    assert "packed/masked:" in capsys.readouterr().out


@pytest.mark.slow  # two processes over 2 x 2,100 tokens, about 10 s
def test_the_padded_batch_runs_padding_free_at_its_width(tmp_path):
    out = tmp_path / "padded.json"
    # 2,100 columns: past PADDING_FREE_MIN_LENGTH, so the packed setting takes the padding-free layout
    assert packed_rows.main(["--padded", "--sequences", "2", "--sequence-tokens", "2100", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert abs(results[0]["loss"] - results[1]["loss"]) < 1e-5


@pytest.mark.slow  # two processes over 2 x 2,100 tokens, about 6 s
def test_the_reward_model_scores_the_padded_batch_alike_in_both_settings(tmp_path):
    out = tmp_path / "reward.json"
    assert packed_rows.main(["--reward", "--sequences", "2", "--sequence-tokens", "2100", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["reward"] and [r["setting"] for r in saved["results"]] == ["masked", "packed"]
    masked, packed = saved["results"]
    assert masked["loss"] != 0 and abs(masked["loss"] - packed["loss"]) < 1e-5


def test_reward_and_sft_are_refused_together(capsys):
    with pytest.raises(SystemExit):
        packed_rows.main(["--reward", "--sft"])
    assert "pick one" in capsys.readouterr().err
