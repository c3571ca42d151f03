"""The multi-turn tool loop: token layout and loss masks, keyed sampling per turn, budgets, errors as
messages, replay of recorded tool results, and log-probs of multi-turn rows on every forward path."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import ConfigError, DataError
from posttrain.rollout import HFRolloutEngine, SamplingParams, sampling_keys
from posttrain.rollout.batch import RolloutBatch, left_pad, right_pad
from posttrain.rollout.multiturn import ToolReplay, episode_record, run_tool_episodes, tool_suffix_ids
from posttrain.rollout.sequences import completion_token_logps
from posttrain.rollout.tools import ToolExecutor

CALL = '\n<tool_call>\n{"name": "multiply", "arguments": {"a": 3}}\n</tool_call>'


def multiply(a: int, b: int = 2) -> int:
    """Multiply.

    Args:
        a: first
        b: second
    """
    return a * b


class ScriptedFirstTurn:
    """The tiny model's engine, except that a turn whose context holds no tool message is ``script`` (a tool
    call): a random tiny model never writes one by itself. ``always``: every turn is the script."""

    def __init__(self, engine, tokenizer, script=CALL, always=False):
        self.engine, self.tokenizer, self.always = engine, tokenizer, always
        self.script = tokenizer.encode(script, add_special_tokens=False) + [tokenizer.eos_token_id]
        self.tool_header = tokenizer.encode("<|im_start|>tool", add_special_tokens=False)
        self.pad_token_id, self.eos_token_ids = engine.pad_token_id, engine.eos_token_ids
        self.calls = []

    @property
    def device(self):
        return self.engine.device

    def load_weights(self, model):
        self.engine.load_weights(model)

    def _later_turn(self, ids):
        n = len(self.tool_header)
        return any(ids[i:i + n] == self.tool_header for i in range(len(ids) - n + 1))

    def generate(self, prompt_ids, *, num_generations=1, sampling=None, prompt_keys=None, **kwargs):
        prompts = [list(p) for p in prompt_ids]
        self.calls.append(len(prompts))
        if not self.always and all(self._later_turn(p) for p in prompts):
            return self.engine.generate(prompts, num_generations=num_generations, sampling=sampling,
                                        prompt_keys=prompt_keys, **kwargs)
        assert self.always or not any(self._later_turn(p) for p in prompts)
        rows = len(prompts) * num_generations
        length = min(len(self.script), sampling.max_completion_length)
        prompt_tensor, prompt_mask = left_pad(prompts, self.pad_token_id, "cpu")
        completion, mask = right_pad([self.script[:length]] * rows, self.pad_token_id, "cpu")
        return RolloutBatch(prompt_ids=prompt_tensor.repeat_interleave(num_generations, 0),
                            prompt_mask=prompt_mask.repeat_interleave(num_generations, 0), completion_ids=completion,
                            completion_mask=mask, is_truncated=torch.full((rows,), length < len(self.script)),
                            prompt_index=torch.arange(len(prompts)).repeat_interleave(num_generations),
                            group_size=num_generations)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _prompts(tokenizer, questions):
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                          return_dict=False) for q in questions]


def _run(engine, tokenizer, prompts, tools, keys, generations=2, budget=80, **options):
    return run_tool_episodes(engine, tokenizer, prompts, num_generations=generations,
                             sampling=SamplingParams(max_completion_length=budget),
                             tools_per_row=[tools] * (len(prompts) * generations),
                             executor=options.pop("executor", ToolExecutor(timeout=5)), prompt_keys=keys, **options)


def test_tool_results_are_in_the_completion_with_loss_mask_zero_token_by_token(model, tokenizer):
    engine = ScriptedFirstTurn(HFRolloutEngine(model, tokenizer), tokenizer)
    prompts = _prompts(tokenizer, ["What is 3 times 2?", "Multiply 3 by 2."])
    rollout = _run(engine, tokenizer, prompts, {"multiply": multiply}, sampling_keys(0, "t", 0, positions=range(2)),
                   max_iterations=1)
    suffix = tool_suffix_ids(tokenizer, [{"role": "tool", "name": "multiply", "content": "6"}])
    assert tokenizer.decode(suffix) == "\n<|im_start|>tool\n6<|im_end|>\n<|im_start|>assistant\n"
    rows = rollout.rows
    for row, episode in enumerate(rollout.episodes):
        assert len(episode.turns) == 2 and episode.turns[0].results[0].content == "6"
        first, second = engine.script, episode.turns[1].sampled_ids
        length = len(first) + len(suffix) + len(second)
        assert rows.completion_ids[row, :length].tolist() == first + suffix + second
        assert rows.loss_mask[row].tolist() == [1] * len(first) + [0] * len(suffix) + [1] * len(second) + [0] * (
            rows.loss_mask.shape[1] - length)
        assert rows.completion_mask[row].tolist() == [1] * length + [0] * (rows.completion_mask.shape[1] - length)
        assert rollout.turn_index[row, :length].tolist() == [0] * len(first) + [-1] * len(suffix) + [1] * len(second)
        assert rows.prompt_ids[row][rows.prompt_mask[row].bool()].tolist() == prompts[row // 2]


def test_later_turns_are_keyed_by_episode_not_by_batch_layout(model, tokenizer):
    engine = ScriptedFirstTurn(HFRolloutEngine(model, tokenizer), tokenizer)
    prompts = _prompts(tokenizer, ["What is 3 times 2?", "Say something long about rivers and mountains please."])
    keys = sampling_keys(0, "t", 0, positions=range(2))
    together = _run(engine, tokenizer, prompts, {"multiply": multiply}, keys, max_iterations=1)
    alone = _run(engine, tokenizer, prompts[1:], {"multiply": multiply}, keys[1:], max_iterations=1)
    for mine, theirs in zip(together.episodes[2:], alone.episodes):
        assert mine.completion_ids == theirs.completion_ids
    # the two members of a group draw differently in their second turn
    assert together.episodes[0].turns[1].sampled_ids != together.episodes[1].turns[1].sampled_ids


def test_iterations_and_the_completion_budget_bound_the_episode(model, tokenizer):
    engine = ScriptedFirstTurn(HFRolloutEngine(model, tokenizer), tokenizer, always=True)
    prompts = _prompts(tokenizer, ["What is 3 times 2?"])
    keys = sampling_keys(0, "t", 0, positions=range(1))
    capped = _run(engine, tokenizer, prompts, {"multiply": multiply}, keys, budget=200, max_iterations=2)
    assert [len(e.turns) for e in capped.episodes] == [3, 3]
    assert [e.num_calls for e in capped.episodes] == [2, 2]  # the third turn's call is never run
    assert capped.rows.loss_mask.sum(1).tolist() == [3 * len(engine.script)] * 2
    budget = 2 * len(engine.script) + 12
    limited = _run(engine, tokenizer, prompts, {"multiply": multiply}, keys, budget=budget)
    for episode in limited.episodes:
        assert len(episode.completion_ids) <= budget
        assert episode.turns[-1].suffix_ids == []  # a result with no room to answer is not appended


def test_tool_errors_and_timeouts_reach_the_model_as_text(model, tokenizer):
    import threading

    release = threading.Event()

    def hang(a: int) -> int:
        """Hang.

        Args:
            a: x
        """
        release.wait()
        return a

    script = CALL.replace("multiply", "hang")
    engine = ScriptedFirstTurn(HFRolloutEngine(model, tokenizer), tokenizer, script=script)
    prompts = _prompts(tokenizer, ["What is 3 times 2?"])
    rollout = _run(engine, tokenizer, prompts, {"hang": hang}, sampling_keys(0, "t", 0, positions=range(1)),
                   budget=100, max_iterations=1, executor=ToolExecutor(timeout=0.1))
    release.set()
    text = tokenizer.decode(rollout.episodes[0].completion_ids)
    assert "<|im_start|>tool\nerror: tool hang timed out after 0.1 s<|im_end|>" in text
    assert rollout.episodes[0].num_timeouts == 1 and rollout.episodes[0].num_failures == 1


def test_replay_feeds_recorded_results_back_and_detects_divergence(model, tokenizer):
    counter = {"n": 0}

    def multiply(a: int) -> int:  # noqa: F811 - nondeterministic on purpose: depends on how often it ran
        """Counter.

        Args:
            a: x
        """
        counter["n"] += 1
        return a * counter["n"]

    engine = ScriptedFirstTurn(HFRolloutEngine(model, tokenizer), tokenizer)
    prompts = _prompts(tokenizer, ["What is 3 times 2?"])
    keys = sampling_keys(0, "t", 0, positions=range(1))
    recorded = _run(engine, tokenizer, prompts, {"multiply": multiply}, keys, max_iterations=1)
    records = [json.loads(json.dumps(episode_record(e))) for e in recorded.episodes]  # through JSON, as on disk
    live = _run(engine, tokenizer, prompts, {"multiply": multiply}, keys, max_iterations=1)
    assert live.rows.completion_ids.tolist() != recorded.rows.completion_ids.tolist()
    replay = ToolReplay(records)
    replayed = _run(engine, tokenizer, prompts, {"multiply": multiply}, keys, max_iterations=1, replay=replay)
    assert torch.equal(replayed.rows.completion_ids, recorded.rows.completion_ids)
    assert torch.equal(replayed.rows.loss_mask, recorded.rows.loss_mask)
    assert replay.replayed == 2 and counter["n"] == 4  # the replay ran no tool
    records[0]["turns"][0]["calls"][0]["arguments"] = {"a": 4}
    with pytest.raises(DataError, match="diverged"):
        _run(engine, tokenizer, prompts, {"multiply": multiply}, keys, max_iterations=1, replay=ToolReplay(records))


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    import copy

    changing = copy.deepcopy(tokenizer)
    changing.chat_template = "{{ messages | length }}" + tokenizer.chat_template  # every new message changes the start
    with pytest.raises(ConfigError, match="prefix-preserving"):
        tool_suffix_ids(changing, [{"role": "tool", "name": "multiply", "content": "6"}])


@pytest.mark.parametrize("share_prompt", [True, False])
def test_multiturn_rows_get_the_same_logps_on_every_forward_path(model, tokenizer, share_prompt):
    engine = ScriptedFirstTurn(HFRolloutEngine(model, tokenizer), tokenizer)
    prompts = _prompts(tokenizer, ["What is 3 times 2?", "Multiply 3 by 2, then say why."])
    rows = _run(engine, tokenizer, prompts, {"multiply": multiply}, sampling_keys(0, "t", 0, positions=range(2)),
                max_iterations=1).rows
    with torch.no_grad():
        got, _ = completion_token_logps(model, rows, chunk_size=7, share_prompt=share_prompt)
        # plain reference: each row alone, without padding, full logits
        for row in range(rows.num_rows):
            prompt = rows.prompt_ids[row][rows.prompt_mask[row].bool()]
            completion = rows.completion_ids[row][rows.completion_mask[row].bool()]
            ids = torch.cat([prompt, completion]).unsqueeze(0)
            logits = model(input_ids=ids).logits.double()
            expected = torch.log_softmax(logits[0, len(prompt) - 1:-1], -1).gather(-1, completion[:, None]).squeeze(-1)
            torch.testing.assert_close(got[row, :len(completion)].double(), expected, rtol=1e-4, atol=1e-4)
