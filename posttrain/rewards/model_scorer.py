"""A sequence-classification reward model used as a reward function."""

from __future__ import annotations

import os
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.models.modes import evaluation_mode
from posttrain.models.packed_attention import use_packed_attention
from posttrain.models.reward_scoring import require_reward_model, sequence_scores
from posttrain.rewards.text import completion_text


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _tokenizer_saved_with(model: Any):
    """The tokenizer saved beside a loaded model (its ``name_or_path``: a directory or a cached hub id), or None."""
    from transformers import AutoTokenizer

    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source:
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None


class RewardModelScorer:
    """Scores prompt + completion with a reward model (``num_labels=1``); follows the reward-function protocol.

    Args:
        model_or_path: a loaded ``AutoModelForSequenceClassification`` or the directory (or hub id) of one.
        tokenizer: its tokenizer; default: loaded from where the model was loaded from (its path or hub id).
        batch_size: rows per forward pass.
        max_length: longest input in tokens; longer inputs keep their *last* ``max_length`` tokens,
            so the completion, which the score is read at, is never cut.
        device: where to run; default: the model's device, or for a path CUDA when available, else CPU.
        name: the name used in metrics and errors (default ``"reward_model"``).

    Rows are laid out as ``RewardTrainer`` lays out a preference pair's side, so that the score is
    read where training put it: conversational rows (prompt = list of messages) through the chat
    template, with nothing after the assistant turn's end token; plain rows as BOS (when the
    tokenizer adds one) + prompt + completion + EOS. The score is read as ``RewardTrainer`` and PPO
    read it (:func:`posttrain.models.reward_scoring.sequence_scores`): at each row's last token,
    that EOS, whether or not the tokenizer pads with EOS.
    """

    def __init__(
        self,
        model_or_path: Any,
        tokenizer=None,
        *,
        batch_size: int = 16,
        max_length: int = 1024,
        device: str | torch.device | None = None,
        name: str = "reward_model",
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model_or_path, (str, os.PathLike)):
            path = os.fspath(model_or_path)
            require_reward_model(path, field="reward_model")
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
            try:
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
            except (OSError, ValueError) as error:
                raise ConfigError(
                    f"cannot load a sequence-classification reward model from {path!r}: {error}",
                    field="reward_model",
                    fix="pass a directory saved with save_pretrained from a reward model (num_labels=1)",
                ) from error
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            model = model_or_path
            require_reward_model(model, field="reward_model")
            if tokenizer is None:
                tokenizer = _tokenizer_saved_with(model)
        if tokenizer is None:
            raise ConfigError(
                "a reward model given as an object needs its tokenizer, and none is saved where it was loaded from",
                field="reward_model", fix="pass its tokenizer (reward_processing_classes=[...] in GRPO and RLOO)",
            )
        num_labels = getattr(model.config, "num_labels", 1)
        if num_labels != 1:
            raise ConfigError(
                f"a reward model must output one score per sequence, this one has num_labels={num_labels}",
                field="reward_model",
                fix="train it with RewardTrainer or load it with num_labels=1",
            )
        if device is not None:
            model = model.to(device)
        use_packed_attention(model)  # rows 2,048 tokens or longer are scored padding-free
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = name
        self._specials = None

        # any id fills the padding: the score is read at each row's last attended token
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad_id if pad_id is not None else 0

    def _encode(self, prompt: Any, completion: Any) -> list[int]:
        from posttrain.data.tokenize import SpecialTokens, encode_prompt_completion

        if self._specials is None:
            self._specials = SpecialTokens.of(self.tokenizer)
        if _is_conversation(prompt):
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ConfigError(
                    "conversational rows need a chat template and the reward model's tokenizer has none",
                    field="reward_model",
                    fix="set tokenizer.chat_template, or give plain-text prompts",
                )
            if not _is_conversation(completion):
                completion = completion_text(completion)
        else:
            prompt = prompt if isinstance(prompt, str) else completion_text(prompt)
            completion = completion_text(completion)
        # the layout RewardTrainer trained on: the score is read at the same token (the EOS)
        ids = encode_prompt_completion(self.tokenizer, prompt, completion, self._specials)
        return ids[-self.max_length :]

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        encoded = [self._encode(p, c) for p, c in zip(prompts, completions)]
        # score rows of similar length together: less padding
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        device = next(self.model.parameters()).device
        with evaluation_mode(self.model), torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                width = max(len(encoded[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, index in enumerate(chunk):
                    ids = encoded[index]
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, : len(ids)] = 1
                # the rule RewardTrainer trains with: the score at each row's last attended token
                chunk_scores = sequence_scores(self.model, input_ids.to(device), attention_mask.to(device))
                for row, index in enumerate(chunk):
                    scores[index] = float(chunk_scores[row])
        return scores
