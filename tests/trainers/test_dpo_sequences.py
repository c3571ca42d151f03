"""DPO's one-sequence-at-a-time forward (``per_sequence_forward``): the padded batch's losses and
gradients, without the (2B, 1, L, L) attention mask transformers builds for a padded batch."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from posttrain import ConfigError, DPOConfig, DPOTrainer
from posttrain.trainers.dpo_sequences import PER_SEQUENCE_MIN_LENGTH, wants_per_sequence_forward


def _uneven_preferences(n=4):
    """Arithmetic pairs whose chosen (even rows) or rejected (odd rows) answer is several tokens longer."""
    from posttrain.tasks import get_task

    def lengthen(row, index):
        side = "chosen" if index % 2 == 0 else "rejected"
        row[side] = [{"role": "assistant", "content": row[side][0]["content"] + " is the answer I give to this"}]
        return row

    return get_task("arithmetic").as_preference(n, conversational=True).map(lengthen, with_indices=True)


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    values.update(overrides)
    return DPOConfig(**values)


@pytest.mark.parametrize("extra", [{}, {"rpo_alpha": 1.0, "use_weighting": True}, {"ld_alpha": 0.5}])
def test_per_sequence_forward_gives_the_padded_loss_and_gradients(perturb, tiny_model_dir, tmp_path, extra):
    # float64, and a reference that differs from the policy: the log-ratios are far from 0
    policy = perturb(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    results = {}
    for per_sequence in (False, True):
        trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                             args=_config(tmp_path, per_sequence_forward=per_sequence, **extra),
                             train_dataset=_uneven_preferences(4))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        lengths = batch["attention_mask"].sum(-1)
        assert len(set(lengths.tolist())) > 1, "the rows must need padding"
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        results[per_sequence] = (loss.detach(), grads)
    (padded_loss, padded_grads), (loss, grads) = results[False], results[True]
    assert abs(padded_loss.item() - 0.6931) > 1e-3  # the reference differs from the policy
    torch.testing.assert_close(loss, padded_loss, rtol=1e-10, atol=1e-12)
    assert grads.keys() == padded_grads.keys() and grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_per_sequence_forward_builds_no_attention_mask(tiny_model_dir, tmp_path, monkeypatch):
    built = []  # the shape of each attention mask transformers' SDPA path builds (None: is_causal instead)
    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def recording_mask(*args, **kwargs):
        mask = sdpa_mask(*args, **kwargs)
        built.append(None if mask is None else tuple(mask.shape))
        return mask

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._local_mapping, "sdpa", recording_mask)
    for per_sequence in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert model.config._attn_implementation == "sdpa"
        trainer = DPOTrainer(model=model, ref_model=tiny_model_dir,
                             args=_config(tmp_path, per_sequence_forward=per_sequence),
                             train_dataset=_uneven_preferences(4))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        built.clear()  # the trainer's own construction ran the model on an unpadded row
        trainer.compute_loss(trainer.model, batch).backward()
        rows, width = batch["input_ids"].shape
        if per_sequence:
            # policy and reference, one call per sequence each, and never a mask
            assert built == [None] * (2 * rows)
        else:
            assert built and all(shape == (rows, 1, width, width) for shape in built)


def test_per_sequence_forward_turns_on_for_long_rows_unless_set():
    def batch(length):
        return {"input_ids": torch.zeros(2, length, dtype=torch.long)}

    assert not wants_per_sequence_forward(None, batch(PER_SEQUENCE_MIN_LENGTH - 1))
    assert wants_per_sequence_forward(None, batch(PER_SEQUENCE_MIN_LENGTH))
    assert not wants_per_sequence_forward(False, batch(PER_SEQUENCE_MIN_LENGTH))
    assert wants_per_sequence_forward(True, batch(8))
    padding_free = {"input_ids": torch.zeros(1, 4096, dtype=torch.long), "sequence_mask": torch.ones(2, 2048)}
    assert not wants_per_sequence_forward(True, padding_free)


def test_per_sequence_forward_with_padding_free_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="per_sequence_forward"):
        _config(tmp_path, per_sequence_forward=True, padding_free=True)
