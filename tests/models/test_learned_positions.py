"""A model with a learned position table (GPT-2's ``wpe``): a sequence longer than the table is a clear error
naming the row, before training, and a forward that reaches past it (a rollout, an evaluation batch) stops with
the same explanation instead of nn.Embedding's "index out of range"; rotary models are left to run past
``max_position_embeddings``."""

from __future__ import annotations

import pickle

import pytest
import torch
from datasets import Dataset

from posttrain import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from posttrain.errors import DataError
from posttrain.models.positions import PositionLimitCheck, guard_position_table, learned_position_table
from posttrain.models.tiny import build_tiny_model, build_tokenizer

POSITIONS = 64


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _chats(lengths: list[int]) -> Dataset:
    return Dataset.from_list([{"messages": [{"role": "user", "content": "1+1"},
                                            {"role": "assistant", "content": " ".join(["2"] * n)}]} for n in lengths])


def _sft_args(tmp_path, **overrides) -> SFTConfig:
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to="none",
                  save_strategy="no", disable_tqdm=True, max_length=1024)
    return SFTConfig(**{**values, **overrides})


def test_sft_names_the_row_longer_than_the_position_table(tmp_path, tokenizer):
    model = build_tiny_model("gpt2", tokenizer, n_positions=POSITIONS)
    with pytest.raises(DataError) as caught:
        SFTTrainer(model, args=_sft_args(tmp_path), train_dataset=_chats([5, 5, 200, 5]), processing_class=tokenizer)
    message = str(caught.value)
    assert "train dataset, row 2, column 'input_ids': the row is" in message and f"{POSITIONS} learned positions" in message
    assert "transformer.wpe" in message and f"--max_length {POSITIONS}" in message
    assert caught.value.row == 2 and caught.value.column == "input_ids"


def test_sft_rows_cut_to_the_table_train(tmp_path, tokenizer):
    model = build_tiny_model("gpt2", tokenizer, n_positions=POSITIONS)
    trainer = SFTTrainer(model, args=_sft_args(tmp_path, max_length=POSITIONS), train_dataset=_chats([5, 5, 200, 5]),
                         processing_class=tokenizer)
    trainer.train()
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) == POSITIONS
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_packed_rows_are_checked_per_sequence(tmp_path, tokenizer):
    model = build_tiny_model("gpt2", tokenizer, n_positions=POSITIONS)
    # packed rows of 128 tokens hold sequences of at most 60: positions restart at each, so they fit
    short = SFTTrainer(model, args=_sft_args(tmp_path, packing=True, max_length=128), train_dataset=_chats([20] * 8),
                       processing_class=tokenizer)
    assert max(len(ids) for ids in short.train_dataset["input_ids"]) > POSITIONS
    with pytest.raises(DataError, match="a sequence packed in this row"):
        SFTTrainer(model, args=_sft_args(tmp_path, packing=True, max_length=128), train_dataset=_chats([20, 100, 20]),
                   processing_class=tokenizer)


def test_dpo_names_the_pair_longer_than_the_position_table(tmp_path, tokenizer):
    model = build_tiny_model("gpt2", tokenizer, n_positions=POSITIONS)
    rows = [{"prompt": "1+1", "chosen": "2", "rejected": "3"}] * 3 + [
        {"prompt": "1+1", "chosen": "2", "rejected": " ".join(["3"] * 100)}]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to="none",
                     save_strategy="no", disable_tqdm=True, max_length=None)
    with pytest.raises(DataError, match="row 3, column 'rejected_input_ids': a sequence of this pair is") as caught:
        DPOTrainer(model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert caught.value.row == 3 and caught.value.column == "rejected_input_ids"


def test_a_rotary_model_runs_past_max_position_embeddings(tmp_path, tokenizer):
    model = build_tiny_model("qwen2", tokenizer, max_position_embeddings=POSITIONS)
    assert learned_position_table(model) is None
    trainer = SFTTrainer(model, args=_sft_args(tmp_path), train_dataset=_chats([5, 200]), processing_class=tokenizer)
    trainer.train()
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) > POSITIONS


def test_a_forward_past_the_table_is_a_data_error_and_the_model_still_pickles(tokenizer):
    model = build_tiny_model("gpt2", tokenizer, n_positions=POSITIONS)
    assert guard_position_table(model) == POSITIONS
    assert guard_position_table(model) == POSITIONS  # once only
    hooks = model.transformer.wpe._forward_pre_hooks.values()
    assert sum(isinstance(hook, PositionLimitCheck) for hook in hooks) == 1
    model(input_ids=torch.ones(1, POSITIONS, dtype=torch.long))  # the last position is fine
    with pytest.raises(DataError, match=f"reaches position {POSITIONS}, past the {POSITIONS} learned positions"):
        model(input_ids=torch.ones(1, POSITIONS + 1, dtype=torch.long))
    pickle.loads(pickle.dumps(model))


def _length_reward(completions, **kwargs):
    return [float(len(text)) for text in completions]


def _grpo(model, tokenizer, tmp_path, prompts, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=1,
                  max_completion_length=8, report_to="none", save_strategy="no", disable_tqdm=True)
    return GRPOTrainer(model, reward_funcs=_length_reward, args=GRPOConfig(**{**values, **overrides}),
                       processing_class=tokenizer, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))


def _long_prompt(tokens: int) -> str:
    return " ".join(["1+1"] * tokens)


def test_grpo_names_the_prompt_whose_rollout_would_not_fit_and_its_fix_trains(tmp_path, tokenizer):
    model = build_tiny_model("gpt2", tokenizer, n_positions=POSITIONS)
    prompts = ["1+1="] * 3 + [_long_prompt(40)]
    with pytest.raises(DataError) as caught:
        _grpo(model, tokenizer, tmp_path, prompts, max_completion_length=32)
    error = caught.value
    assert error.row == 3 and error.column == "prompt_input_ids"
    prompt_length = int(error.found.split(" + ")[0])
    assert prompt_length + 32 > POSITIONS
    message = str(error)
    assert "max_completion_length" in message and f"{POSITIONS} learned positions" in message
    assert f"--max_prompt_length {POSITIONS - 32}" in message
    # the fix it names: prompts cut to the table less the completion budget; the longest rollout then fits
    trainer = _grpo(model, tokenizer, tmp_path, prompts, max_completion_length=32, max_prompt_length=POSITIONS - 32)
    assert max(len(ids) for ids in trainer.train_dataset["prompt_input_ids"]) == POSITIONS - 32
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_a_completion_budget_past_the_table_names_the_completion_setting(tmp_path, tokenizer):
    model = build_tiny_model("gpt2", tokenizer, n_positions=POSITIONS)
    with pytest.raises(DataError, match=r"row 0, column 'prompt_input_ids'.*lower --max_completion_length to") as caught:
        _grpo(model, tokenizer, tmp_path, ["1+1="] * 4, max_completion_length=POSITIONS + 8)
    assert "--max_prompt_length" not in str(caught.value)


def test_a_rotary_model_samples_past_max_position_embeddings(tmp_path, tokenizer):
    model = build_tiny_model("qwen2", tokenizer, max_position_embeddings=16)
    trainer = _grpo(model, tokenizer, tmp_path, ["1+1="] * 4, max_completion_length=32)  # no table: no check
    assert max(len(ids) for ids in trainer.train_dataset["prompt_input_ids"]) < 16


@pytest.mark.parametrize("method", ["rloo", "online_dpo", "ppo"])
def test_other_sampling_methods_check_prompt_plus_completion(tmp_path, tokenizer, method):
    from posttrain import OnlineDPOConfig, OnlineDPOTrainer, PPOConfig, PPOTrainer, RLOOConfig, RLOOTrainer

    model = build_tiny_model("gpt2", tokenizer, n_positions=POSITIONS)
    prompts = Dataset.from_list([{"prompt": "1+1="}, {"prompt": _long_prompt(40)}])
    common = dict(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True)
    with pytest.raises(DataError, match=r"row 1, column 'prompt_input_ids'") as caught:
        if method == "rloo":
            RLOOTrainer(model, reward_funcs=_length_reward, train_dataset=prompts, processing_class=tokenizer,
                        args=RLOOConfig(per_device_train_batch_size=2, num_generations=2, max_completion_length=32,
                                        **common))
        elif method == "online_dpo":
            OnlineDPOTrainer(model, reward_funcs=_length_reward, train_dataset=prompts, processing_class=tokenizer,
                             args=OnlineDPOConfig(per_device_train_batch_size=2, max_completion_length=32, **common))
        else:
            scorer = build_tiny_model("gpt2", tokenizer, reward=True, n_positions=POSITIONS)
            PPOTrainer(model=model, reward_model=scorer, train_dataset=prompts, processing_class=tokenizer,
                       args=PPOConfig(per_device_train_batch_size=2, total_episodes=2, response_length=32,
                                      num_mini_batches=1, **common))
    field = "response_length" if method == "ppo" else "max_completion_length"
    assert f"({field})" in str(caught.value)
