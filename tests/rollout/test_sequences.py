"""The rollout layout every online trainer hands from stage to stage."""

from __future__ import annotations

import torch

from posttrain.rollout import RolloutBatch, RolloutSequences


def _batch() -> RolloutBatch:
    prompt_mask = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 0, 1], [0, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    return RolloutBatch(
        prompt_ids=torch.arange(12).view(4, 3) * prompt_mask, prompt_mask=prompt_mask,
        completion_ids=(torch.arange(16).view(4, 4) + 20) * completion_mask, completion_mask=completion_mask,
        is_truncated=torch.tensor([False, False, True, False]), prompt_index=torch.tensor([0, 0, 1, 1]), group_size=2,
    )


def test_forward_inputs_are_prompt_then_completion_with_real_token_positions():
    rows = RolloutSequences.from_batch(_batch())
    assert rows.input_ids.shape == (4, 7) and rows.prompt_width == 3
    assert rows.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 0, 0]
    assert rows.position_ids[0].tolist() == [0, 0, 0, 1, 2, 2, 2]  # the left padding does not count
    assert rows.target_mask[1].tolist() == [0, 0, 0, 1, 0, 0, 0]


def test_loss_mask_starts_as_the_completion_mask_and_is_its_own_tensor():
    rows = RolloutSequences.from_batch(_batch())
    assert torch.equal(rows.loss_mask, rows.completion_mask)
    rows.loss_mask[rows.is_truncated] = 0  # what GRPO's mask_truncated_completions does
    assert rows.loss_mask[2].sum() == 0 and rows.completion_mask[2].sum() == 3


def test_select_trim_and_split_keep_rows_aligned():
    rows = RolloutSequences.from_batch(_batch()).replace(advantages=torch.tensor([1.0, 2.0, 3.0, 4.0]),
                                                         old_logps=-torch.arange(16.0).view(4, 4))
    part = rows.select(torch.tensor([3, 1])).trim_padding()
    assert part.prompt_ids.shape == (2, 2) and part.completion_ids.shape == (2, 1)  # all-padding columns dropped
    assert part.advantages.tolist() == [4.0, 2.0]
    assert part.old_logps.tolist() == [[-12.0], [-4.0]]
    parts = rows.split(2, torch.Generator().manual_seed(0))
    assert sorted(a for p in parts for a in p.advantages.tolist()) == [1.0, 2.0, 3.0, 4.0]


def test_a_checkpointed_micro_batch_round_trips_through_a_dict():
    rows = RolloutSequences.from_batch(_batch()).replace(num_items_in_batch=torch.tensor(7.0))
    saved = rows.as_dict()
    assert "old_logps" not in saved  # fields not filled in are not written
    restored = RolloutSequences.from_dict(saved)
    assert all(torch.equal(value, getattr(restored, name)) for name, value in saved.items())
