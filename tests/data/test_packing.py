from __future__ import annotations

import random

import numpy as np
import pytest
from datasets import Dataset

from posttrain.data.load import mark_source, source_name
from posttrain.data.packing import best_fit_decreasing, pack_dataset
from posttrain.errors import ConfigError, DataError


def make_rows(lengths, seed=0):
    rng = random.Random(seed)
    rows = []
    for index, length in enumerate(lengths):
        ids = [100 * (index + 1) + t for t in range(length)]  # every token is unique and names its row
        mask = [rng.randint(0, 1) for _ in range(length)]
        rows.append({"input_ids": ids, "completion_mask": mask, "extra": "dropped"})
    return rows


def split_sequences(row):
    """The sequences of a packed row, cut where position_ids restart."""
    sequences, start = [], 0
    positions = row["position_ids"]
    for t in range(1, len(positions) + 1):
        if t == len(positions) or positions[t] == 0:
            sequences.append((row["input_ids"][start:t], row["completion_mask"][start:t]))
            start = t
    return sequences


def test_best_fit_decreasing_by_hand():
    # capacity 8, sizes 5 4 3 3 2 1 (already sorted):
    # 5 -> new bin A (3 free); 4 -> new bin B (4 free); 3 -> A (tightest fit, 0 free);
    # 3 -> B (1 free); 2 -> new bin C (6 free); 1 -> B (0 free)
    assert best_fit_decreasing(np.array([5, 4, 3, 3, 2, 1]), 8) == [[0, 2], [1, 3, 5], [4]]
    # the order of the input does not matter, only the sizes
    assert best_fit_decreasing(np.array([1, 3, 5, 2, 4, 3]), 8) == [[2, 1], [4, 5, 0], [3]]


def test_bfd_packs_whole_sequences():
    lengths = [7, 3, 9, 1, 5, 5, 2, 8, 4, 6]
    rows = make_rows(lengths)
    packed = pack_dataset(mark_source(Dataset.from_list(rows), "sft.jsonl"), 10)
    assert packed.column_names == ["input_ids", "completion_mask", "position_ids", "seq_lengths"]
    assert source_name(packed) == "sft.jsonl"
    assert len(packed) == 5  # 50 tokens in bins of 10: best-fit decreasing fills every bin
    seen = []
    for row in packed:
        assert len(row["input_ids"]) <= 10
        assert len(row["input_ids"]) == len(row["completion_mask"]) == len(row["position_ids"]) == sum(row["seq_lengths"])
        pieces = split_sequences(row)
        assert [len(ids) for ids, _ in pieces] == row["seq_lengths"]
        for ids, mask in pieces:
            assert row["position_ids"][row["input_ids"].index(ids[0]) :][: len(ids)] == list(range(len(ids)))
            seen.append((ids, mask))
    expected = sorted((r["input_ids"], r["completion_mask"]) for r in rows)
    assert sorted(seen) == expected  # every token kept, each sequence whole, masks travel with tokens


def test_bfd_truncates_long_sequences_first():
    rows = make_rows([12, 3, 4])
    packed = pack_dataset(Dataset.from_list(rows), 8)
    sequences = sorted(ids for row in packed for ids, _ in split_sequences(row))
    assert sequences == sorted([rows[0]["input_ids"][:8], rows[1]["input_ids"], rows[2]["input_ids"]])
    assert max(len(r) for r in packed["input_ids"]) == 8


def test_bfd_split_cuts_long_sequences_into_pieces_and_loses_no_token():
    rows = make_rows([19, 3, 8, 4])
    packed = pack_dataset(Dataset.from_list(rows), 8, strategy="bfd_split")
    pieces = sorted(piece for row in packed for piece in split_sequences(row))
    long_ids, long_mask = rows[0]["input_ids"], rows[0]["completion_mask"]
    expected = [(long_ids[a:a + 8], long_mask[a:a + 8]) for a in (0, 8, 16)]
    expected += [(r["input_ids"], r["completion_mask"]) for r in rows[1:]]
    assert pieces == sorted(expected)  # 19 = 8 + 8 + 3, each piece its own sequence from position 0
    assert max(len(r) for r in packed["input_ids"]) == 8 and sum(map(len, packed["input_ids"])) == 34


def test_rows_without_completion_mask_train_on_everything():
    packed = pack_dataset(Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]}), 8)
    assert packed[0]["completion_mask"] == [1] * 5 and packed[0]["position_ids"] == [0, 1, 2, 0, 1]


def test_wrapped_concatenates_and_cuts():
    lengths = [7, 3, 9, 1]
    rows = make_rows(lengths)
    packed = pack_dataset(Dataset.from_list(rows), 8, strategy="wrapped")
    stream = [t for r in rows for t in r["input_ids"]]
    assert [t for r in packed["input_ids"] for t in r] == stream
    assert [t for r in packed["completion_mask"] for t in r] == [m for r in rows for m in r["completion_mask"]]
    assert [len(r) for r in packed["input_ids"]] == [8, 8, 4]
    # row 0: seq0 (7) + 1 of seq1; row 1: 2 more of seq1 + 6 of seq2; row 2: 3 of seq2 + seq3
    assert packed["seq_lengths"] == [[7, 1], [2, 6], [3, 1]]
    assert packed[1]["position_ids"] == [0, 1, 0, 1, 2, 3, 4, 5]


def test_packing_errors():
    with pytest.raises(ConfigError, match="unknown packing strategy"):
        pack_dataset(Dataset.from_dict({"input_ids": [[1]]}), 8, strategy="greedy")
    with pytest.raises(DataError, match="needs tokenized rows"):
        pack_dataset(Dataset.from_dict({"text": ["a"]}), 8)
    bad = Dataset.from_dict({"input_ids": [[1, 2], [3, 4]], "completion_mask": [[1, 1], [1]]})
    with pytest.raises(DataError) as caught:
        pack_dataset(bad, 8)
    assert (caught.value.row, caught.value.column) == (1, "completion_mask")


def test_many_rows_fill_bins():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 3000)
    data = Dataset.from_dict({"input_ids": [list(range(n)) for n in lengths]})
    packed = pack_dataset(data, 256)
    row_lengths = np.array([sum(s) for s in packed["seq_lengths"]])
    assert row_lengths.max() <= 256 and row_lengths.sum() == lengths.sum()
    assert sorted(s for r in packed["seq_lengths"] for s in r) == sorted(lengths.tolist())
    assert row_lengths.sum() / (256 * len(packed)) > 0.98
