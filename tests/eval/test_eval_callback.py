"""EvalCallback: held-out figures every N steps, in the log, metrics.jsonl and the run report."""

from __future__ import annotations

import json
import os

import pytest

from posttrain import ConfigError, SFTConfig, SFTTrainer
from posttrain.eval.callback import EvalCallback
from posttrain.tasks import get_task

TASK = get_task("arithmetic")


def _text_length(prompts, completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


@pytest.mark.slow  # trains and evaluates
def test_figures_every_n_steps_match_an_independent_evaluation(tiny_model_dir, tmp_path):
    from posttrain.eval.accuracy import evaluate_task

    out = str(tmp_path / "run")
    problems = TASK.make_problems(6, split="test")
    callback = EvalCallback(TASK.as_prompt_only(problems), every=2, reward_funcs=[_text_length], max_new_tokens=5)
    trainer = SFTTrainer(tiny_model_dir, train_dataset=TASK.as_messages(32),
                         args=SFTConfig(output_dir=out, max_steps=5, per_device_train_batch_size=4, learning_rate=1e-3,
                                        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True))
    trainer.add_callback(callback)
    trainer.train()
    steps = [r["step"] for r in trainer.state.log_history if "eval_task/_text_length" in r]
    assert steps == [2, 4, 5]  # every 2 steps, and once at the end
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        logged = [json.loads(line) for line in handle if "eval_task/_text_length" in line]
    assert [r["step"] for r in logged] == [2, 4, 5]
    reference = evaluate_task(trainer.model, trainer.processing_class, TASK, problems, max_new_tokens=5, n_samples=6)
    expected = sum(len(s["completion"]) for s in reference["samples"]) / len(problems)
    assert logged[-1]["eval_task/_text_length"] == pytest.approx(expected)
    assert "![evaluation curves](evaluation.png)" in open(os.path.join(out, "report.md")).read()


def test_task_name_defaults_to_its_check_and_bad_arguments_are_refused():
    callback = EvalCallback("arithmetic", num_problems=4)
    assert [f.__name__ for f in callback.reward_funcs] == ["correct"]
    assert len(callback.rows) == 4
    with pytest.raises(ConfigError, match="every"):
        EvalCallback("arithmetic", every=0)
    with pytest.raises(ConfigError, match="nothing to score"):
        EvalCallback([{"prompt": "hi"}])
