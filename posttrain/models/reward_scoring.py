"""Where a reward model's score is read, and the check that a model directory is a reward model.

One rule, used by every place that scores a sequence with a reward model (``RewardTrainer`` while
it trains and evaluates, PPO's rollouts, :class:`~posttrain.rewards.RewardModelScorer` for GRPO,
RLOO and online DPO): **the score is the scalar head at the row's last attended token**, the last
position whose ``attention_mask`` is 1. Training rows end with the completion's EOS, so that token
is the EOS; a completion cut off before EOS is read at its last token, as a pair truncated for
training is.

Why not the model's own pooling: transformers' ``*ForSequenceClassification`` reads the rightmost
token that differs from ``config.pad_token_id``. When the tokenizer pads with its EOS token (Llama 3,
Mistral, GPT-2 style tokenizers), that skips the EOS ending each row and reads the token before
it, so the position would depend on the tokenizer, not on the sequence. The attention mask says
where each row ends whatever the pad id and whichever side the padding is on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from posttrain.errors import ConfigError
from posttrain.models.lm_head import unwrap_model
from posttrain.models.packed_attention import padded_batch_as_packed_row


def last_attended_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L) -> (B,)`` long: the last position of each row whose ``attention_mask`` is 1.

    Works for left padding, right padding or both. A row with no attended token gives 0.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * (attention_mask != 0).long()).argmax(-1)


def gather_sequence_scores(token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's score: ``token_scores[b, last_attended_index(attention_mask)[b]]``.

    Args:
        token_scores: ``(B, L)`` the scalar head at every position (``(B, L, 1)`` is accepted too).
        attention_mask: ``(B, L)`` 1 on real tokens, 0 on padding.

    Returns:
        ``(B,)`` in the dtype of ``token_scores``.
    """
    if token_scores.dim() == 3:
        token_scores = token_scores.squeeze(-1)
    last = last_attended_index(attention_mask).to(token_scores.device)
    return token_scores.gather(1, last[:, None]).squeeze(1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` position ids counting attended tokens only, so a left-padded row is scored as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def sequence_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B,)`` float32: the reward model's score of each row, read at its last attended token.

    Args:
        model: a sequence classifier with one label (possibly inside DDP, DeepSpeed or PEFT
            wrappers; it is called through them, so gradients flow and are synchronised as usual).
        input_ids, attention_mask: ``(B, L)``, padded on either side with any pad id.
        position_ids: ``(B, L)``; default: counted over attended tokens (:func:`positions_from_mask`).

    Decoder classifiers (a ``score`` layer applied at every position) are read at the last attended
    token, whatever their own pooling would pick; the per-position scores are taken from the
    ``score`` layer's output during the model's own forward pass. Classifiers without such a layer
    (encoders pooling a first token) keep their own pooled output.
    """
    head = getattr(unwrap_model(model), "score", None)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    captured: list[torch.Tensor] = []
    handle = packed = None
    if isinstance(head, nn.Module):
        inputs["position_ids"] = position_ids if position_ids is not None else positions_from_mask(attention_mask)
        inputs["use_cache"] = False
        packed = padded_batch_as_packed_row(model, input_ids, attention_mask, inputs["position_ids"])
        if packed is not None:  # a long padded batch as one packed row: each row attends to itself, no (B, 1, L, L) mask
            inputs.update(input_ids=packed[0], attention_mask=None, position_ids=packed[1])
        handle = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with _pad_id_for_pooling(unwrap_model(model), needed=handle is not None):
            outputs = model(**inputs)
    finally:
        if handle is not None:
            handle.remove()
    if captured:
        token_scores = captured[-1]  # (B, L, 1): the head at every position
        if packed is not None and tuple(token_scores.shape) == (*packed[0].shape, 1):
            rows_end = packed[2].sum(1).cumsum(0) - 1  # each row's last token in the packed row
            return token_scores[0, rows_end, 0].float()
        if tuple(token_scores.shape) != (*input_ids.shape, 1):
            raise ConfigError(
                f"the reward model's score layer gave shape {tuple(token_scores.shape)}, "
                f"not one score per token {tuple(input_ids.shape) + (1,)}",
                field="reward_model",
                fix="use an AutoModelForSequenceClassification with num_labels=1 (train one with `posttrain reward`)",
            )
        return gather_sequence_scores(token_scores, attention_mask).float()
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ConfigError(
            f"{type(unwrap_model(model)).__name__} gives outputs of shape {tuple(logits.shape)}, "
            "not one score per sequence",
            field="reward_model",
            fix="use an AutoModelForSequenceClassification with num_labels=1 (train one with `posttrain reward`)",
        )
    return logits[:, 0].float()


@contextmanager
def _pad_id_for_pooling(model: nn.Module, needed: bool) -> Iterator[None]:
    """Lend the config a pad id while the model pools, if it has none.

    transformers' classifiers refuse a batch of several rows when ``config.pad_token_id`` is unset,
    because their pooling searches for it; that pooled output is not used here (the score is read
    at the last attended token), so any id lets a padded batch through. The config is restored after.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not needed or config is None or text_config.pad_token_id is not None:
        yield
        return
    config.pad_token_id = text_config.pad_token_id = 0
    try:
        yield
    finally:
        config.pad_token_id = text_config.pad_token_id = None


# ----------------------------------------------------------------------------- loading


def _architectures(path: str) -> list[str] | None:
    """``architectures`` of a local model directory's ``config.json`` (``None`` when unknown)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return None
    try:
        with open(config_file, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return [str(a) for a in architectures] if isinstance(architectures, list) and architectures else None


def require_reward_model(model: str | os.PathLike | nn.Module, field: str) -> None:
    """Refuse a causal LM (a directory or a loaded model) given where a reward model belongs.

    ``AutoModelForSequenceClassification.from_pretrained`` loads a causal-LM checkpoint with a new,
    random score head and only a load report to say so; its scores would be noise. A directory is
    judged by the ``architectures`` of its ``config.json`` (none named, or a hub id: left to the
    loader); a loaded model by whether it carries a language-model head.
    """
    if isinstance(model, nn.Module):
        base = unwrap_model(model)
        get_head = getattr(base, "get_output_embeddings", None)
        if not (callable(get_head) and get_head() is not None):
            return
        what, where = type(base).__name__, "the model given"
    else:
        architectures = _architectures(os.fspath(model))
        if architectures is None or any(a.endswith("ForSequenceClassification") for a in architectures):
            return
        what, where = ", ".join(architectures), repr(os.fspath(model))
    raise ConfigError(
        f"{where} is a {what} (a causal language model), not a reward model: loading it as a sequence "
        "classifier would add a randomly initialised score head, so its scores would be noise",
        field=field,
        fix="train a reward model from it with `posttrain reward --model_name_or_path DIR ...`, "
            "or pass a directory saved from an AutoModelForSequenceClassification with num_labels=1",
    )


def append_after_eos(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    suffix_ids: list[int],
    eos_ids: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append ``suffix_ids`` after the last attended token of every row that ends with an EOS.

    A completion sampled until EOS stops where a rendered chat turn still goes on (ChatML writes a
    newline after ``<|im_end|>``); a reward model trained on rendered turns reads its score at that
    last token, so scored completions get the same ending. Truncated rows stay as they are.

    Args:
        input_ids, attention_mask, position_ids: ``(B, L)``; the rows are right-padded after their
            last attended token (left padding before it is fine).
        suffix_ids: the tokens to append (``S`` of them).
        eos_ids: the ids that end a completion.

    Returns:
        ``(B, L + S)`` input ids, attention mask and position ids (the suffix continues each row's positions).
    """
    if not suffix_ids:
        return input_ids, attention_mask, position_ids
    batch, width = input_ids.shape
    size = len(suffix_ids)
    last = last_attended_index(attention_mask)
    rows = torch.arange(batch, device=input_ids.device)
    ends_with_eos = torch.isin(input_ids[rows, last], torch.tensor(eos_ids, device=input_ids.device))
    ids = torch.cat([input_ids, input_ids.new_zeros(batch, size)], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_zeros(batch, size)], dim=1)
    positions = torch.cat([position_ids, position_ids.new_zeros(batch, size)], dim=1)
    suffix = torch.tensor(suffix_ids, dtype=input_ids.dtype, device=input_ids.device)
    offsets = torch.arange(1, size + 1, device=input_ids.device)
    for row in rows[ends_with_eos].tolist():
        columns = last[row] + offsets
        ids[row, columns] = suffix
        mask[row, columns] = 1
        positions[row, columns] = position_ids[row, last[row]] + offsets.to(position_ids.dtype)
    return ids, mask, positions
