"""Tool-calling data through the trainers: the DPO loss on a pair whose chosen side calls a tool, against
an independent rendering; reward and SFT trainers render the tools column."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from posttrain.data.tool_examples import TOOL_SCHEMAS, tool_conversations, tool_preferences


def _args(config_class, tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_train_epochs=1,
                  learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True)
    return config_class(**{**values, **overrides})


def _rendered_side(tokenizer, prompt, completion):
    """Prompt and completion ids from the tokenizer's own template, with the tools."""
    prompt_text = tokenizer.apply_chat_template(prompt, tools=TOOL_SCHEMAS, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + completion, tools=TOOL_SCHEMAS, tokenize=False)
    assert full_text.startswith(prompt_text)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(prompt_text), encode(full_text[len(prompt_text):])


def _completion_logp(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    token_logps = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return token_logps[len(prompt_ids) - 1:].sum()


def test_dpo_loss_on_a_tool_call_preference_matches_an_independent_rendering(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(policy.config)  # another seed: the log-ratios do not cancel
    rows = tool_preferences()
    trainer = DPOTrainer(model=policy, ref_model=reference, args=_args(DPOConfig, tmp_path), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows))
    first = trainer.train_dataset[0]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25}}' in tokenizer.decode(first["chosen_input_ids"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    loss = trainer.compute_loss(trainer.model, batch).item()

    margins = []
    for row in rows:
        log_ratios = []
        for side in ("chosen", "rejected"):
            prompt_ids, completion_ids = _rendered_side(tokenizer, row["prompt"], row[side])
            log_ratios.append(_completion_logp(policy, prompt_ids, completion_ids)
                              - _completion_logp(reference, prompt_ids, completion_ids))
        margins.append(log_ratios[0] - log_ratios[1])
    expected = -torch.nn.functional.logsigmoid(0.1 * torch.stack(margins)).mean()
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_reward_trainer_renders_the_tools(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = RewardTrainer(model=tiny_model_dir, args=_args(RewardConfig, tmp_path), processing_class=tokenizer,
                            train_dataset=Dataset.from_list(tool_preferences()))
    row = trainer.train_dataset[0]
    expected_prompt, expected_chosen = _rendered_side(tokenizer, tool_preferences()[0]["prompt"],
                                                      tool_preferences()[0]["chosen"])
    assert (row["prompt_input_ids"], row["chosen_input_ids"]) == (expected_prompt, expected_chosen)


def test_sft_trainer_renders_the_tools_and_masks_the_tool_results(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(model=tiny_model_dir, args=_args(SFTConfig, tmp_path, assistant_only_loss=True),
                         train_dataset=Dataset.from_list(tool_conversations(tools_as_json=True)))
    tokenizer = trainer.processing_class
    row = trainer.train_dataset[0]
    messages = tool_conversations()[0]["messages"]
    assert row["input_ids"] == tokenizer(tokenizer.apply_chat_template(messages, tools=TOOL_SCHEMAS, tokenize=False),
                                         add_special_tokens=False)["input_ids"]
    targets = tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m])
    assert targets == ('\n<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call><|im_end|>\n'
                       "12 plus 30 is 42.<|im_end|>\n")  # both assistant turns, not the tool's "42"
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_the_cached_tiny_model_has_the_current_chat_template(tiny_model_dir):
    """A tiny model cached before the template learned tools would render none of them."""
    from posttrain.models.tiny import CHATML_TEMPLATE

    assert AutoTokenizer.from_pretrained(tiny_model_dir).chat_template == CHATML_TEMPLATE
