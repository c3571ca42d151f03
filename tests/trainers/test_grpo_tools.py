"""GRPO (and RLOO) with tools, environments and rollout_func: steps on the tiny model, loss masks in the loss,
metrics, one environment reset per rollout, rollout_func validation, episode records, replay and exact resume."""

import json

import pytest
import torch
from datasets import Dataset

from posttrain import ConfigError, GRPOConfig, GRPOTrainer
from posttrain.rollout import HFRolloutEngine
from posttrain.rollout.batch import RolloutBatch, left_pad, right_pad
from posttrain.trainers.rloo import RLOOConfig, RLOOTrainer

CALL = '\n<tool_call>\n{"name": "%s", "arguments": {"a": 3}}\n</tool_call>'


def multiply(a: int) -> int:
    """Double a number.

    Args:
        a: the number
    """
    return 2 * a


class ScriptedFirstTurn:
    """The policy's own engine, except that the first turn of every episode is a call of ``tool``
    (a random tiny model never writes one by itself); later turns are sampled by the policy."""

    def __init__(self, engine, tokenizer, tool="multiply"):
        self.engine = engine
        self.script = tokenizer.encode(CALL % tool, add_special_tokens=False) + [tokenizer.eos_token_id]
        self.tool_header = tokenizer.encode("<|im_start|>tool", add_special_tokens=False)
        self.pad_token_id, self.eos_token_ids = engine.pad_token_id, engine.eos_token_ids

    @property
    def device(self):
        return self.engine.device

    def load_weights(self, model):
        self.engine.load_weights(model)

    def generate(self, prompt_ids, *, num_generations=1, sampling=None, prompt_keys=None, **kwargs):
        prompts = [list(p) for p in prompt_ids]
        n = len(self.tool_header)
        if all(any(p[i:i + n] == self.tool_header for i in range(len(p) - n + 1)) for p in prompts):
            return self.engine.generate(prompts, num_generations=num_generations, sampling=sampling,
                                        prompt_keys=prompt_keys, **kwargs)
        rows = len(prompts) * num_generations
        prompt_tensor, prompt_mask = left_pad(prompts, self.pad_token_id, "cpu")
        completion, mask = right_pad([self.script] * rows, self.pad_token_id, "cpu")
        return RolloutBatch(prompt_ids=prompt_tensor.repeat_interleave(num_generations, 0),
                            prompt_mask=prompt_mask.repeat_interleave(num_generations, 0), completion_ids=completion,
                            completion_mask=mask, is_truncated=torch.zeros(rows, dtype=torch.bool),
                            prompt_index=torch.arange(len(prompts)).repeat_interleave(num_generations),
                            group_size=num_generations)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    from posttrain.models.tiny import CHATML_TEMPLATE

    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded.chat_template = CHATML_TEMPLATE  # the template with tools, whatever an older cached model directory holds
    return loaded


def _prompts(n=4):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"Double {i}."}], "answer": 2 * i} for i in range(n)])


def _length_reward(prompts, completions, **kwargs):
    return [float(len(c[-1]["content"])) / 10.0 for c in completions]


def _config(tmp_path, name="out", config_class=GRPOConfig, **overrides):
    values = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=64, max_tool_calling_iterations=1, learning_rate=1e-3, logging_steps=1,
                  save_strategy="no", disable_tqdm=True, report_to="none", max_steps=2, seed=5)
    values.update(overrides)
    return config_class(**values)


def _scripted(trainer, tool="multiply"):
    trainer._engine = ScriptedFirstTurn(HFRolloutEngine(trainer.model, trainer._tokenizer), trainer._tokenizer, tool)
    return trainer


def _logged(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def test_two_grpo_steps_with_a_tool_train_record_and_log(tiny_model_dir, tokenizer, tmp_path):
    trainer = _scripted(GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=_config(tmp_path),
                                    train_dataset=_prompts(), tools=[multiply], processing_class=tokenizer))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2
    assert _logged(trainer, "tools/call_frequency") == [1.0, 1.0]
    assert _logged(trainer, "tools/failure_frequency") == [0.0, 0.0]
    assert _logged(trainer, "tools/turns_per_episode") == [2.0, 2.0]
    assert all(torch.isfinite(torch.tensor(_logged(trainer, "loss"))))
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.model.parameters()))
    records = [json.loads(line) for line in open(tmp_path / "out" / "episodes.jsonl")]
    assert len(records) == 2 * 4  # two generations of 2 prompts x 2 completions
    sampled = [sum(len(turn["sampled_ids"]) for turn in r["turns"]) for r in records]
    # as in TRL, completion lengths count sampled tokens, not the tool results between them
    assert _logged(trainer, "completions/mean_length") == pytest.approx([sum(sampled[:4]) / 4, sum(sampled[4:]) / 4])
    first = records[0]
    assert first["turns"][0]["results"][0]["content"] == "6" and first["turns"][0]["calls"][0]["arguments"] == {"a": 3}
    assert first["mode"] == "train" and first["round"] == 0 and first["reward"] is not None
    # the tool schema was rendered into the prompt the model saw
    prompt_text = trainer._tokenizer.decode(first["prompt_ids"])
    assert '"name": "multiply"' in prompt_text and "Double a number." in prompt_text


def test_the_loss_counts_sampled_tokens_only_and_every_forward_path_agrees(tiny_model_dir, tokenizer, tmp_path):
    trainer = _scripted(GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=_config(tmp_path),
                                    train_dataset=_prompts(), tools=[multiply], processing_class=tokenizer))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.train()
    rows = trainer._generate_and_score(batch, mode="train", record=False).rows
    suffix_tokens = (rows.completion_mask - rows.loss_mask).sum()
    assert suffix_tokens > 0
    rows.num_items_in_batch = rows.loss_mask.sum().float()
    results = {}
    for share in (True, False):
        trainer.args.share_prompt_forward = share
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, rows)
        loss.backward()
        results[share] = (loss.detach(), [p.grad.clone() for p in trainer.model.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0])
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # on-policy (ratio 1, beta 0) the dapo loss is -sum_i A_i * (sampled tokens of i) / (all sampled tokens):
    # tool tokens count neither in the sum nor in the normaliser
    expected = -(rows.advantages * rows.loss_mask.sum(1)).sum() / rows.loss_mask.sum()
    assert rows.advantages.abs().max() > 0
    assert results[True][0].item() == pytest.approx(expected.item(), abs=1e-6)


class CounterEnvironment:
    """A store whose tool's output depends on a counter that outlives episodes (reset does not clear it)."""

    resets = []

    def __init__(self):
        self.calls = 0
        self.answer = None

    def reset(self, **row):
        CounterEnvironment.resets.append(row)
        self.answer = row["answer"]
        return " (use the tool)"

    def multiply(self, a: int) -> int:
        """Double a number, then add how often this store was asked.

        Args:
            a: the number
        """
        self.calls += 1
        return 2 * a + self.calls

    def get_reward(self) -> float:
        return float(self.calls)


def test_environment_factory_resets_one_environment_per_rollout_and_adds_its_reward(tiny_model_dir, tokenizer, tmp_path):
    CounterEnvironment.resets = []
    seen = {}

    def reward(prompts, completions, environments=None, **kwargs):
        seen["environments"] = environments
        return [0.0] * len(completions)

    trainer = _scripted(GRPOTrainer(tiny_model_dir, reward_funcs=reward, args=_config(tmp_path, max_steps=1),
                                    train_dataset=_prompts(), environment_factory=CounterEnvironment, processing_class=tokenizer))
    CounterEnvironment.resets = []  # the probe built at construction is not reset
    trainer.train()
    assert len(CounterEnvironment.resets) == 4  # 2 prompts x 2 completions
    answers = [r["answer"] for r in CounterEnvironment.resets]  # rows prompt-major: each prompt's row, twice
    assert answers[0::2] == answers[1::2] and answers[0] != answers[2]
    assert all(isinstance(r["prompt"], list) for r in CounterEnvironment.resets)
    environments = seen["environments"]
    assert len(environments) == 4 and len({id(e) for e in environments}) == 4
    assert all(isinstance(e, CounterEnvironment) and e.calls == 1 for e in environments)
    assert _logged(trainer, "rewards/CounterEnvironment/mean") == [1.0]
    records = [json.loads(line) for line in open(tmp_path / "out" / "episodes.jsonl")]
    assert "(use the tool)" in trainer._tokenizer.decode(records[0]["prompt_ids"])


def test_tool_failures_and_missing_reward_sources(tiny_model_dir, tokenizer, tmp_path):
    def broken(a: int) -> int:
        """Fails.

        Args:
            a: x
        """
        raise RuntimeError("down")

    trainer = _scripted(GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=_config(tmp_path, max_steps=1),
                                    train_dataset=_prompts(), tools=[broken], processing_class=tokenizer), tool="broken")
    trainer.train()
    assert _logged(trainer, "tools/failure_frequency") == [1.0]
    records = [json.loads(line) for line in open(tmp_path / "out" / "episodes.jsonl")]
    assert records[0]["turns"][0]["results"][0]["content"] == "error: tool broken raised RuntimeError: down"
    with pytest.raises(ConfigError, match="reward"):
        GRPOTrainer(tiny_model_dir, reward_funcs=None, args=_config(tmp_path), train_dataset=_prompts(), tools=[multiply])


def test_a_template_without_tool_turns_is_refused_at_construction(tiny_model_dir, tokenizer, tmp_path):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                           "{{ raise_exception('unknown role ' ~ m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match="cannot render tool calls"):
        GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=_config(tmp_path), train_dataset=_prompts(),
                    tools=[multiply], processing_class=plain)


def _rollout_func_returning(**changes):
    def rollout_func(prompts, trainer):
        rows = len(prompts) * trainer.args.num_generations
        output = {"prompt_ids": [[1, 346, 201]] * rows, "completion_ids": [[30, 31, 32, 2]] * rows,
                  "logprobs": [[-1.0, -1.0, -1.0, -1.0]] * rows, "env_mask": [[1, 0, 0, 1]] * rows,
                  "tag": ["x"] * rows}
        output.update(changes)
        return {k: v for k, v in output.items() if v is not None}

    return rollout_func


@pytest.mark.parametrize("changes, message", [
    ({"logprobs": None}, "no logprobs"),
    ({"completion_ids": [[30, 2]]}, "completion_ids with 1 entries"),
    ({"logprobs": [[-1.0]] * 4}, "logprobs\\[0\\] of length 1"),
    ({"env_mask": [[1, 2, 0, 1]] * 4}, "other than 0 and 1"),
    ({"prompt_ids": [["a"]] * 4}, "other than token ids"),
])
def test_rollout_func_output_is_validated(tiny_model_dir, tmp_path, changes, message):
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=_config(tmp_path, max_steps=1),
                          train_dataset=_prompts(), rollout_func=_rollout_func_returning(**changes))
    with pytest.raises(ConfigError, match=message):
        trainer.train()


def test_rollout_func_rows_take_env_mask_as_loss_mask_and_extra_keys_reach_rewards(tiny_model_dir, tmp_path):
    seen = {}

    def reward(prompts, completions, tag=None, **kwargs):
        seen["tag"] = tag
        return [1.0, 0.0] * (len(completions) // 2)

    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=reward, args=_config(tmp_path, max_steps=1),
                          train_dataset=_prompts(), rollout_func=_rollout_func_returning())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    rows = trainer._generate_and_score(batch, mode="train").rows
    assert rows.loss_mask.tolist() == [[1, 0, 0, 1]] * 4 and rows.completion_mask.tolist() == [[1, 1, 1, 1]] * 4
    assert seen["tag"] == ["x"] * 4
    records = [json.loads(line) for line in open(tmp_path / "out" / "episodes.jsonl")]
    assert records[0]["logprobs"] == [-1.0] * 4
    with pytest.raises(ConfigError, match="rollout_func"):
        GRPOTrainer(tiny_model_dir, reward_funcs=reward, args=_config(tmp_path), train_dataset=_prompts(),
                    rollout_func=_rollout_func_returning(), tools=[multiply])


def test_rloo_runs_with_tools_and_refuses_turn_credit(tiny_model_dir, tokenizer, tmp_path):
    trainer = _scripted(RLOOTrainer(tiny_model_dir, reward_funcs=_length_reward,
                                    args=_config(tmp_path, config_class=RLOOConfig, max_steps=1),
                                    train_dataset=_prompts(), tools=[multiply], processing_class=tokenizer))
    trainer.train()
    assert _logged(trainer, "tools/call_frequency") == [1.0]
    with pytest.raises(ConfigError, match="turn"):
        RLOOTrainer(tiny_model_dir, reward_funcs=_length_reward, train_dataset=_prompts(),
                    args=_config(tmp_path, config_class=RLOOConfig, credit_assignment="turn"),
                    environment_factory=CounterEnvironment)


class TurnRewardEnvironment(CounterEnvironment):
    def get_turn_rewards(self):
        return [0.0, float(self.calls)]


def test_turn_credit_gives_each_turn_its_own_advantage(tiny_model_dir, tokenizer, tmp_path):
    trainer = _scripted(GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward,
                                    args=_config(tmp_path, max_steps=1, credit_assignment="turn"),
                                    train_dataset=_prompts(), environment_factory=TurnRewardEnvironment,
                                    processing_class=tokenizer))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    scored = trainer._generate_and_score(batch, mode="train", record=False)
    rows, index = scored.rows, scored.agent.turn_index
    assert rows.advantages.shape == rows.completion_ids.shape
    assert torch.all(rows.advantages[index == -1] == 0)
    for row in range(rows.num_rows):  # one value per turn, constant over its tokens
        for turn in (0, 1):
            values = rows.advantages[row][index[row] == turn]
            assert values.numel() == 0 or torch.all(values == values[0])
    with pytest.raises(ConfigError, match="get_turn_rewards"):
        GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, train_dataset=_prompts(),
                    args=_config(tmp_path, credit_assignment="turn"), environment_factory=CounterEnvironment)


class SavedCounter(CounterEnvironment):
    """The counter environment, with its state saved in checkpoints and episode records."""

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


class UnsavedCounter(CounterEnvironment):
    """The counter environment with no state_dict and no reward of its own: only replay can make it exact."""

    get_reward = None


def _resumable(model_dir, tokenizer, tmp_path, name, environment, resume=None, replay=None):
    args = _config(tmp_path, name=name, per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2,
                   tool_replay_path=replay)
    trainer = _scripted(GRPOTrainer(model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4),
                                    environment_factory=environment, processing_class=tokenizer))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _tool_results(run_dir):
    return [r["turns"][0]["results"][0]["content"] for r in map(json.loads, open(run_dir / "episodes.jsonl"))]


def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.slow  # three runs
def test_resume_restores_environment_state_and_reproduces_the_run(tiny_model_dir, tokenizer, tmp_path):
    straight = _resumable(tiny_model_dir, tokenizer, tmp_path, "a", SavedCounter)
    assert (tmp_path / "a" / "checkpoint-2" / "environments.json").is_file()
    resumed = _resumable(tiny_model_dir, tokenizer, tmp_path, "b", SavedCounter, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert _tool_results(tmp_path / "b") == _tool_results(tmp_path / "a")[-4:]
    assert _losses(resumed) == _losses(straight) and len(_losses(straight)) == 4
    assert _same_weights(straight, resumed)
    records = [json.loads(line) for line in open(tmp_path / "a" / "episodes.jsonl")]
    assert [r["environment_state"]["calls"] for r in records[-2:]] == [4, 4]  # each pooled store, 4 rounds


@pytest.mark.slow  # three runs
def test_replay_reproduces_a_resume_whose_environment_state_is_lost(tiny_model_dir, tokenizer, tmp_path):
    straight = _resumable(tiny_model_dir, tokenizer, tmp_path, "a", UnsavedCounter)
    checkpoint = str(tmp_path / "a" / "checkpoint-2")
    # the store's counter restarts in a new process: live tools answer differently after the resume
    _resumable(tiny_model_dir, tokenizer, tmp_path, "b", UnsavedCounter, resume=checkpoint)
    assert _tool_results(tmp_path / "b") != _tool_results(tmp_path / "a")[-4:]
    replayed = _resumable(tiny_model_dir, tokenizer, tmp_path, "c", UnsavedCounter, resume=checkpoint,
                          replay=str(tmp_path / "a"))
    assert _tool_results(tmp_path / "c") == _tool_results(tmp_path / "a")[-4:]
    assert _losses(replayed) == _losses(straight)
    assert _same_weights(straight, replayed)
