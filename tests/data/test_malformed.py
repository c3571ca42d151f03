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
