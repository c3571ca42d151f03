from __future__ import annotations

import json

import datasets
import pytest
from datasets import Dataset, DatasetDict

from posttrain.data.load import describe_source, load_data, load_mixture, source_name
from posttrain.errors import ConfigError, DataError

ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]


def test_dataset_passes_through():
    data = Dataset.from_list(ROWS)
    assert load_data(data) is data
    assert describe_source(data, fallback="train dataset") == "train dataset"


def test_dataset_dict_takes_split_and_lists_available():
    splits = DatasetDict({"train": Dataset.from_list(ROWS[:4]), "test": Dataset.from_list(ROWS[4:])})
    assert load_data(splits, split="test")["prompt"] == ["p4", "p5"]
    with pytest.raises(DataError) as caught:
        load_data(splits, split="validation")
    assert "no 'validation' split" in str(caught.value) and "['test', 'train']" in str(caught.value)


def test_jsonl_file_records_its_path(write_jsonl):
    path = write_jsonl("data.jsonl", ROWS)
    data = load_data(path)
    assert data["prompt"] == [r["prompt"] for r in ROWS]
    assert source_name(data) == path
    # the marker survives the transformations trainers apply
    assert describe_source(data.map(lambda r: {"n": 1}).select([1, 0]).shuffle(seed=1)) == path


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=2))
    data = load_data(str(path))
    assert data["completion"] == [r["completion"] for r in ROWS]


def test_csv_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in ROWS))
    data = load_data(str(path))
    assert data.column_names == ["prompt", "completion"] and data["prompt"][5] == "p5"
    assert source_name(data) == str(path)


def test_parquet_file(tmp_path):
    path = str(tmp_path / "data.parquet")
    Dataset.from_list(ROWS).to_parquet(path)
    data = load_data(path)
    assert data["prompt"] == [r["prompt"] for r in ROWS] and source_name(data) == path


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(r) for r in ROWS[:3]]
    lines.insert(2, '{"prompt": "x", "completion": "y"')  # line 3: missing brace
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        load_data(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}, line 3: malformed JSON")


def test_non_object_json_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"line 2: each line must be a JSON object"):
        load_data(str(path))


def test_missing_local_path(tmp_path):
    with pytest.raises(DataError) as caught:
        load_data(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl: no such file or folder" in str(caught.value)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<x/>")
    with pytest.raises(DataError, match="unsupported file type '.xml'"):
        load_data(str(path))


def test_folder_with_split_files(tmp_path, write_jsonl):
    write_jsonl("d/train.jsonl", ROWS[:4])
    write_jsonl("d/test.jsonl", ROWS[4:])
    folder = str(tmp_path / "d")
    assert load_data(folder)["prompt"] == ["p0", "p1", "p2", "p3"]
    test = load_data(folder, split="test")
    assert test["prompt"] == ["p4", "p5"]
    assert source_name(test) == str(tmp_path / "d" / "test.jsonl")
    with pytest.raises(DataError) as caught:
        load_data(folder, split="validation")
    assert "['test', 'train']" in str(caught.value)


def test_folder_of_shards_is_concatenated(tmp_path, write_jsonl):
    write_jsonl("d/train-00000-of-00002.jsonl", ROWS[:3])
    write_jsonl("d/train-00001-of-00002.jsonl", ROWS[3:])
    data = load_data(str(tmp_path / "d"))
    assert data["prompt"] == [r["prompt"] for r in ROWS]
    assert source_name(data) == str(tmp_path / "d")


def test_folder_without_split_names_is_train(tmp_path, write_jsonl):
    write_jsonl("d/part_a.jsonl", ROWS[:2])
    assert len(load_data(str(tmp_path / "d"))) == 2
    with pytest.raises(DataError, match="no 'test' split"):
        load_data(str(tmp_path / "d"), split="test")


def test_save_to_disk_folders(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert len(load_data(str(tmp_path / "single"))) == 6
    DatasetDict({"train": Dataset.from_list(ROWS[:5]), "test": Dataset.from_list(ROWS[5:])}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert load_data(str(tmp_path / "dict"), split="test")["prompt"] == ["p5"]


def test_hub_failure_names_id_and_suggests_local_path(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/some-data' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as caught:
        load_data("someone/some-data")
    message = str(caught.value)
    assert "could not load dataset 'someone/some-data'" in message
    assert "local path" in message and "Couldn't reach" in message


def test_hub_id_is_passed_config_and_split(monkeypatch):
    calls = []

    def fake(name, config, split=None, data_files=None):
        calls.append((name, config, split))
        return Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = load_data("org/set", config_name="sub", split="test")
    assert calls == [("org/set", "sub", "test")] and source_name(data) == "org/set"


# ----------------------------------------------------------------------------- mixtures


def test_mixture_proportions_rows_and_determinism(write_jsonl):
    a = write_jsonl("a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl("b.jsonl", [{"text": f"b{i}"} for i in range(20)])
    entries = [{"path": a, "proportion": 0.5}, {"path": b, "rows": 4}]
    mixed = load_mixture(entries, seed=3)
    texts = mixed["text"]
    assert len(texts) == 9
    assert sum(t.startswith("a") for t in texts) == 5 and sum(t.startswith("b") for t in texts) == 4
    assert len(set(texts)) == 9  # drawn without replacement
    assert load_mixture(entries, seed=3)["text"] == texts
    assert load_mixture(entries, seed=4)["text"] != texts
    assert source_name(mixed) == f"mixture of {a}, {b}"


def test_mixture_via_load_data_list(write_jsonl):
    a = write_jsonl("a.jsonl", [{"text": "x"}] * 3)
    assert len(load_data([{"path": a}, {"path": a, "rows": 1}])) == 4


def test_mixture_incompatible_columns(write_jsonl):
    a = write_jsonl("a.jsonl", [{"prompt": "p", "completion": "c"}])
    b = write_jsonl("b.jsonl", [{"messages": [{"role": "user", "content": "u"}]}])
    with pytest.raises(DataError) as caught:
        load_mixture([{"path": a}, {"path": b}])
    message = str(caught.value)
    assert "different columns" in message and b in message and "['completion', 'prompt']" in message


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"path": "x", "proportion": 1.5}, "datasets[0].proportion"),
        ({"path": "x", "rows": 0}, "datasets[0].rows"),
        ({"path": "x", "weight": 1}, "datasets[0]"),
        ({"proportion": 0.5}, "datasets[0]"),
    ],
)
def test_mixture_bad_entries(entry, field, write_jsonl):
    if "path" in entry:
        entry = {**entry, "path": write_jsonl("x.jsonl", [{"text": "t"}])}
    with pytest.raises(ConfigError) as caught:
        load_mixture([entry])
    assert str(caught.value).startswith(f"--{field}:")
