"""Both engines implement every member of the ``RolloutEngine`` protocol that trainers call, with its parameters."""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing

import pytest
import torch

from posttrain.rollout import HFRolloutEngine, RolloutEngine, SamplingParams, ServerRolloutEngine, VLLMRolloutEngine

ENGINES = [HFRolloutEngine, VLLMRolloutEngine, ServerRolloutEngine]


def protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(RolloutEngine).items()
            if inspect.isfunction(member) and not name.startswith("_")}


def protocol_attributes() -> set[str]:
    return set(typing.get_type_hints(RolloutEngine))


def attributes_set_in_init(cls) -> set[str]:
    """Names ``__init__`` assigns as ``self.<name> = ...``, and the class's properties."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    assigned = {target.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"}
    return assigned | {name for name, value in vars(cls).items() if isinstance(value, property)}


def test_the_protocol_lists_what_trainers_call():
    assert {"generate", "load_weights"} <= set(protocol_methods())
    generate = protocol_methods()["generate"].parameters
    assert {"prompt_ids", "num_generations", "sampling", "prompt_mask", "prompt_keys"} <= set(generate)
    assert {"pad_token_id", "eos_token_ids", "device"} <= protocol_attributes()


@pytest.mark.parametrize("engine_class", ENGINES, ids=lambda cls: cls.__name__)
def test_engine_implements_every_protocol_method_with_its_parameters(engine_class):
    for name, expected in protocol_methods().items():
        method = getattr(engine_class, name, None)
        assert callable(method), f"{engine_class.__name__} has no {name}()"
        actual = inspect.signature(method).parameters
        for parameter in expected.parameters.values():
            assert parameter.name in actual, f"{engine_class.__name__}.{name} lacks the parameter {parameter.name}"
            got = actual[parameter.name]
            assert got.kind == parameter.kind, f"{engine_class.__name__}.{name}({parameter.name}): {got.kind} != {parameter.kind}"
            assert got.default == parameter.default, f"{engine_class.__name__}.{name}({parameter.name}) default {got.default!r}"
        extra = [p for n, p in actual.items() if n not in expected.parameters and p.default is inspect.Parameter.empty
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not extra, f"{engine_class.__name__}.{name} requires parameters the protocol lacks: {extra}"


@pytest.mark.parametrize("engine_class", ENGINES, ids=lambda cls: cls.__name__)
def test_engine_sets_every_protocol_attribute(engine_class):
    missing = protocol_attributes() - attributes_set_in_init(engine_class)
    assert not missing, f"{engine_class.__name__} never sets {sorted(missing)}"


def test_hf_engine_is_a_rollout_engine_and_loads_other_weights(tokenizer, make_qwen2, prompts):
    policy, other = make_qwen2(tokenizer, seed=0), make_qwen2(tokenizer, seed=1)
    engine = HFRolloutEngine(policy, tokenizer)
    assert isinstance(engine, RolloutEngine)
    greedy = SamplingParams(max_completion_length=6, do_sample=False)
    own = engine.generate(prompts, sampling=greedy).completion_ids
    engine.load_weights(policy)  # the module it samples with: nothing changes
    assert torch.equal(engine.generate(prompts, sampling=greedy).completion_ids, own)
    engine.load_weights(other)
    expected = HFRolloutEngine(make_qwen2(tokenizer, seed=1), tokenizer).generate(prompts, sampling=greedy)
    assert torch.equal(engine.generate(prompts, sampling=greedy).completion_ids, expected.completion_ids)
    assert not torch.equal(expected.completion_ids, own)  # the two models differ, so the copy is what changed it
