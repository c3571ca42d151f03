from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest
import torch

from posttrain.errors import ConfigError, DataError, RewardFunctionError
from posttrain.rewards import RewardComputer, accuracy

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["c0", "c1", "c2"]
IDS = [[1, 2], [3], [4, 5, 6]]


def first(prompts, completions, **kwargs):
    return [1.0, None, 2.0]


def second(prompts, completions, **kwargs):
    return [0.5, None, None]


def third(completions, **kwargs):  # TRL-style functions often omit `prompts`
    return [-1.0, 4.0, None]


def test_weighted_total_skips_none_and_flags_rows_without_any_score(caplog):
    computer = RewardComputer([first, second, third], reward_weights=[2.0, 10.0, 1.0])
    none_row = RewardComputer([first, second], reward_weights=[1.0, 1.0])
    out = computer(PROMPTS, COMPLETIONS, IDS, columns={})
    # row 0: 2*1 + 10*0.5 + 1*(-1) = 6; row 1: only third -> 4; row 2: 2*2 = 4
    assert out.total.tolist() == [6.0, 4.0, 4.0]
    assert out.names == ["first", "second", "third"]
    expected = torch.tensor([[1.0, 0.5, -1.0], [math.nan, math.nan, 4.0], [2.0, math.nan, math.nan]])
    assert torch.equal(torch.isnan(out.per_function), torch.isnan(expected))
    assert torch.equal(torch.nan_to_num(out.per_function), torch.nan_to_num(expected))
    assert out.per_function.dtype == torch.float32 and out.all_none.tolist() == [False, False, False]

    with caplog.at_level("WARNING"):
        partial = none_row(PROMPTS, COMPLETIONS, IDS, columns={})
    assert partial.total.tolist() == [1.5, 0.0, 2.0]
    assert partial.all_none.tolist() == [False, True, False]
    assert none_row.num_all_none_rows == 1
    assert "1 of 3 completions got None" in caplog.text


def test_metrics_average_each_function_over_the_rows_it_scored():
    out = RewardComputer([first, third])(PROMPTS, COMPLETIONS, IDS, columns={})
    metrics = out.metrics()
    assert metrics["rewards/first/mean"] == pytest.approx(1.5)
    assert metrics["rewards/third/mean"] == pytest.approx(1.5)
    assert metrics["rewards/first/std"] == pytest.approx(0.5)
    assert metrics["reward"] == pytest.approx((0.0 + 4.0 + 2.0) / 3)
    assert metrics["frac_reward_all_none"] == 0.0


def test_functions_receive_ids_columns_state_and_conversational_rows():
    received = {}

    def spy(prompts, completions, completion_ids, trainer_state, answer, **kwargs):
        received.update(prompts=prompts, completions=completions, ids=completion_ids, state=trainer_state, answer=answer, rest=kwargs)
        return [0.0] * len(completions)

    prompts = [[{"role": "user", "content": "1+1?"}]] * 2
    completions = [[{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "3"}]]
    columns = {"answer": ["2", "2"], "level": [1, 2], "prompt": ["x", "y"], "completions": ["bad", "bad"]}
    out = RewardComputer([spy, accuracy])(prompts, completions, [[5], [6]], columns=columns, trainer_state="STATE")
    assert received["prompts"] == prompts and received["completions"] == completions
    assert received["ids"] == [[5], [6]] and received["state"] == "STATE" and received["answer"] == ["2", "2"]
    rest = dict(received["rest"])
    assert callable(rest.pop("log_extra")) and callable(rest.pop("log_metric"))
    assert rest == {"level": [1, 2]}  # 'prompt' is redundant and 'completions' reserved
    assert out.per_function[:, 1].tolist() == [1.0, 0.0]


def test_numpy_tensor_and_bool_returns_are_accepted():
    computer = RewardComputer(
        [
            lambda completions, **k: np.array([1.0, 2.0, 3.0]),
            lambda completions, **k: torch.tensor([1, 0, 1]),
            lambda completions, **k: [True, False, np.float32(0.5)],
        ]
    )
    out = computer(PROMPTS, COMPLETIONS, IDS, columns={})
    assert out.total.tolist() == [3.0, 2.0, 4.5]
    assert out.names == ["lambda", "lambda_1", "lambda_2"]


def test_a_raising_function_is_named_with_its_error():
    def exploding(prompts, completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RewardFunctionError) as info:
        RewardComputer([first, exploding])(PROMPTS, COMPLETIONS, IDS, columns={})
    message = str(info.value)
    assert "'exploding'" in message and "KeyError" in message and "answer" in message
    assert isinstance(info.value.__cause__, KeyError)


def test_wrong_length_and_wrong_type_are_named():
    def too_short(prompts, completions, **kwargs):
        return [1.0]

    def wordy(prompts, completions, **kwargs):
        return [1.0, "good", 0.0]

    def scalar(prompts, completions, **kwargs):
        return 1.0

    with pytest.raises(RewardFunctionError, match=r"'too_short' returned 1 values for 3 completions; expected a list of length 3"):
        RewardComputer([too_short])(PROMPTS, COMPLETIONS, IDS, columns={})
    with pytest.raises(RewardFunctionError, match=r"'wordy' returned a str at row 1 \('good'\)"):
        RewardComputer([wordy])(PROMPTS, COMPLETIONS, IDS, columns={})
    with pytest.raises(RewardFunctionError, match=r"'scalar' must return a list of 3"):
        RewardComputer([scalar])(PROMPTS, COMPLETIONS, IDS, columns={})
    with pytest.raises(RewardFunctionError, match=r"'my_name'"):
        RewardComputer([too_short], names=["my_name"])(PROMPTS, COMPLETIONS, IDS, columns={})


def test_configuration_errors():
    with pytest.raises(ConfigError) as info:
        RewardComputer([first, second], reward_weights=[1.0])
    assert info.value.field == "reward_weights" and "2 reward functions" in str(info.value)
    with pytest.raises(ConfigError, match="not a callable"):
        RewardComputer([first, 3])
    with pytest.raises(ConfigError, match="no reward functions"):
        RewardComputer([])
    with pytest.raises(ConfigError, match="names"):
        RewardComputer([first], names=["a", "b"])
    with pytest.raises(DataError, match="column 'answer'"):
        RewardComputer([first])(PROMPTS, COMPLETIONS, IDS, columns={"answer": ["1"]})


def test_string_specs_are_resolved():
    computer = RewardComputer(["accuracy", "length_penalty(target=1)"])
    assert computer.names == ["accuracy", "length_penalty"]
    out = computer(["q"], ["7"], [torch.tensor([1, 2, 3])], columns={"answer": ["7"]})  # tensor rows become lists
    assert out.per_function.tolist() == [[1.0, -2.0]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), np.float32("nan"), torch.tensor(float("inf"))])
def test_nan_and_inf_are_errors_naming_the_function_and_row(bad):
    """None means "does not apply"; NaN/inf used to become a silent 0 in the total (and the advantage)."""
    def unstable(prompts, completions, **kwargs):
        return [1.0, None, bad]

    with pytest.raises(RewardFunctionError, match=r"'unstable' returned -?(nan|inf) at row 2") as info:
        RewardComputer([first, unstable])(PROMPTS, COMPLETIONS, IDS, columns={})
    assert "None" in str(info.value)
    # None keeps its meaning: the row is left out of that function's share
    output = RewardComputer([first, second])(PROMPTS, COMPLETIONS, IDS, columns={})
    assert output.total.tolist() == [1.5, 0.0, 2.0]


def test_a_slow_function_is_named_once(caplog, monkeypatch):
    import posttrain.rewards.computer as computer_module

    clock = iter([0.0, 5.0, 10.0, 10.1, 20.0, 25.0, 30.0, 30.1])  # slow: 5 s per call; quick: 0.1 s

    monkeypatch.setattr(computer_module.time, "perf_counter", lambda: next(clock))

    def slow_judge(prompts, completions, **kwargs):
        return [1.0, 1.0, 1.0]

    def quick(prompts, completions, **kwargs):
        return [0.0, 0.0, 0.0]

    computer = RewardComputer([slow_judge, quick], slow_call_seconds=2.0)
    with caplog.at_level("WARNING"):
        computer(PROMPTS, COMPLETIONS, IDS, columns={})
        computer(PROMPTS, COMPLETIONS, IDS, columns={})
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(slow) == 1 and "'slow_judge'" in slow[0] and "quick" not in slow[0]


def test_a_reward_function_that_does_not_return_is_reported_while_it_runs(caplog):
    import threading

    seen_while_running = threading.Event()

    def hanging(prompts, completions, **kwargs):
        # stands for a function stuck on a network call: it returns only once the warning is out
        for _ in range(200):
            if any("has not returned" in r.getMessage() for r in caplog.records):
                seen_while_running.set()
                break
            time.sleep(0.01)
        return [0.0] * len(completions)

    async def hanging_async(prompts, completions, **kwargs):
        await asyncio.sleep(0.3)
        return [0.0] * len(completions)

    with caplog.at_level("WARNING"):
        RewardComputer([hanging], slow_call_seconds=0.05)(PROMPTS, COMPLETIONS, IDS, columns={})
        assert seen_while_running.is_set()
        caplog.clear()
        RewardComputer([hanging_async], slow_call_seconds=0.05)(PROMPTS, COMPLETIONS, IDS, columns={})
    waiting = [r.getMessage() for r in caplog.records if "has not returned" in r.getMessage()]
    assert len(waiting) == 1 and "'hanging_async'" in waiting[0]


# ----------------------------------------------------------------------------- log_extra, log_metric, async


def test_functions_log_extra_columns_and_metrics():
    def judged(completions, log_extra, log_metric, **kwargs):
        log_extra("verdict", [f"ok {c}" for c in completions])
        log_metric("judge/agreement", 0.5)
        log_metric("judge/agreement", torch.tensor(1.0))  # several calls of one batch are all kept
        return [1.0] * len(completions)

    def counted(completions, log_metric, **kwargs):
        log_metric("length/mean", sum(len(c) for c in completions) / len(completions))
        return [0.0] * len(completions)

    out = RewardComputer([judged, counted])(PROMPTS, COMPLETIONS, IDS, columns={})
    assert out.extra_columns == {"verdict": ["ok c0", "ok c1", "ok c2"]}
    assert out.logged_metrics == {"judge/agreement": [0.5, 1.0], "length/mean": [2.0]}
    assert out.metrics()["judge/agreement"] == pytest.approx(0.75)


@pytest.mark.parametrize("call, match", [
    (lambda log_extra, log_metric: log_extra("short", [1.0]), "one value per completion"),
    (lambda log_extra, log_metric: log_metric("m", "high"), "one number"),
    (lambda log_extra, log_metric: (log_extra("c", [1, 2, 3]), log_extra("c", [1, 2, 3])), "second time"),
])
def test_misused_loggers_name_the_function(call, match):
    def reporting(completions, log_extra, log_metric, **kwargs):
        call(log_extra, log_metric)
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=f"'reporting'.*{match}"):
        RewardComputer([reporting])(PROMPTS, COMPLETIONS, IDS, columns={})


def test_dataset_columns_named_like_the_loggers_do_not_replace_them():
    def reporting(completions, log_metric, **kwargs):
        log_metric("seen", 1.0)
        return [0.0] * len(completions)

    out = RewardComputer([reporting])(PROMPTS, COMPLETIONS, IDS, columns={"log_metric": ["x"] * 3})
    assert out.logged_metrics == {"seen": [1.0]}


def test_async_functions_are_awaited_concurrently_with_the_sync_ones():
    import asyncio

    events = {}

    async def waits_for(mine: str, other: str, value: float, completions):
        # each function needs the other one running at the same time: sequential awaiting times out
        events.setdefault(mine, asyncio.Event()).set()
        await asyncio.wait_for(events.setdefault(other, asyncio.Event()).wait(), timeout=5)
        return [value] * len(completions)

    async def left(completions, **kwargs):
        return await waits_for("left", "right", 1.0, completions)

    async def right(completions, log_metric, **kwargs):
        log_metric("from_async", 3.0)
        return await waits_for("right", "left", 2.0, completions)

    def plain(completions, **kwargs):
        return [10.0] * len(completions)

    computer = RewardComputer([left, plain, right])
    out = computer(PROMPTS, COMPLETIONS, IDS, columns={})
    assert out.per_function[0].tolist() == [1.0, 10.0, 2.0] and out.total.tolist() == [13.0] * 3
    assert out.logged_metrics == {"from_async": [3.0]}
    events.clear()
    assert computer(PROMPTS, COMPLETIONS, IDS, columns={}).total.tolist() == [13.0] * 3  # the loop is reused


def test_async_failures_and_bad_returns_are_named():
    async def broken(completions, **kwargs):
        raise KeyError("judge")

    async def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(RewardFunctionError, match="'broken' raised KeyError"):
        RewardComputer([broken])(PROMPTS, COMPLETIONS, IDS, columns={})
    with pytest.raises(RewardFunctionError, match="'short' returned 1 values for 3"):
        RewardComputer([short])(PROMPTS, COMPLETIONS, IDS, columns={})


def test_the_slow_call_watch_starts_one_thread_not_one_per_call_and_still_reports_a_later_hang(monkeypatch, caplog):
    import threading

    started = []
    original_start = threading.Thread.start

    def counting_start(thread):
        started.append(thread)
        original_start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    hang = threading.Event()

    def sometimes_hanging(prompts, completions, **kwargs):
        for _ in range(200 if hang.is_set() else 0):  # returns once the warning is out
            if any("has not returned" in r.getMessage() for r in caplog.records):
                break
            time.sleep(0.01)
        return [1.0] * len(completions)

    computer = RewardComputer([sometimes_hanging], slow_call_seconds=0.2)
    with caplog.at_level("WARNING"):
        for _ in range(5):
            computer(PROMPTS, COMPLETIONS, IDS, columns={})
        assert not [r for r in caplog.records if "has not returned" in r.getMessage()]
        hang.set()
        computer(PROMPTS, COMPLETIONS, IDS, columns={})
    assert len(started) == 1  # a thread per call cost up to 4 ms of each generation step on a busy CPU
    assert len([r for r in caplog.records if "has not returned" in r.getMessage()]) == 1
