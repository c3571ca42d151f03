"""Scalar value heads on causal-LM backbones, and per-token values from any such model.

Two kinds of model carry a scalar head on top of a transformer backbone:

* :class:`AutoModelForCausalLMWithValueHead`: a causal LM (its language-model head kept, so it can
  still generate) plus a ``v_head`` mapping each hidden state to one number. ``save_pretrained``
  writes an ordinary causal-LM directory (it loads with ``AutoModelForCausalLM`` and
  ``transformers.pipeline``) plus ``value_head.safetensors``; ``from_pretrained`` restores both.
* a sequence-classification model with ``num_labels=1`` (a reward model): a backbone plus a
  ``score`` layer. PPO initialises its value model from the reward model this way (InstructGPT,
  arXiv:2203.02155), reading the score head at every position instead of at the last token only.

:func:`token_values` returns the head's output at every position for either kind, through DDP and
PEFT wrappers, without computing vocabulary logits.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from posttrain.errors import ConfigError
from posttrain.models.lm_head import unwrap_model
from posttrain.models.packed_attention import padded_batch_as_packed_row
from posttrain.models.reward_scoring import sequence_scores
from posttrain.models.wrappers import is_peft_model

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_PREFIX = "v_head."


class ValueHead(nn.Module):
    """Dropout then a linear map from the hidden size to one scalar: ``(B, L, d) -> (B, L)``."""

    def __init__(self, hidden_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # `summary` is the name older value-head checkpoints use for this layer
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.to(self.summary.weight.dtype)
        return self.summary(self.dropout(hidden_states)).squeeze(-1)


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body of a ``*ForCausalLM`` / ``*ForSequenceClassification`` (its ``base_model_prefix``)."""
    base = unwrap_model(model)
    prefix = getattr(base, "base_model_prefix", "")
    body = getattr(base, prefix, None) if prefix else None
    if body is None:
        raise ConfigError(
            f"cannot find the transformer backbone of {type(base).__name__}",
            field="model", fix="use a transformers *ForCausalLM or *ForSequenceClassification model",
        )
    return body


def backbone_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final (normalised) hidden states ``(B, L, d)`` of the backbone alone: no head, no logits."""
    outputs = backbone_of(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return outputs.last_hidden_state


def scalar_head_of(model: nn.Module) -> nn.Module:
    """The scalar head: ``v_head`` of a value-head LM, ``score`` of a one-label classifier."""
    if isinstance(model, AutoModelForCausalLMWithValueHead):
        return model.v_head
    base = unwrap_model(model)
    if isinstance(base, AutoModelForCausalLMWithValueHead):
        return base.v_head
    head = getattr(base, "score", None)
    if head is None:
        raise ConfigError(
            f"{type(base).__name__} has no scalar head (`score` or `v_head`)",
            field="value_model",
            fix="pass an AutoModelForSequenceClassification with num_labels=1 or an AutoModelForCausalLMWithValueHead",
        )
    return head


def token_values(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar head applied at every position: ``(B, L)`` float32.

    ``values[b, t]`` is read from the hidden state after token t, i.e. it scores the prefix
    ``input_ids[b, :t+1]``. For a reward model, the value at a sequence's last token is its reward.
    """
    inner = model.pretrained_model if isinstance(model, AutoModelForCausalLMWithValueHead) else model
    packed = padded_batch_as_packed_row(inner, input_ids, attention_mask, position_ids)
    if packed is not None:  # a long padded batch as one packed row: each row attends to itself, no (B, 1, L, L) mask
        packed_ids, packed_positions, attended = packed
        packed_values = _scalar_head_values(model, backbone_hidden_states(inner, packed_ids, None, packed_positions))
        # padding has no hidden state here: its value is 0 (callers read values at attended positions only)
        return packed_values.new_zeros(attended.shape).masked_scatter(attended, packed_values[0])
    return _scalar_head_values(model, backbone_hidden_states(inner, input_ids, attention_mask, position_ids))


def _scalar_head_values(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``(B, L, d) -> (B, L)`` float32 through the model's scalar head."""
    values = scalar_head_of(model)(hidden)
    if values.dim() == 3:  # a `score` layer of shape (d, 1)
        values = values.squeeze(-1)
    return values.float()


# A reward model's score of a whole sequence is read by one rule, kept in models/reward_scoring.py
# (the last attended token, whatever the padding); this earlier name points at it.
last_token_scores = sequence_scores


class AutoModelForCausalLMWithValueHead(nn.Module):
    """A causal LM plus a scalar value head.

    ``forward`` returns the tuple ``(lm_logits, loss, values)`` (``values``: (B, L), one per
    position; add ``return_past_key_values=True`` for a fourth element, the cache). ``generate``
    is the causal LM's own. Attribute ``pretrained_model`` is the wrapped LM, ``v_head`` the head.

    Example::

        model = AutoModelForCausalLMWithValueHead.from_pretrained("path/to/sft")
        logits, _, values = model(input_ids, attention_mask=mask)
        model.save_pretrained("out")   # `out` also loads as a plain causal LM
    """

    supports_gradient_checkpointing = True

    def __init__(self, pretrained_model: PreTrainedModel, *, summary_dropout_prob: float = 0.0) -> None:
        super().__init__()
        self.pretrained_model = pretrained_model
        hidden_size = _hidden_size(unwrap_model(pretrained_model).config)
        self.v_head = ValueHead(hidden_size, dropout=summary_dropout_prob)
        first = next(pretrained_model.parameters(), None)
        if first is not None:
            self.v_head.to(device=first.device, dtype=torch.float32)

    # -- construction and saving

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | PreTrainedModel,
        *model_args: Any,
        peft_config=None,
        summary_dropout_prob: float = 0.0,
        **kwargs: Any,
    ) -> "AutoModelForCausalLMWithValueHead":
        """Load (or wrap) a causal LM; restore its value head when the directory holds one.

        The head is read from ``value_head.safetensors`` or from ``v_head.*`` tensors saved inside
        the model's own weight files; otherwise it is freshly initialised. ``peft_config`` wraps the
        LM with an adapter (the head stays fully trainable).
        """
        if isinstance(pretrained_model_name_or_path, str):
            lm = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            head_state = _read_value_head_state(pretrained_model_name_or_path)
        else:
            lm, head_state = pretrained_model_name_or_path, None
        if peft_config is not None:
            from peft import get_peft_model

            lm = get_peft_model(lm, peft_config)
        model = cls(lm, summary_dropout_prob=summary_dropout_prob)
        if head_state is not None:
            model.v_head.load_state_dict(head_state)
        return model

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write the causal LM as usual (a plain LM directory) and the head to ``value_head.safetensors``."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        kwargs.pop("state_dict", None)  # the Trainer passes the wrapper's state; the LM saves its own
        self.pretrained_model.save_pretrained(save_directory, **kwargs)
        head = {k: v.detach().cpu().contiguous() for k, v in self.v_head.state_dict().items()}
        save_file(head, os.path.join(save_directory, VALUE_HEAD_FILE))

    # -- the forward pass

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        return_past_key_values: bool = False,
        **kwargs: Any,
    ) -> tuple:
        kwargs["output_hidden_states"] = True
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        outputs = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        values = self.v_head(outputs.hidden_states[-1]).float()
        logits = outputs.logits
        if logits is not None and logits.dtype != torch.float32:
            logits = logits.float()
        loss = getattr(outputs, "loss", None)
        if return_past_key_values:
            return logits, loss, values, outputs.past_key_values
        return logits, loss, values

    def generate(self, *args: Any, **kwargs: Any):
        return self.pretrained_model.generate(*args, **kwargs)

    # -- delegation, so the wrapper behaves like the LM where it matters

    @property
    def config(self):
        return self.pretrained_model.config

    @property
    def generation_config(self):
        return self.pretrained_model.generation_config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def is_peft_model(self) -> bool:
        return is_peft_model(self.pretrained_model)

    def get_output_embeddings(self):
        return self.pretrained_model.get_output_embeddings()

    def set_attn_implementation(self, attn_implementation: str) -> None:
        unwrap_model(self.pretrained_model).set_attn_implementation(attn_implementation)

    def get_input_embeddings(self):
        return self.pretrained_model.get_input_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.pretrained_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.pretrained_model.gradient_checkpointing_disable()


def _hidden_size(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(
        f"cannot tell the hidden size of {type(config).__name__}", field="model",
        fix="use a model whose config has `hidden_size`",
    )


def _read_value_head_state(path: str) -> dict[str, torch.Tensor] | None:
    """The value head's tensors from a local model directory, if it holds them (else ``None``)."""
    if not os.path.isdir(path):
        return None
    from safetensors.torch import load_file

    own_file = os.path.join(path, VALUE_HEAD_FILE)
    if os.path.isfile(own_file):
        return load_file(own_file)
    # older checkpoints stored the head inside the model's weight files under `v_head.`
    index = os.path.join(path, "model.safetensors.index.json")
    files: list[str] = []
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map", {})
        files = sorted({f for k, f in weight_map.items() if k.startswith(VALUE_HEAD_PREFIX)})
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        from safetensors import safe_open

        with safe_open(os.path.join(path, name), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(VALUE_HEAD_PREFIX):
                    state[key[len(VALUE_HEAD_PREFIX):]] = handle.get_tensor(key)
    if not state and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        weights = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        state = {k[len(VALUE_HEAD_PREFIX):]: v for k, v in weights.items() if k.startswith(VALUE_HEAD_PREFIX)}
    return state or None


class PolicyAndValueModel(nn.Module):
    """A policy and a value model held as one module, so one optimizer and one DDP wrapper cover both.

    ``forward`` returns ``(logps, entropy, values)``: the policy's per-token log-probs and entropy
    ``(B, L-1)`` (aligned with ``input_ids[:, 1:]``, computed in chunks, zero off ``target_mask``)
    and the value model's per-position values ``(B, L)``.
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    @property
    def config(self):
        return unwrap_model(self.policy).config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        target_mask: torch.Tensor,
        *,
        temperature: float = 1.0,
        chunk_size: int = 1024,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from posttrain.models.lm_head import token_logps

        out = token_logps(self.policy, input_ids, target_mask, attention_mask, position_ids,
                          temperature=temperature, chunk_size=chunk_size, with_entropy=True)
        values = token_values(self.value_model, input_ids, attention_mask, position_ids)
        return out.logps, out.entropy, values
