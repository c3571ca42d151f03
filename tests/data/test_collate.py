from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.data.collate import (
    PaddingCollator,
    PaddingFreeCollator,
    PreferenceCollator,
    PromptCollator,
    UnpairedPreferenceCollator,
)
from posttrain.data.packing import pack_dataset
from posttrain.errors import ConfigError, DataError

PAD = 0


def test_padding_collator_by_hand():
    rows = [
        {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
        {"input_ids": [8], "completion_mask": [1]},
    ]
    batch = PaddingCollator(PAD)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_padding_collator_multiple_of_and_missing_mask():
    batch = PaddingCollator(PAD, pad_to_multiple_of=4)([{"input_ids": [5, 6, 7, 8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, PAD, PAD, PAD]]
    assert batch["completion_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]


def test_padding_collator_with_packed_rows_sends_no_attention_mask():
    rows = [
        {"input_ids": [5, 6, 7, 8], "completion_mask": [1, 1, 1, 1], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [9], "completion_mask": [1], "position_ids": [0]},
    ]
    batch = PaddingCollator(PAD)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]  # padding is a sequence of its own
    assert batch["completion_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_padding_free_collator_by_hand():
    rows = [
        {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
        {"input_ids": [8, 9], "completion_mask": [1, 1]},
        {"input_ids": [1, 2, 3, 4], "completion_mask": [1, 1, 0, 1], "position_ids": [0, 1, 0, 1]},
    ]
    batch = PaddingFreeCollator()(rows)
    assert set(batch) == {"input_ids", "position_ids", "completion_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1, 0, 1]]


def test_preference_collator_by_hand():
    rows = [
        {"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5, 6], "margin": 1.5,
         "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
        {"prompt_input_ids": [7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10], "margin": 0.0,
         "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0},
    ]
    batch = PreferenceCollator(PAD)(rows)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, PAD, PAD],
        [7, 8, 9, PAD, PAD],
        [1, 2, 4, 5, 6],
        [7, 10, PAD, PAD, PAD],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert batch["margin"].tolist() == [1.5, 0.0] and batch["margin"].dtype == torch.float32
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -3.0]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -4.0]


def test_unpaired_collator_by_hand():
    rows = [
        {"prompt_input_ids": [1, 2], "completion_input_ids": [3], "label": True},
        {"prompt_input_ids": [4], "completion_input_ids": [5, 6, 7], "label": False},
    ]
    batch = UnpairedPreferenceCollator(PAD)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD], [4, 5, 6, 7]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]
    assert batch["label"].tolist() == [True, False]


def test_prompt_collator_left_pads_and_passes_columns_through():
    rows = [
        {"prompt_input_ids": [1, 2, 3], "prompt": "a b c", "answer": "4"},
        {"prompt_input_ids": [4], "prompt": "d", "answer": "5"},
    ]
    batch = PromptCollator(PAD)(rows)
    assert batch["prompt_input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["prompt"] == ["a b c", "d"] and batch["answer"] == ["4", "5"]


def test_collators_reject_untokenized_rows():
    with pytest.raises(DataError, match="needs tokenized rows"):
        PaddingCollator(PAD)([{"text": "hi"}])
    with pytest.raises(ConfigError, match="no pad token"):
        PaddingCollator(None)


# ----------------------------------------------------------------------------- padded == packed on a model


def tiny_qwen2(attn_implementation: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64,
    )
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def sequence_logps(model, batch) -> list[torch.Tensor]:
    """log p(token t | tokens < t) for every token but the first of each sequence, per sequence.

    Sequences are read off the batch: rows split where position_ids restart (or by the attention
    mask in a padded batch).
    """
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).logits.double()
    logps = logits.log_softmax(-1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    out = []
    for row in range(batch["input_ids"].shape[0]):
        if "position_ids" in batch:
            positions = batch["position_ids"][row].tolist()
        else:
            positions = list(range(int(batch["attention_mask"][row].sum())))
        starts = [t for t, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts[:-1], starts[1:]):
            if "attention_mask" in batch and batch["attention_mask"][row, start] == 0:
                continue
            if "completion_mask" in batch and batch["completion_mask"][row, start:end].sum() == 0:
                continue  # a padding run
            out.append(logps[row, start : end - 1])
    return out


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_free_and_packed_match_padded(attn_implementation):
    model = tiny_qwen2(attn_implementation)
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3, 7, 6]
    rows = [{"input_ids": torch.randint(1, 64, (n,), generator=generator).tolist(), "completion_mask": [1] * n} for n in lengths]

    padded = sequence_logps(model, PaddingCollator(PAD)(rows))
    padding_free = sequence_logps(model, PaddingFreeCollator()(rows))
    assert len(padded) == len(padding_free) == len(rows)
    for reference, got in zip(padded, padding_free):
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)

    packed_rows = list(pack_dataset(Dataset.from_list(rows), 12))
    assert len(packed_rows) < len(rows)
    by_first_token = {tuple(r["input_ids"][:2]): i for i, r in enumerate(rows)}
    for collator in (PaddingFreeCollator(), PaddingCollator(PAD)):
        batch = collator(packed_rows)
        got = sequence_logps(model, batch)
        ids = batch["input_ids"]
        positions = batch["position_ids"]
        firsts = [tuple(ids[r, t : t + 2].tolist()) for r in range(ids.shape[0]) for t in range(ids.shape[1])
                  if positions[r, t] == 0 and tuple(ids[r, t : t + 2].tolist()) in by_first_token]
        assert len(firsts) == len(rows)
        for first, logps in zip(firsts, got):
            torch.testing.assert_close(logps, padded[by_first_token[first]], atol=1e-5, rtol=0)
