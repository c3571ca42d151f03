"""Every bad input of the corpus (tests/data/malformed/corpus.py) is one line on stderr and exit 2
from the command line, and a finished run in the targeted output_dir stays as it was."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.cli.main import main


def _load_corpus():
    name = "malformed_corpus"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "data" / "malformed" / "corpus.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


corpus = _load_corpus()


def _snapshot(folder: str) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            stat = os.stat(path)
            found[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    return corpus.build_model_variants(tiny_model_dir, str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """The output_dir of a good SFT run."""
    folder = tmp_path_factory.mktemp("finished")
    data = str(folder / "train.jsonl")
    corpus._write(data, corpus.CHAT)
    output_dir = str(folder / "run")
    code = main(["sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir", output_dir,
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no"])
    assert code == 0 and os.path.isfile(os.path.join(output_dir, "model.safetensors"))
    return output_dir


@pytest.mark.parametrize("case", corpus.CASES, ids=lambda case: case.id)
def test_bad_input_is_one_line_and_exit_2(case, models, finished_run, tmp_path, capsys, monkeypatch):
    if case.id == "push_to_hub_offline":
        from huggingface_hub import constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    output_dir = finished_run
    files_before = _snapshot(output_dir)
    folder = str(tmp_path / "case")
    dataset = corpus.write_case_files(case, folder)
    method_flags, _ = corpus.method_extras(case.method)
    flags, for_yaml = corpus.cli_values({**corpus.config_defaults(case.method), **case.config})
    if for_yaml:
        config_file = os.path.join(folder, "values.yaml")
        corpus._write(config_file, yaml.safe_dump(for_yaml))
        flags += ["--config", config_file]
    argv = [case.method, "--model_name_or_path", models[case.model], "--dataset_name", dataset,
            "--output_dir", output_dir, *method_flags, *flags, *(a.format(dir=folder) for a in case.cli_args)]

    code = main(argv)

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"posttrain {case.method}: error:")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    message = errors[0]
    assert "Fix:" in message, message
    for address in case.expect:
        assert address in message, message
    assert _snapshot(output_dir) == files_before
