"""`posttrain eval` on saved runs: full weights, a LoRA adapter, a reward model; outputs and errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli.main import main
from posttrain.tasks import get_task


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A perturbed copy of the tiny model (same tokenizer), a LoRA adapter on it, a reward model, data files."""
    from peft import LoraConfig, get_peft_model

    from posttrain.models.tiny import tiny_model_path

    root = tmp_path_factory.mktemp("eval-runs")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    policy = str(root / "policy")
    model.save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    adapter = str(root / "adapter")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(adapter)
    task = get_task("arithmetic")
    task.as_preference(12, split="test").to_json(str(root / "pairs.jsonl"))
    task.as_messages(12, split="test").to_json(str(root / "chat.jsonl"))
    task.as_prompt_only(6, split="test").remove_columns("answer").to_json(str(root / "no_answer.jsonl"))
    return {"root": root, "base": tiny_model_dir, "policy": policy, "adapter": adapter,
            "reward": tiny_model_path(reward=True), "pairs": str(root / "pairs.jsonl"),
            "chat": str(root / "chat.jsonl"), "no_answer": str(root / "no_answer.jsonl")}


def _results(output_dir):
    with open(os.path.join(output_dir, "eval.json")) as handle:
        return {r["model"]: r for r in json.load(handle)["results"]}


def test_side_by_side_task_accuracy_with_reward_model_and_baseline(runs, tmp_path, capsys):
    out = str(tmp_path / "out")
    code = main(["eval", "--model", runs["base"], runs["policy"], runs["adapter"], "--task", "arithmetic",
                 "--num_problems", "8", "--num_samples", "3", "--max_new_tokens", "6", "--reward_model", runs["reward"],
                 "--baseline", runs["base"], "--output_dir", out])
    assert code == 0
    results = _results(out)
    base = os.path.basename(runs["base"])
    assert set(results) == {base, "policy", "adapter"}
    for name, result in results.items():
        figures = result["figures"]
        assert figures["correct/greedy"]["n"] == 8 and 0.0 <= figures["correct/greedy"]["mean"] <= 1.0
        assert figures["correct/pass@3"]["mean"] >= figures["correct/mean@3"]["mean"] - 1e-9
        assert figures["reward_model/greedy"]["n"] == 8
        assert ("win_rate_vs_" + base in figures) == (name != base)
    for name in ("eval.json", "eval.md", "eval.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    printed = capsys.readouterr().out
    assert "| model |" in printed and "win_rate_vs_" in printed


def test_greedy_completions_match_transformers_generate(runs, tmp_path):
    """The rollout engine's greedy completions are the ones model.generate gives (the older evaluator)."""
    from posttrain.eval.accuracy import evaluate_task
    from posttrain.eval.suite import generate, load_eval_model

    task = get_task("arithmetic")
    problems = task.make_problems(6, split="test")
    rows = list(task.as_prompt_only(problems))
    candidate = load_eval_model(runs["policy"])
    ours = generate(candidate, rows, max_new_tokens=6)
    reference = evaluate_task(candidate.model, candidate.tokenizer, task, problems, max_new_tokens=6, n_samples=6)
    assert [c[0]["content"] for c in ours.greedy] == [s["completion"] for s in reference["samples"]]


def test_preference_accuracy_of_reward_model_and_of_policy_against_reference(runs, tmp_path):
    from posttrain.data import load_data
    from posttrain.eval.suite import evaluate_preferences, load_eval_model

    out = str(tmp_path / "out")
    assert main(["eval", "--model", runs["policy"], runs["reward"], "--ref_model", runs["base"],
                 "--preference_dataset", runs["pairs"], "--lm_dataset", runs["chat"], "--output_dir", out]) == 0
    results = _results(out)
    reward_name = os.path.basename(runs["reward"])
    assert results[reward_name]["figures"]["preference_accuracy"]["n"] == 12
    assert "nll" not in results[reward_name]["figures"]
    policy = results["policy"]["figures"]
    assert policy["perplexity"]["mean"] == pytest.approx(torch.tensor(policy["nll"]["mean"]).exp().item(), rel=1e-6)

    # the implicit-reward margin, recomputed with full logits in float64
    candidate, reference = load_eval_model(runs["policy"]), load_eval_model(runs["base"])
    pairs = load_data(runs["pairs"])
    figures = evaluate_preferences(candidate, pairs, reference=reference, beta=0.1)
    from posttrain.data import tokenize_preference

    tokenized = tokenize_preference(pairs, candidate.tokenizer)

    def logp(model, prompt, completion):
        ids = torch.tensor([list(prompt) + list(completion)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        picked = logits.gather(-1, ids[0, 1:, None])[:, 0]
        return picked[len(prompt) - 1 :].sum().item()

    margins = []
    for row in tokenized:
        ratio = {side: logp(candidate.model, row["prompt_input_ids"], row[side]) - logp(reference.model, row["prompt_input_ids"], row[side])
                 for side in ("chosen_input_ids", "rejected_input_ids")}
        margins.append(0.1 * (ratio["chosen_input_ids"] - ratio["rejected_input_ids"]))
    assert figures["margin"]["mean"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert figures["accuracy"]["mean"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert policy["preference_margin"]["mean"] == pytest.approx(figures["margin"]["mean"], abs=1e-6)


def test_long_padded_batches_run_as_one_packed_row_with_the_same_figures(runs, monkeypatch):
    """Past PADDING_FREE_MIN_LENGTH columns (lowered here) log-probs and reward scores come from one packed row."""
    from posttrain.data import load_data
    from posttrain.eval.suite import evaluate_language_modeling, evaluate_preferences, load_eval_model
    from posttrain.models import packed_attention

    candidate, reference = load_eval_model(runs["policy"]), load_eval_model(runs["base"])
    reward = load_eval_model(runs["reward"])
    for loaded in (candidate, reference, reward):
        assert loaded.model.config._attn_implementation == packed_attention.PACKED_SDPA
    pairs, chat = load_data(runs["pairs"]), load_data(runs["chat"])

    def figures():
        return (evaluate_preferences(candidate, pairs, reference=reference, beta=0.1),
                evaluate_preferences(reward, pairs), evaluate_language_modeling(candidate, chat))

    padded = figures()
    layouts = []
    real = packed_attention.padded_batch_as_packed_row

    def spy(*args, **kwargs):
        layouts.append(real(*args, **kwargs))
        return layouts[-1]

    monkeypatch.setattr(packed_attention, "PADDING_FREE_MIN_LENGTH", 1)
    monkeypatch.setattr(packed_attention, "padded_batch_as_packed_row", spy)
    packed = figures()
    assert any(layout is not None for layout in layouts)  # the reward model's scores took the packed row
    for name in ("margin", "accuracy"):
        assert packed[0][name]["mean"] == pytest.approx(padded[0][name]["mean"], abs=1e-5)
        assert packed[1][name]["mean"] == pytest.approx(padded[1][name]["mean"], abs=1e-5)
    assert packed[2]["nll"] == pytest.approx(padded[2]["nll"], rel=1e-6)
    assert packed[2]["tokens"] == padded[2]["tokens"]


@pytest.mark.parametrize("case", ["no_answer_column", "causal_lm_as_reward_model", "different_tokenizers", "baseline_unknown"])
def test_bad_input_is_one_line_error(case, runs, tmp_path, capsys):
    from posttrain.models.tiny import tiny_model_path

    out = str(tmp_path / "out")
    argv = {
        "no_answer_column": ["--model", runs["base"], "--dataset_name", runs["no_answer"]],
        "causal_lm_as_reward_model": ["--model", runs["base"], "--task", "arithmetic", "--num_problems", "2",
                                      "--reward_model", runs["policy"]],
        "different_tokenizers": ["--model", runs["policy"], "--ref_model", tiny_model_path(seed=1),
                                 "--preference_dataset", runs["pairs"]],
        "baseline_unknown": ["--model", runs["base"], "--task", "arithmetic", "--num_problems", "2",
                             "--reward_model", runs["reward"], "--baseline", "nowhere"],
    }[case]
    assert main(["eval", *argv, "--output_dir", out]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("posttrain eval: error:")]
    assert len(lines) == 1 and "Fix:" in lines[0]
    expected = {"no_answer_column": "'answer'", "causal_lm_as_reward_model": "--reward_model",
                "different_tokenizers": "different tokenizers", "baseline_unknown": "nowhere"}[case]
    assert expected in lines[0]
    assert not os.path.exists(os.path.join(out, "eval.json"))
