"""One scoring rule for reward models: the score at each row's last attended token.

Checked on Llama-, Qwen2- and GPT-2-style tiny models built offline, with tokenizers that pad with
their EOS token (Llama 3 / Mistral / GPT-2 style) or have a pad token of their own (Qwen2 style):
PPO's rollout scores, RewardTrainer's training scores and RewardModelScorer (GRPO, RLOO) agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = "what is one two three four plus ? it yes no . the answer".split()
ARCHES = ("llama", "qwen2", "gpt2")


def make_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the special-token scheme of ``arch``'s family.

    llama: BOS ``<s>`` added to every text, EOS ``</s>``, no pad token (padding falls back to EOS);
    qwen2: EOS ``<|im_end|>``, its own pad ``<|endoftext|>``, no BOS;
    gpt2: ``<|endoftext|>`` is BOS, EOS and (by fallback) pad; no BOS added.
    """
    specials = {"llama": ["<s>", "</s>", "<unk>"], "qwen2": ["<|endoftext|>", "<|im_end|>", "<unk>"],
                "gpt2": ["<|endoftext|>", "<unk>"]}[arch]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if arch == "llama":
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if arch == "qwen2":
        return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>")


def make_config(arch: str, tokenizer, pad_token_id: int | None):
    common = dict(vocab_size=len(tokenizer), num_labels=1, pad_token_id=pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    config_class = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    return config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, **common)


def make_reward_model(arch: str, tokenizer, pad_token_id: int | None, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(make_config(arch, tokenizer, pad_token_id))
    with torch.no_grad():  # scores of order 1, so that positions give visibly different scores
        model.score.weight.normal_(0.0, 1.0)
    return model.eval()


def score_at(model, ids: list[int], position: int) -> float:
    """The score head at ``position`` of one unpadded row, from the backbone alone (no pooling logic)."""
    backbone = model.transformer if isinstance(model, transformers.GPT2ForSequenceClassification) else model.model
    with torch.no_grad():
        hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state
        return model.score(hidden[0, position]).item()


def pad_rows(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


# ----------------------------------------------------------------------------- the pure rule


def test_gather_reads_the_last_attended_position_whatever_the_padding():
    from posttrain.models.reward_scoring import gather_sequence_scores, last_attended_index

    token_scores = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 10
    attention_mask = torch.tensor([[1, 1, 0, 0],   # right padding: position 1
                                   [0, 0, 1, 1],   # left padding: position 3
                                   [0, 1, 1, 0]])  # both sides: position 2
    assert last_attended_index(attention_mask).tolist() == [1, 3, 2]
    assert gather_sequence_scores(token_scores, attention_mask).tolist() == [10.0, 70.0, 100.0]
    assert gather_sequence_scores(token_scores[..., None], attention_mask).tolist() == [10.0, 70.0, 100.0]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHES)
def test_padded_rows_score_as_alone_at_their_last_token(arch, side):
    from posttrain.models.reward_scoring import sequence_scores

    tokenizer = make_tokenizer(arch)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = make_reward_model(arch, tokenizer, pad_id)
    eos = tokenizer.eos_token_id
    rows = [tokenizer("what is two plus two ? it is four .")["input_ids"] + [eos],
            tokenizer("yes")["input_ids"] + [eos],
            tokenizer("what is one plus one ? the answer")["input_ids"]]  # cut off before its EOS
    input_ids, attention_mask = pad_rows(rows, pad_id, side)
    with torch.no_grad():
        scores = sequence_scores(model, input_ids, attention_mask)
    expected = [score_at(model, row, len(row) - 1) for row in rows]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    # the rows ending with EOS are read at the EOS, not at the token before it
    assert all(abs(score_at(model, row, len(row) - 2) - e) > 1e-3 for row, e in zip(rows[:2], expected[:2]))


def test_a_config_without_pad_id_still_scores_a_padded_batch():
    from posttrain.models.reward_scoring import sequence_scores

    tokenizer = make_tokenizer("llama")
    model = make_reward_model("llama", tokenizer, pad_token_id=None)
    rows = [[1, 5, 6, 2], [1, 7, 2]]
    input_ids, attention_mask = pad_rows(rows, 0, "right")
    with torch.no_grad():
        scores = sequence_scores(model, input_ids, attention_mask)
    expected = torch.tensor([score_at(model, r, len(r) - 1) for r in rows])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert model.config.pad_token_id is None


def test_a_causal_lm_is_not_scored_as_a_reward_model():
    from posttrain.errors import ConfigError
    from posttrain.models.reward_scoring import sequence_scores

    tokenizer = make_tokenizer("qwen2")
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(make_config("qwen2", tokenizer, tokenizer.pad_token_id))
    with pytest.raises(ConfigError, match="one score per sequence"):
        sequence_scores(lm, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- PPO == RewardTrainer == scorer


PROMPTS = ["what is two plus two ?", "what is one plus three ?", "what is one plus one ?"]
COMPLETIONS = ["it is four .", "four", "the answer is two ."]


@pytest.mark.parametrize("arch", ARCHES)
def test_ppo_reads_the_score_reward_training_computes(arch, tmp_path):
    """Same rows, same ids: PPO's rollout score equals RewardTrainer's score and the GRPO scorer's."""
    from posttrain import PPOConfig, PPOTrainer, RewardConfig, RewardTrainer
    from posttrain.rewards import RewardModelScorer
    from posttrain.rollout.batch import RolloutBatch
    from posttrain.rollout.sequences import RolloutSequences

    tokenizer = make_tokenizer(arch)
    reward_model = make_reward_model(arch, tokenizer, pad_token_id=None)
    torch.manual_seed(1)
    policy = transformers.AutoModelForCausalLM.from_config(make_config(arch, tokenizer, None))

    ppo = PPOTrainer(
        args=PPOConfig(output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=3, total_episodes=3,
                       response_length=8, num_mini_batches=1, save_strategy="no", disable_tqdm=True,
                       num_sample_generations=0),
        processing_class=tokenizer, model=policy, reward_model=copy.deepcopy(reward_model),
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
    )
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert (pad == eos) == (arch != "qwen2")  # llama and gpt2 styles pad with EOS
    ppo.reward_model.config.pad_token_id = pad  # as RewardTrainer saves it

    # a rollout: left-padded prompts; completions ended by EOS, except the last one (truncated)
    prompt_rows = [ppo.train_dataset[i]["prompt_input_ids"] for i in range(3)]
    completion_rows = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    completion_rows = [completion_rows[0] + [eos], completion_rows[1] + [eos], completion_rows[2]]
    prompt_ids, prompt_mask = pad_rows(prompt_rows, pad, "left")
    completion_ids, completion_mask = pad_rows(completion_rows, pad, "right")
    rollout = RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask,
                           is_truncated=torch.tensor([False, False, True]), prompt_index=torch.arange(3), group_size=1)
    ppo_scores = ppo.reward_scores(RolloutSequences.from_batch(rollout))

    # RewardTrainer on the same token ids (the truncated row as a pair cut by overlong_policy='truncate')
    pairs = Dataset.from_list([{"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": completion_rows[1]}
                               for p, c in zip(prompt_rows, completion_rows)])
    reward = RewardTrainer(model=copy.deepcopy(reward_model), processing_class=tokenizer, train_dataset=pairs,
                           args=RewardConfig(output_dir=str(tmp_path / "rm"), save_strategy="no", disable_tqdm=True))
    batch = reward.data_collator([reward.train_dataset[i] for i in range(3)])
    with torch.no_grad():
        _, outputs = reward.compute_loss(reward.model, batch, return_outputs=True)
    torch.testing.assert_close(ppo_scores, outputs["rewards_chosen"], atol=1e-5, rtol=1e-5)

    # ... and the ids are those RewardTrainer makes from the text, which the GRPO scorer also reads
    texts = reward._prepare_dataset(Dataset.from_list(
        [{"prompt": p, "chosen": c, "rejected": "no"} for p, c in zip(PROMPTS[:2], COMPLETIONS[:2])]), reward.args, "t")
    for i in range(2):
        assert texts[i]["prompt_input_ids"] + texts[i]["chosen_input_ids"] == prompt_rows[i] + completion_rows[i]
    scorer = RewardModelScorer(copy.deepcopy(reward_model), tokenizer, batch_size=2)
    torch.testing.assert_close(torch.tensor(scorer(PROMPTS[:2], COMPLETIONS[:2])), ppo_scores[:2], atol=1e-5, rtol=1e-5)

    # an independent reference: each row alone, the score head at its last token
    expected = [score_at(reward_model, p + c, len(p + c) - 1) for p, c in zip(prompt_rows, completion_rows)]
    torch.testing.assert_close(ppo_scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_ppo_scores_a_chat_completion_as_reward_training_rendered_it(tiny_model_dir, tmp_path):
    """Generation stops at <|im_end|>; a rendered training turn goes on with the template's newline."""
    from transformers import AutoTokenizer

    from posttrain import PPOConfig, PPOTrainer
    from posttrain.models.tiny import tiny_model_path
    from posttrain.rewards import RewardModelScorer
    from posttrain.rollout.batch import RolloutBatch
    from posttrain.rollout.sequences import RolloutSequences

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    questions, answers = ["What is 2 + 3?", "What is 10 + 1?"], ["5", "The answer is 11."]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    ppo = PPOTrainer(
        args=PPOConfig(output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=2, total_episodes=2,
                       response_length=8, num_mini_batches=1, save_strategy="no", disable_tqdm=True,
                       num_sample_generations=0),
        model=tiny_model_dir, reward_model=tiny_model_path(reward=True),
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
    )
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_rows = [ppo.train_dataset[i]["prompt_input_ids"] for i in range(2)]
    completion_rows = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
    prompt_ids, prompt_mask = pad_rows(prompt_rows, pad, "left")
    completion_ids, completion_mask = pad_rows(completion_rows, pad, "right")
    rollout = RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask,
                           is_truncated=torch.tensor([False, False]), prompt_index=torch.arange(2), group_size=1)
    ppo_scores = ppo.reward_scores(RolloutSequences.from_batch(rollout))
    scorer = RewardModelScorer(tiny_model_path(reward=True))
    trained_layout = scorer(prompts=prompts, completions=[[{"role": "assistant", "content": a}] for a in answers])
    torch.testing.assert_close(ppo_scores, torch.tensor(trained_layout), atol=1e-5, rtol=1e-5)


def test_append_after_eos_and_the_chatml_turn_suffix(tiny_tokenizer):
    from posttrain.data.templates import turn_suffix_text
    from posttrain.models.reward_scoring import append_after_eos

    assert turn_suffix_text(tiny_tokenizer) == "\n"
    ids = torch.tensor([[0, 5, 6, 9, 0], [5, 6, 7, 8, 4]])  # row 0 ends with EOS 9 then padding; row 1 truncated
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 0, 1, 2, 0], [0, 1, 2, 3, 4]])
    new_ids, new_mask, new_positions = append_after_eos(ids, mask, positions, [7, 3], [9])
    assert new_ids.tolist() == [[0, 5, 6, 9, 7, 3, 0], [5, 6, 7, 8, 4, 0, 0]]
    assert new_mask.tolist() == [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]]
    assert new_positions[0, 4:6].tolist() == [3, 4]
