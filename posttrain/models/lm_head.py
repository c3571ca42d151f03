"""Reach the final hidden states and the output head of a causal LM, through any wrapper.

Trainers never ask a model for full-vocabulary logits during training. They call the model as
usual (so DDP, FSDP, DeepSpeed, accelerate hooks and PEFT all see a normal forward), ask it for
its hidden states and for no logits at all, and then apply the output head themselves in chunks
(:mod:`posttrain.ops.logprobs`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from posttrain.ops.logprobs import HeadTransform


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model: strips DDP/DeepSpeed (``.module``), compile and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            break
    return model


@dataclass
class OutputHead:
    """The output projection ``W`` (V, d), its bias, and the transform the model applies to logits."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: HeadTransform


def output_head(model: nn.Module, temperature: float = 1.0) -> OutputHead | None:
    """The model's output head, or ``None`` when it is not a plain linear layer (e.g. LoRA on lm_head)."""
    base = unwrap_model(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:
        return None
    config = getattr(base, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    transform = HeadTransform(
        scale=float(scale) if isinstance(scale, (int, float)) else 1.0,
        softcap=float(softcap) if softcap else None,
        temperature=float(temperature),
    )
    return OutputHead(head.weight, head.bias, transform)


@lru_cache(maxsize=64)
def _accepts_logits_to_keep(forward) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def forward_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Final (post-norm) hidden states ``(B, L, d)`` from a normal forward that computes no logits.

    ``input_ids`` may be ``None`` when ``inputs_embeds`` is among ``model_kwargs``. The states of a
    PEFT prompt-learning model's virtual tokens are left out: position t is always input token t.
    """
    base = unwrap_model(model)
    kwargs = dict(model_kwargs)
    if _accepts_logits_to_keep(base.forward):
        # an empty index tensor selects no position, so the head multiplies nothing
        device = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).device
        kwargs["logits_to_keep"] = torch.zeros(0, dtype=torch.long, device=device)
    kwargs.setdefault("use_cache", False)
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        **kwargs,
    )
    hidden = outputs.hidden_states[-1]
    # PEFT prompt tuning and P-tuning prepend their virtual tokens' embeddings to every row: those
    # leading states belong to no input token, so they are dropped (prefix tuning adds none)
    length = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
    return hidden[:, hidden.shape[1] - length :] if hidden.shape[1] > length else hidden


@lru_cache(maxsize=64)
def cache_argument_name(forward) -> str:
    """The KV-cache keyword of a model's ``forward``: transformers 5 renamed ``past_key_values`` to ``cache``."""
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


# decoder-only models whose cached forward is known to equal the uncached one (tests/models/test_shared_prompt.py)
SHARED_PROMPT_ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


def can_share_prompt(model: nn.Module) -> bool:
    """Whether :func:`token_logps` may run a repeated prompt once and attend to its KV cache.

    Only for a plain or PEFT-wrapped model: DDP, FSDP and DeepSpeed wrappers expect one forward per
    backward. Gradient checkpointing turns the cache off in training mode, so it is excluded there.
    """
    from transformers import PreTrainedModel

    if not (isinstance(model, PreTrainedModel) or callable(getattr(model, "get_base_model", None))):
        return False
    if getattr(model, "_is_prompt_learning", False):  # PEFT prefix / prompt tuning adds virtual tokens
        return False
    base = unwrap_model(model)
    if type(base).__name__ not in SHARED_PROMPT_ARCHITECTURES:
        return False
    if any(kind != "full_attention" for kind in getattr(base.config, "layer_types", None) or ()):
        return False
    # transformers 5 renamed is_gradient_checkpointing (deprecated, warns) to is_activation_checkpointing
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return not (base.training and getattr(base, name, False))


def shared_prompt_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_width: int,
) -> torch.Tensor | None:
    """Final hidden states at positions ``prompt_width - 1 .. L - 2``, running each distinct prompt once.

    The first ``prompt_width`` columns of every row are its (left-padded) prompt. Rows whose prompt
    columns are identical share one forward over them; each row's remaining columns then run
    against a copy of that prompt's KV cache. Gradients flow into the shared prompt forward, so the
    result and its gradient equal a forward over the full rows. ``None`` when no prompt repeats.
    """
    from transformers import DynamicCache

    width = prompt_width
    key = torch.cat([input_ids[:, :width], attention_mask[:, :width], position_ids[:, :width]], dim=1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    if unique.shape[0] == input_ids.shape[0]:
        return None
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    first_row = torch.zeros(unique.shape[0], dtype=torch.long, device=input_ids.device)
    first_row.scatter_reduce_(0, inverse, rows, reduce="amin", include_self=False)
    # one embedding lookup for both forwards: a second one would build a second dense (V, d)
    # gradient for the embedding matrix, which costs more than the shared prompt saves on big vocabularies
    embeds = model.get_input_embeddings()(input_ids)
    base = unwrap_model(model)
    cache = DynamicCache(config=base.config)
    cache_kwarg = {cache_argument_name(base.forward): cache, "use_cache": True}
    prompt_mask, prompt_positions = unique[:, width : 2 * width], unique[:, 2 * width :]
    prompt_hidden = forward_hidden_states(model, None, prompt_mask, prompt_positions,
                                          inputs_embeds=embeds[first_row, :width], **cache_kwarg)
    cache.batch_select_indices(inverse)
    rest_hidden = forward_hidden_states(model, None, attention_mask, position_ids[:, width:],
                                        inputs_embeds=embeds[:, width:], **cache_kwarg)
    return torch.cat([prompt_hidden[inverse, -1:], rest_hidden[:, :-1]], dim=1)


def target_positions(
    completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean (B, L-1): position t predicts token t+1 and carries a loss.

    ``completion_mask[b, t]`` marks token t as a target. In a packed row, the first token of each
    sequence (``position_ids == 0``) is never a target: nothing before it belongs to its sequence.
    """
    mask = completion_mask[:, 1:].bool()
    if position_ids is not None:
        mask = mask & (position_ids[:, 1:] != 0)
    return mask


@dataclass
class TokenLogps:
    """Per-token log-probabilities of a batch, aligned with ``input_ids[:, 1:]``.

    ``logps``, ``entropy``: (B, L-1) float32, zero where ``mask`` is False; ``argmax_match``: (B, L-1)
    bool; ``mask``: (B, L-1) bool, the positions that were computed.
    """

    logps: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor
    argmax_match: torch.Tensor

    def sequence_sums(self) -> torch.Tensor:
        """(B,) summed log-probs of each row's target tokens."""
        return self.logps.sum(-1)

    def token_counts(self) -> torch.Tensor:
        """(B,) number of target tokens of each row (float)."""
        return self.mask.sum(-1).float()


def token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    prompt_width: int | None = None,
) -> TokenLogps:
    """Log-probabilities of the target tokens of ``input_ids`` under ``model``, never holding full logits.

    ``completion_mask[b, t] = 1`` marks token t as a target (it is scored from position t-1).
    Differentiable when autograd is on; run it under ``torch.no_grad()`` for reference models.

    ``prompt_width``: the first ``prompt_width`` columns are a left-padded prompt holding no target.
    When several rows share a prompt (a group of completions), the prompt runs through the model once
    (:func:`shared_prompt_hidden_states`); the values and gradients are those of the full forward.
    """
    mask = target_positions(completion_mask, position_ids)
    selected = None
    if prompt_width and 0 < prompt_width < input_ids.shape[1] and can_share_prompt(model):
        start = prompt_width - 1
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = position_ids if position_ids is not None else torch.arange(
            input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if not mask[:, :start].any() and bool(attention_mask[:, start].all()):
            tail = shared_prompt_hidden_states(model, input_ids, attention_mask, positions, prompt_width)
            if tail is not None:
                selected = tail[mask[:, start:]]
    if selected is None:
        hidden = forward_hidden_states(model, input_ids, attention_mask, position_ids)
        selected = hidden[:, :-1][mask]
    targets = input_ids[:, 1:][mask]
    head = output_head(model, temperature=temperature)
    if head is not None:
        from posttrain.ops.logprobs import chunked_token_logps

        flat_logps, flat_entropy, flat_match = chunked_token_logps(
            selected, head.weight, targets, bias=head.bias, head=head.transform,
            chunk_size=chunk_size, with_entropy=with_entropy,
        )
    else:  # a wrapped head (e.g. LoRA on lm_head): call the module itself
        from posttrain.ops.logprobs import entropy_from_logits, naive_token_logps

        logits = unwrap_model(model).get_output_embeddings()(selected).float() / temperature
        flat_logps = naive_token_logps(logits, targets)
        with torch.no_grad():
            flat_entropy = entropy_from_logits(logits) if with_entropy else torch.full_like(flat_logps, float("nan"))
            flat_match = logits.argmax(-1) == targets
    shape = mask.shape
    logps = flat_logps.new_zeros(shape).masked_scatter(mask, flat_logps)
    entropy = flat_entropy.new_zeros(shape).masked_scatter(mask, flat_entropy.detach())
    match = torch.zeros(shape, dtype=torch.bool, device=mask.device).masked_scatter(mask, flat_match)
    return TokenLogps(logps=logps, mask=mask, entropy=entropy, argmax_match=match)
