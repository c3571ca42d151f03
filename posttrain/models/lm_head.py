"""Reach the final hidden states and the output head of a causal LM, through any wrapper.

Trainers never ask a model for full-vocabulary logits during training. They call the model as
usual (so DDP, FSDP, DeepSpeed, accelerate hooks and PEFT all see a normal forward), ask it for
its hidden states and for no logits at all, and then apply the output head themselves in chunks
(:mod:`posttrain.ops.logprobs`).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch
from torch import nn

from posttrain.models.packed_attention import padding_free_layout
from posttrain.ops.logprobs import (HeadTransform, _chunk_logits, chunked_token_logps, entropy_from_logits,
                                    fused_linear_nll, naive_token_logps)
from posttrain.ops.tied_embedding import tied_embedding_lookups

logger = logging.getLogger("posttrain")


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


def _number(config, name: str) -> float | None:
    value = getattr(config, name, None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def head_transform(model: nn.Module, temperature: float = 1.0) -> HeadTransform:
    """What the model's causal-LM forward does to ``lm_head(h)`` (transformers 5.25), from its config.

    Known transformations: a multiplier (Cohere ``logit_scale``, FalconH1 ``lm_head_multiplier``,
    HyperCLOVAX ``logits_scaling``), a divisor (the Granite family's ``logits_scaling``), and tanh
    soft-capping (Gemma 2/3/4, VaultGemma, NanoChat: ``final_logit_softcapping``; RecurrentGemma:
    ``logits_soft_cap``; xLSTM: ``output_logit_soft_cap``). Anything else is caught by
    :func:`check_output_heads`, which compares against the model's own logits.
    """
    config = getattr(unwrap_model(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = str(getattr(config, "model_type", "") or "")
    scale = 1.0
    for name in ("logit_scale", "lm_head_multiplier"):
        scale *= _number(config, name) or 1.0
    logits_scaling = _number(config, "logits_scaling")
    if logits_scaling:
        # the same field name is a divisor in Granite models and a multiplier in HyperCLOVAX;
        # any other owner is left to check_output_heads
        if model_type.startswith("granite"):
            scale /= logits_scaling
        elif model_type.startswith("hyperclovax"):
            scale *= logits_scaling
    softcap = None
    for name in ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"):
        softcap = softcap or _number(config, name)
    return HeadTransform(scale=scale, softcap=softcap or None, temperature=float(temperature),
                         float32_matmul=bool(getattr(unwrap_model(model), HEAD_FLOAT32_ATTRIBUTE, False)))


# set by a trainer asked for cast_lm_head_to_fp32: the chunked head multiplies in float32
HEAD_FLOAT32_ATTRIBUTE = "_posttrain_head_float32"


def compute_head_in_float32(model: nn.Module) -> bool:
    """Make every log-prob of ``model`` come from a float32 product ``h @ W.T`` (half-precision models round
    the logits to bf16/fp16 otherwise). False when the head is not one the chunked path computes (a LoRA
    on lm_head, or one that :func:`check_output_heads` switched to the model's own logits)."""
    base = unwrap_model(model)
    setattr(base, HEAD_FLOAT32_ATTRIBUTE, True)
    return output_head(model) is not None


def output_head(model: nn.Module, temperature: float = 1.0) -> OutputHead | None:
    """The model's output head for the chunked path, or ``None`` when the head must be called as a
    module: it is not a plain linear layer (e.g. LoRA on lm_head), or :func:`check_output_heads`
    found that the chunked head does not reproduce the model's logits (see :func:`uses_full_logits`)."""
    base = unwrap_model(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or uses_full_logits(base):
        return None
    return OutputHead(head.weight, head.bias, head_transform(base, temperature))


def runs_compiled(model: nn.Module) -> bool:
    """Whether ``model``, a wrapper around it or the model inside runs a ``torch.compile``d forward (a hook
    added for one call would make it recompile)."""
    for _ in range(8):
        if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
            return True
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        if not isinstance(inner, nn.Module) or inner is model:
            return False
        model = inner
    return False


def transform_logits(raw_logits: torch.Tensor, transform: HeadTransform) -> torch.Tensor:
    """Apply ``transform`` to ``lm_head(h)`` out of place, in float32: (..., V) -> (..., V)."""
    logits = raw_logits.float()
    if transform.scale != 1.0:
        logits = logits * transform.scale
    if transform.softcap is not None:
        logits = torch.tanh(logits / transform.softcap) * transform.softcap
    if transform.temperature != 1.0:
        logits = logits / transform.temperature
    return logits


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
    outputs = forward_without_logits(model, input_ids, attention_mask, position_ids, **model_kwargs)
    return final_hidden_states(outputs, input_ids if input_ids is not None else model_kwargs["inputs_embeds"])


def final_hidden_states(outputs, inputs: torch.Tensor) -> torch.Tensor:
    """``(B, L, d)``: the last hidden states of ``outputs``, one per input position of ``inputs`` ``(B, L[, d])``.

    PEFT prompt tuning and P-tuning prepend their virtual tokens' embeddings to every row: those
    leading states belong to no input token, so they are dropped (prefix tuning adds none).
    """
    hidden = outputs.hidden_states[-1]
    length = inputs.shape[1]
    return hidden[:, hidden.shape[1] - length :] if hidden.shape[1] > length else hidden


def forward_without_logits(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **model_kwargs,
):
    """The model's output object of :func:`forward_hidden_states`' forward (hidden states, an MoE router loss)."""
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
        # the last only: a flag would keep every layer's output alive until the head is done
        # (transformers selects by index; where it does not, a list reads as True)
        output_hidden_states=[-1],
        **kwargs,
    )
    return outputs


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
    from posttrain.models.offload import activation_offloading_enabled

    # offloaded layers recompute in the backward too, and run a cached forward as it is (keeping everything)
    return not (base.training and (getattr(base, name, False) or activation_offloading_enabled(base)))


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

    ``logps``, ``entropy``: (B, L-1) float32, zero where ``mask`` is False (``logps`` differentiable, and
    ``entropy`` when :func:`token_logps` was asked for ``entropy_grad``); ``argmax_match``: (B, L-1)
    bool; ``mask``: (B, L-1) bool, the positions that were computed. ``router_loss``: an MoE model's
    ``router_aux_loss_coef * aux_loss`` for this forward when its config sets ``output_router_logits``
    (a scalar tensor; 0.0 otherwise), for trainers that add it to their loss.
    """

    logps: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor
    argmax_match: torch.Tensor
    router_loss: torch.Tensor | float = 0.0

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
    entropy_grad: bool = False,
    prompt_width: int | None = None,
) -> TokenLogps:
    """Log-probabilities of the target tokens of ``input_ids`` under ``model``, never holding full logits.

    ``completion_mask[b, t] = 1`` marks token t as a target (it is scored from position t-1).
    Differentiable when autograd is on; run it under ``torch.no_grad()`` for reference models.

    ``prompt_width``: the first ``prompt_width`` columns are a left-padded prompt holding no target.
    When several rows share a prompt (a group of completions), the prompt runs through the model once
    (:func:`shared_prompt_hidden_states`); the values and gradients are those of the full forward.

    A model whose head :func:`check_output_heads` could not reproduce is asked for its full logits.

    ``entropy_grad``: the entropy is differentiable too (an entropy bonus); otherwise it is detached,
    and a head called as a module or the full-logits fallback computes it without a graph.
    """
    mask = target_positions(completion_mask, position_ids)
    targets = input_ids[:, 1:][mask]
    router_loss: torch.Tensor | float = 0.0
    if uses_full_logits(model):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        router_loss = router_loss_term(model, outputs)
        logits = outputs.logits[:, :-1][mask].float() / temperature
        flat_logps, flat_entropy, flat_match = _logps_from_logits(logits, targets, with_entropy, entropy_grad)
    else:
        with tied_embedding_lookups(None if runs_compiled(model) else unwrap_model(model)) as tied:
            selected, router_loss = _selected_hidden_states(model, input_ids, mask, attention_mask, position_ids,
                                                            prompt_width)
        head = output_head(model, temperature=temperature)
        if head is not None:
            flat_logps, flat_entropy, flat_match = chunked_token_logps(
                selected, head.weight, targets, bias=head.bias, head=head.transform,
                chunk_size=chunk_size, with_entropy=with_entropy, tied=tied,
            )
        else:  # a wrapped head (e.g. LoRA on lm_head): call the module itself
            logits = transform_logits(unwrap_model(model).get_output_embeddings()(selected),
                                      head_transform(model, temperature))
            flat_logps, flat_entropy, flat_match = _logps_from_logits(logits, targets, with_entropy, entropy_grad)
    shape = mask.shape
    logps = flat_logps.new_zeros(shape).masked_scatter(mask, flat_logps)
    flat_entropy = flat_entropy if entropy_grad else flat_entropy.detach()
    entropy = flat_entropy.new_zeros(shape).masked_scatter(mask, flat_entropy)
    match = torch.zeros(shape, dtype=torch.bool, device=mask.device).masked_scatter(mask, flat_match)
    return TokenLogps(logps=logps, mask=mask, entropy=entropy, argmax_match=match, router_loss=router_loss)


def _selected_hidden_states(model, input_ids, mask, attention_mask, position_ids, prompt_width):
    """(N, d) final hidden states at the positions of ``mask`` (B, L-1), and the forward's router loss term."""
    packed = padding_free_layout(model, input_ids, attention_mask, position_ids, mask)
    if packed is not None:  # long padded rows as one packed row: each attends to itself, no (B, 1, L, L) mask
        outputs = forward_without_logits(model, packed[0], None, packed[1])
        return outputs.hidden_states[-1][0, packed[2]], router_loss_term(model, outputs)
    if prompt_width and 0 < prompt_width < input_ids.shape[1] and can_share_prompt(model):
        start = prompt_width - 1
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = position_ids if position_ids is not None else torch.arange(
            input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if not mask[:, :start].any() and bool(attention_mask[:, start].all()):
            tail = shared_prompt_hidden_states(model, input_ids, attention_mask, positions, prompt_width)
            if tail is not None:
                return tail[mask[:, start:]], 0.0
    outputs = forward_without_logits(model, input_ids, attention_mask, position_ids)
    return outputs.hidden_states[-1][:, :-1][mask], router_loss_term(model, outputs)


def _logps_from_logits(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool, entropy_grad: bool = False):
    """(N,) log-probs, entropy (NaN unless ``with_entropy``; with a graph only for ``entropy_grad``, which keeps
    a second (N, V) tensor for backward) and argmax match from float32 logits (N, V)."""
    flat_logps = naive_token_logps(logits, targets)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        flat_entropy = entropy_from_logits(logits) if with_entropy else torch.full_like(flat_logps, float("nan"))
    flat_match = logits.detach().argmax(-1) == targets
    return flat_logps, flat_entropy, flat_match


def weighted_target_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    token_weights: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i token_weights[i] * -log p(target_i)`` over the positions of ``mask``, and the argmax matches.

    ``mask``: (B, L-1) bool from :func:`target_positions`; ``token_weights``: (N,) with N = ``mask.sum()``.
    Returns the scalar float32 loss (plus :func:`router_loss_term` for an MoE model that outputs its
    router logits) and an (N,) bool tensor. Goes through the fused chunked head
    (:func:`posttrain.ops.logprobs.fused_linear_nll`) when it applies, else through the head module
    or the model's full logits.
    """
    targets = input_ids[:, 1:][mask]
    if uses_full_logits(model):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        logits = outputs.logits[:, :-1][mask].float()
    else:
        packed = padding_free_layout(model, input_ids, attention_mask, position_ids, mask)  # long padded rows
        layout = (packed[0], None, packed[1]) if packed else (input_ids, attention_mask, position_ids)
        with tied_embedding_lookups(None if runs_compiled(model) else unwrap_model(model)) as tied:
            outputs = forward_without_logits(model, *layout)
        hidden = final_hidden_states(outputs, layout[0])
        selected = hidden[0, packed[2]] if packed else hidden[:, :-1][mask]
        head = output_head(model)
        if head is not None:
            loss, argmax_match, _ = fused_linear_nll(
                selected, head.weight, targets, token_weights,
                bias=head.bias, head=head.transform, chunk_size=chunk_size, tied=tied,
            )
            return loss + router_loss_term(model, outputs, token_weights), argmax_match
        logits = transform_logits(unwrap_model(model).get_output_embeddings()(selected), head_transform(model))
    loss = -(naive_token_logps(logits, targets) * token_weights.to(logits.dtype)).sum()
    return loss + router_loss_term(model, outputs, token_weights), logits.argmax(-1) == targets


def router_loss_term(model: nn.Module, outputs, token_weights: torch.Tensor | None = None) -> torch.Tensor | float:
    """``router_aux_loss_coef * aux_loss``: an MoE model's load-balancing loss (present when its config
    sets ``output_router_logits``); 0.0 for other models. With ``token_weights`` it is multiplied by
    their sum, this micro-batch's share of the target tokens, so that accumulated micro-batches
    average it as one batch would."""
    aux_loss = getattr(outputs, "aux_loss", None)
    if aux_loss is None:
        return 0.0
    coef = _number(unwrap_model(model).config, "router_aux_loss_coef") or 0.0
    share = token_weights.sum().to(torch.float32) if token_weights is not None else 1.0
    return coef * aux_loss.float() * share


def target_logits_chunks(
    model: nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
) -> Iterator[torch.Tensor]:
    """The model's float32 logits at the positions of ``mask`` (B, L-1), ``chunk_size`` rows (of V) at a time.

    Each chunk may be a view of a buffer that the next chunk overwrites: use it (or clone it) before
    asking for the next. The same head path as :func:`token_logps`, so it is what training sees.
    """
    if uses_full_logits(model):
        logits = model_logits(model, input_ids, attention_mask, position_ids)[:, :-1][mask]
        for chunk in logits.split(chunk_size):
            yield chunk.float()
        return
    hidden = forward_hidden_states(model, input_ids, attention_mask, position_ids)
    selected = hidden[:, :-1][mask]
    head = output_head(model)
    for chunk in selected.split(chunk_size):
        if head is not None:
            yield _chunk_logits(chunk, head.weight, head.bias, head.transform)[0]
        else:
            yield transform_logits(unwrap_model(model).get_output_embeddings()(chunk), head_transform(model))


# ----------------------------------------------------------------------------- the head check

# set on a model whose chunked head disagreed with its own logits: it then computes full logits
FULL_LOGITS_ATTRIBUTE = "_posttrain_uses_full_logits"
_CHECKED_ATTRIBUTE = "_posttrain_head_checked"
CHECK_LENGTH = 8


def uses_full_logits(model: nn.Module) -> bool:
    """True when :func:`check_output_heads` found that only the model's own forward gives its logits."""
    return bool(getattr(unwrap_model(model), FULL_LOGITS_ATTRIBUTE, False))


def model_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L, V) logits from the model's own forward: the fallback for heads the chunked path cannot reproduce."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits


def causal_lms(root: nn.Module) -> Iterator[nn.Module]:
    """The outermost transformers models inside ``root`` (itself included) that have an output head."""
    from transformers import PreTrainedModel

    inside: set[int] = set()
    for module in root.modules():
        if id(module) in inside or not isinstance(module, PreTrainedModel):
            continue
        get = getattr(module, "get_output_embeddings", None)
        if callable(get) and get() is not None:
            inside.update(id(m) for m in module.modules())
            yield module


def head_disagreement(model: nn.Module) -> tuple[float, float] | None:
    """Largest |log-softmax gap| between the head path of :func:`token_logps` and ``model(...).logits``
    on a short fixed input, and the tolerance it is held to; ``None`` when the weights are not here
    (meta tensors, ZeRO-3 shards). Runs in evaluation mode and draws no global random numbers."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    embeddings = model.get_input_embeddings()
    if weight is None or weight.is_meta or weight.dim() != 2 or weight.numel() == 0:
        return None
    vocab = min(weight.shape[0], getattr(embeddings, "num_embeddings", weight.shape[0]))
    input_ids = torch.randint(0, vocab, (1, CHECK_LENGTH), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(getattr(embeddings, "weight", weight).device)
    attention_mask = torch.ones_like(input_ids)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            raw = model_logits(model, input_ids, attention_mask)[0, :-1]
            expected = torch.log_softmax(raw.float(), dim=-1)
            every_position = torch.ones(1, CHECK_LENGTH - 1, dtype=torch.bool, device=input_ids.device)
            chunks = target_logits_chunks(model, input_ids, every_position, attention_mask)
            ours = torch.cat([torch.log_softmax(chunk, dim=-1) for chunk in chunks])
    finally:
        for module, training in modes:
            module.training = training
    dtype = raw.dtype if raw.is_floating_point() else torch.float32
    # float32 rounding of the logits, or the coarser rounding of a half-precision model's own head
    tolerance = 1e-4 + 8 * torch.finfo(dtype).eps * max(1.0, float(raw.float().abs().max()))
    gap = (ours - expected).abs().max()
    return (float(gap) if torch.isfinite(gap) else float("inf")), tolerance


def check_output_heads(*roots: nn.Module | None) -> list[nn.Module]:
    """Check once per model that the head path reproduces ``model(...).logits``; switch mismatches to full logits.

    Every transformers model with an output head inside ``roots`` (the policy, a PEFT or value-head
    wrapper, a reference model) is run on a short fixed input. Where the log-probs of the chunked
    head differ from those of the model's own logits beyond rounding (a head transformation that
    :func:`head_transform` does not know), the model is marked to compute full logits from then on
    (correct, at the memory cost of a (B, L, V) tensor) and one warning names it. Returns the models
    switched.
    """
    switched: list[tuple[nn.Module, float]] = []
    for root in roots:
        if root is None:
            continue
        for model in causal_lms(root):
            if getattr(model, _CHECKED_ATTRIBUTE, False):
                continue
            try:
                result = head_disagreement(model)
            except (RuntimeError, ValueError, TypeError, AttributeError) as err:
                # the check must not be what stops a run; the model's own forward will say more in training
                logger.warning("could not check the output head of %s against its logits (%s: %s)",
                               type(model).__name__, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                continue
            if result is None:
                logger.debug("output head of %s not checked: its weights are not materialised", type(model).__name__)
                continue
            setattr(model, _CHECKED_ATTRIBUTE, True)
            gap, tolerance = result
            if not gap <= tolerance:
                setattr(model, FULL_LOGITS_ATTRIBUTE, True)
                switched.append((model, gap))
    if switched:
        names = ", ".join(sorted({type(model).__name__ for model, _ in switched}))
        logger.warning(
            "the chunked output head does not reproduce the logits of %s (log-prob gap %.3g): its forward "
            "transforms the logits in a way posttrain does not know. Falling back to the model's own full "
            "logits for it, which is correct but holds a (batch, length, vocabulary) tensor per forward.",
            names, max(gap for _, gap in switched),
        )
    return [model for model, _ in switched]
