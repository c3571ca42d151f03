"""Every bad input of the corpus (tests/data/malformed/corpus.py) raises a PosttrainError subclass
from the Python API, with the address (file, row, column or field) in its message, before anything
is written to output_dir. The command-line side is tests/cli/test_malformed_cli.py."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from posttrain import errors
from posttrain.data.load import load_data


def _load_corpus():
    name = "malformed_corpus"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent / "malformed" / "corpus.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


corpus = _load_corpus()

TRAINERS = {  # method -> (module, config class, trainer class)
    "sft": ("posttrain.trainers.sft", "SFTConfig", "SFTTrainer"),
    "reward": ("posttrain.trainers.reward", "RewardConfig", "RewardTrainer"),
    "dpo": ("posttrain.trainers.dpo", "DPOConfig", "DPOTrainer"),
    "grpo": ("posttrain.trainers.grpo", "GRPOConfig", "GRPOTrainer"),
    "rloo": ("posttrain.trainers.rloo", "RLOOConfig", "RLOOTrainer"),
    "online-dpo": ("posttrain.trainers.online_dpo", "OnlineDPOConfig", "OnlineDPOTrainer"),
}


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    return corpus.build_model_variants(tiny_model_dir, str(tmp_path_factory.mktemp("models")))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


API_CASES = [case for case in corpus.CASES if case.api]


def test_corpus_is_large_and_every_method_is_covered():
    assert len(corpus.CASES) >= 60 and len(API_CASES) >= 60
    assert {case.method for case in corpus.CASES} == set(TRAINERS)
    assert len({case.id for case in corpus.CASES}) == len(corpus.CASES)


@pytest.mark.parametrize("case", API_CASES, ids=lambda case: case.id)
def test_bad_input_raises_typed_error_with_address(case, models, tmp_path, monkeypatch):
    if case.id == "push_to_hub_offline":
        from huggingface_hub import constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    module_name, config_name, trainer_name = TRAINERS[case.method]
    module = importlib.import_module(module_name)
    dataset_path = corpus.write_case_files(case, str(tmp_path / "case"))
    _, trainer_kwargs = corpus.method_extras(case.method)
    previous_run = tmp_path / "previous-run"
    previous_run.mkdir()
    (previous_run / "model.safetensors").write_bytes(b"weights of a finished run")
    before = _files(previous_run)

    with pytest.raises(errors.PosttrainError) as caught:
        config = getattr(module, config_name)(
            output_dir=str(previous_run), **{**corpus.config_defaults(case.method), **case.config}
        )
        dataset = load_data(dataset_path)
        getattr(module, trainer_name)(model=models[case.model], args=config, train_dataset=dataset, **trainer_kwargs)

    error = caught.value
    message = str(error)
    assert isinstance(error, getattr(errors, case.error)), f"{type(error).__name__}: {message}"
    assert "\n" not in message and "Fix:" in message, message
    for address in case.expect:
        assert address in message, message
    assert _files(previous_run) == before


# ----------------------------------------------------------------------------- focused checks


def test_mixed_type_column_keeps_the_values_the_file_holds(tmp_path):
    # datasets keeps a string that parses as JSON unquoted in a mixed column: " 1" would come back as 1
    answers = [" 1", 2, "true", "null", {"a": 1}, "x y"]
    messages = [[{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}],
                [{"role": "user", "content": "hi", "name": "me"}, {"role": "assistant", "content": "false"}]]
    path = tmp_path / "mixed.jsonl"
    corpus._write(str(path), [{"answer": a, "messages": messages[i % 2]} for i, a in enumerate(answers)])
    dataset = load_data(str(path))
    assert dataset["answer"] == answers
    contents = [[m["content"] for m in row] for row in dataset["messages"]]
    assert contents == [[m["content"] for m in messages[i % 2]] for i in range(len(answers))]


CONVERSATIONS = [
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}],
    [{"role": "system", "content": "s"}],
    [{"role": "tool", "content": "t"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


@pytest.mark.parametrize("turn_order", ["user_first", "has_user"])
def test_turn_order_arrow_scan_agrees_with_row_check(turn_order):
    import pyarrow as pa

    from posttrain.data import formats

    for start in range(len(CONVERSATIONS)):
        rows = CONVERSATIONS[start:] + CONVERSATIONS[:start]
        array = pa.array(rows)
        expected = next((i for i, row in enumerate(rows)
                         if formats._messages_problem(row, need_assistant=False, turn_order=turn_order)), None)
        assert formats._scan_messages(array, need_assistant=False, turn_order=turn_order) == expected


def test_conversations_with_the_user_first_pass():
    from datasets import Dataset

    from posttrain.data.formats import DataFormat, validate_dataset

    good = [CONVERSATIONS[i] for i in (0, 1, 4, 6)]
    info = validate_dataset(Dataset.from_list([{"messages": m} for m in good]), [DataFormat.CONVERSATIONAL])
    assert info.format is DataFormat.CONVERSATIONAL
    # with an explicit prompt, the completion starts with the assistant: the user's turn is in the prompt
    split = [{"prompt": m[:-1], "completion": m[-1:]} for m in good]
    assert validate_dataset(Dataset.from_list(split), [DataFormat.PROMPT_COMPLETION]).conversational


def test_resume_keyword_and_existing_checkpoint_are_accepted(tmp_path):
    from posttrain.trainers.sft import SFTConfig

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    for value in ("true", str(checkpoint)):
        assert SFTConfig(output_dir=str(tmp_path / "o"), resume_from_checkpoint=value).resume_from_checkpoint == value


def test_hub_unreachable_when_online_is_one_config_error(tiny_model_dir, tmp_path, monkeypatch):
    import transformers.trainer
    from datasets import Dataset
    from huggingface_hub import constants

    from posttrain.trainers.sft import SFTConfig, SFTTrainer

    class NoNetwork:
        def create_repo(self, *args, **kwargs):
            raise ConnectionError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: NoNetwork())
    config = SFTConfig(output_dir=str(tmp_path / "o"), push_to_hub=True, hub_model_id="me/model", max_steps=1)
    with pytest.raises(errors.ConfigError, match="--push_to_hub: could not create the hub repository"):
        SFTTrainer(model=tiny_model_dir, args=config, train_dataset=Dataset.from_list(corpus.CHAT))
