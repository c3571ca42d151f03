"""The one layout in which every online trainer hands a rollout from stage to stage.

An engine returns a :class:`~posttrain.rollout.RolloutBatch`: what was sampled, nothing more. A
trainer turns it into :class:`RolloutSequences` (:meth:`RolloutSequences.from_batch`) and fills in
what each later stage adds (log-probs at sampling time, reference log-probs, advantages, values,
returns), then cuts it into micro-batches and hands those to the loss. GRPO, RLOO, online DPO and
PPO all use this layout; none passes a dict of string keys between its methods.

The two types stay apart on purpose: ``RolloutBatch`` is the engine contract (HF and vLLM both
produce it and nothing after sampling concerns them), while ``RolloutSequences`` carries the loss
mask and the per-stage fields a trainer adds, which an engine never fills.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from posttrain.models.lm_head import token_logps
from posttrain.rollout.batch import RolloutBatch

#: the fields every layout has; the others are filled in by later stages and may be None
REQUIRED_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "loss_mask", "is_truncated")
_PROMPT_FIELDS = ("prompt_ids", "prompt_mask")


@dataclass
class RolloutSequences:
    """Prompt + completion rows of a rollout, with everything the loss of an online method reads.

    ``N`` rows, prompt-major (rows of one prompt are adjacent when they come from an engine);
    ``P`` prompt columns, left-padded; ``C`` completion columns, right-padded.

    Attributes:
        prompt_ids: ``(N, P)`` long, left-padded.
        prompt_mask: ``(N, P)`` long, 1 on real prompt tokens.
        completion_ids: ``(N, C)`` long, right-padded.
        completion_mask: ``(N, C)`` long, 1 on every completion token (what the model attends to).
        loss_mask: ``(N, C)`` long, 1 on the completion tokens a loss counts. It starts equal to
            ``completion_mask``; it is kept separate because not every attended token is the
            policy's action: tokens a tool wrote into a multi-turn completion will be 0 here, and a
            trainer may zero whole rows (GRPO's ``mask_truncated_completions``).
        is_truncated: ``(N,)`` bool, the row hit the length limit without EOS or a stop string.
        old_logps: ``(N, C)`` float or None: the sampling policy's log-probs of the completion tokens.
        sampler_logps: ``(N, C)`` float or None: the same log-probs as the sampling engine reported them
            (vLLM, a generation server); they differ from ``old_logps`` by the engines' numerics.
        sampling_weights: ``(N, C)`` float or None: importance weights ``pi_old / pi_sampler`` that correct
            the loss for that gap (:mod:`posttrain.losses.sampling_correction`), 0 outside the loss mask.
        ref_logps: ``(N, C)`` float or None: the reference policy's log-probs.
        advantages: ``(N,)`` float (one per completion: GRPO, RLOO) or ``(N, C)`` (per token: PPO), or None.
        values: ``(N, C)`` float or None: the value model's estimate before each completion token (PPO).
        returns: ``(N, C)`` float or None: the value targets (PPO).
        scores: ``(N,)`` float or None: each completion's score from the reward model (PPO).
        num_items_in_batch: ``()`` float or None: loss tokens in the accumulation window of this
            micro-batch, summed over processes (GRPO's token-level normalisation).

    Derived, for a log-prob forward over prompt + completion (:attr:`input_ids`, :attr:`attention_mask`,
    :attr:`position_ids`, :attr:`target_mask`, each ``(N, P + C)``): log-probs of completion token ``t``
    sit at column ``P - 1 + t`` of the ``(N, P + C - 1)`` result.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    loss_mask: torch.Tensor
    is_truncated: torch.Tensor
    old_logps: torch.Tensor | None = None
    sampler_logps: torch.Tensor | None = None
    sampling_weights: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    num_items_in_batch: torch.Tensor | None = None

    # ------------------------------------------------------------------ building and converting

    @classmethod
    def from_batch(cls, batch: RolloutBatch) -> RolloutSequences:
        """The layout of an engine's :class:`RolloutBatch`; the loss mask starts as the completion mask."""
        return cls(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask, completion_ids=batch.completion_ids,
                   completion_mask=batch.completion_mask, loss_mask=batch.completion_mask.clone(),
                   is_truncated=batch.is_truncated, sampler_logps=batch.sampler_logps)

    @classmethod
    def from_dict(cls, tensors: Mapping[str, torch.Tensor]) -> RolloutSequences:
        """The inverse of :meth:`as_dict` (how a checkpoint stores a buffered micro-batch)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(tensors) - names)
        if unknown:
            raise KeyError(f"not fields of RolloutSequences: {unknown}")
        return cls(**tensors)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name (tensors are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def replace(self, **changes: Any) -> RolloutSequences:
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> RolloutSequences:
        """A copy with every tensor moved to ``device``."""
        return RolloutSequences(**{name: value.to(device) for name, value in self.as_dict().items()})

    # ------------------------------------------------------------------ shapes

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def prompt_width(self) -> int:
        """``P``: prompt columns, padding included."""
        return self.prompt_ids.shape[1]

    # ------------------------------------------------------------------ inputs of a log-prob forward

    @property
    def input_ids(self) -> torch.Tensor:
        """``(N, P + C)``: prompt and completion side by side."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``(N, P + C)``: 1 on real prompt and completion tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """``(N, P + C)``: positions count real tokens only, so a left-padded prompt starts at 0, as in sampling."""
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    @property
    def target_mask(self) -> torch.Tensor:
        """``(N, P + C)``: 1 on the completion tokens (the positions whose log-probs are read), 0 on the prompt."""
        return torch.cat([torch.zeros_like(self.prompt_mask), self.completion_mask], dim=1)

    # ------------------------------------------------------------------ rows and columns

    def select(self, index: torch.Tensor | slice) -> RolloutSequences:
        """The rows ``index`` (a slice, or a long tensor moved to each field's device); padding is kept."""
        picked = {}
        for name, value in self.as_dict().items():
            if name == "num_items_in_batch":
                picked[name] = value
            elif isinstance(index, slice):
                picked[name] = value[index]
            else:
                picked[name] = value[index.to(value.device)]
        return RolloutSequences(**picked)

    def slice(self, start: int, stop: int) -> RolloutSequences:
        return self.select(slice(start, stop))

    def trim_padding(self) -> RolloutSequences:
        """Drop prompt columns that are padding in every row and completion columns past the longest completion."""
        prompt_mask, completion_mask = self.prompt_mask, self.completion_mask
        used_prompt = prompt_mask.any(dim=0).nonzero()
        first = int(used_prompt[0]) if used_prompt.numel() else prompt_mask.shape[1] - 1
        width = max(int(completion_mask.sum(dim=1).max()), 1) if completion_mask.numel() else 1
        trimmed = {}
        for name, value in self.as_dict().items():
            if name in _PROMPT_FIELDS:
                value = value[:, first:]
            elif value.dim() == 2 and value.shape[1] == completion_mask.shape[1]:
                value = value[:, :width]
            trimmed[name] = value
        return RolloutSequences(**trimmed)

    def split(self, num_parts: int, generator: torch.Generator | None = None) -> list[RolloutSequences]:
        """Shuffle the rows (when a generator is given) and cut them into ``num_parts`` equal, trimmed micro-batches."""
        order = torch.randperm(self.num_rows, generator=generator) if generator is not None else torch.arange(self.num_rows)
        size = self.num_rows // num_parts
        return [self.select(order[part * size : (part + 1) * size]).trim_padding() for part in range(num_parts)]

    def prompt_token_lists(self) -> list[list[int]]:
        """Each row's prompt tokens as a plain list, padding removed."""
        return [ids[mask.bool()].tolist() for ids, mask in zip(self.prompt_ids, self.prompt_mask)]

    def completion_values(self, value_model: nn.Module) -> torch.Tensor:
        """``(N, C)``: the value of the state before each completion token (positions ``P-1 .. P+C-2``)."""
        from posttrain.models.value_head import token_values

        values = token_values(value_model, self.input_ids, self.attention_mask, self.position_ids)
        return values[:, self.prompt_width - 1 : -1]


def completion_token_logps(
    model: nn.Module,
    sequences: RolloutSequences,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    logps_fn: Callable | None = None,
    share_prompt: bool = True,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``(N, C)`` of the completion tokens (zero on padding), and entropies if asked
    (differentiable with ``entropy_grad``).

    ``logps_fn`` replaces :func:`posttrain.models.lm_head.token_logps` (e.g. a reference policy's).
    Differentiable when autograd is on. With ``share_prompt``, completions of the same prompt share
    one forward over it.
    """
    compute = logps_fn or token_logps
    kwargs = {"with_entropy": True, **({"entropy_grad": True} if entropy_grad else {})} if with_entropy else {}
    result = compute(
        model, sequences.input_ids, sequences.target_mask, sequences.attention_mask, sequences.position_ids,
        temperature=temperature, chunk_size=chunk_size,
        prompt_width=sequences.prompt_width if share_prompt else None, **kwargs,
    )
    start = sequences.prompt_width - 1  # logps[:, t] scores token t + 1
    entropy = result.entropy[:, start:] if with_entropy else None
    return result.logps[:, start:], entropy
