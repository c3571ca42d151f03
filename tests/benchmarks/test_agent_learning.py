from __future__ import annotations

import pytest

import posttrain
from benchmarks import agent_learning
from posttrain.tasks.tool_use import ToolUseTask


class _TrainerWithoutTools:
    def __init__(self, model, reward_funcs, args=None, train_dataset=None, processing_class=None):
        raise AssertionError("a trainer that does not take tools= must not be built")


def test_posttrain_side_is_skipped_with_a_message_until_tools_are_accepted(monkeypatch):
    monkeypatch.setattr(posttrain, "GRPOTrainer", _TrainerWithoutTools, raising=False)
    args = agent_learning._parse(["--steps", "1"])
    result = agent_learning.run_grpo("posttrain", args, ToolUseTask(), "unused", [], "unused")
    assert "tools=" in result["skipped"] and "nothing was run" in result["skipped"]


def test_posttrain_grpo_trainer_is_seen_to_accept_tools():
    # its __init__ is (*args, **kwargs); tools= is named on a base class
    assert agent_learning.accepts_tools(posttrain.GRPOTrainer)
    assert not agent_learning.accepts_tools(_TrainerWithoutTools)


def test_unknown_implementation_is_refused():
    with pytest.raises(SystemExit, match="unknown"):
        agent_learning.main(["--impls", "posttrain,verl", "--workdir", "run"])
