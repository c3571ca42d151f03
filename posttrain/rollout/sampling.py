"""Sampling settings and the logits processors that turn next-token logits into a choice.

Every processor is a pure function of a ``(B, V)`` float logits tensor that returns a new tensor of
the same shape; tokens a processor rules out get ``-inf``. They run in this order, the order most
inference engines use, so settings mean the same thing here as elsewhere:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> sample (or argmax when greedy)

Draws come either from a ``torch.Generator`` (one stream consumed across the rows) or from
*sampling keys*: one 63-bit key per prompt, from which a counter-based hash gives every
(completion, token) its own uniform number. With keys, a completion does not depend on which
other prompts share its batch, so a run samples the same completions on 1 or N processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.errors import ConfigError


@dataclass
class SamplingParams:
    """How completions are sampled.

    Attributes:
        max_completion_length: most new tokens per completion.
        temperature: logits are divided by this; 0 means greedy.
        top_p: nucleus sampling, keep the smallest set of tokens whose probability sums to ``top_p``; 1.0 = off.
        top_k: keep the ``top_k`` most likely tokens; 0 or None = off.
        min_p: drop tokens whose probability is below ``min_p`` times the top token's; 0.0 = off.
        repetition_penalty: CTRL-style penalty on every token already in the prompt or completion; 1.0 = off.
        stop_strings: stop a completion as soon as its decoded text contains one of these; the tokens
            that spell it stay in the completion.
        do_sample: False means greedy decoding (argmax), whatever the temperature.
    """

    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_strings: list[str] | None = None
    do_sample: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_completion_length, int) or self.max_completion_length < 1:
            raise ConfigError(
                f"max_completion_length must be a positive integer, got {self.max_completion_length!r}",
                field="max_completion_length",
                fix="pass the most new tokens a completion may have, e.g. 256",
            )
        if self.temperature is None or self.temperature < 0:
            raise ConfigError(
                f"temperature must be >= 0, got {self.temperature!r}",
                field="temperature",
                fix="use 1.0 for plain sampling, or 0 for greedy decoding",
            )
        if self.top_p is None or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"top_p must be in (0, 1], got {self.top_p!r}", field="top_p", fix="use 1.0 to turn nucleus sampling off"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ConfigError(
                f"top_k must be a non-negative integer, got {self.top_k!r}", field="top_k", fix="use 0 to turn top-k off"
            )
        if self.min_p is None or not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(
                f"min_p must be in [0, 1], got {self.min_p!r}", field="min_p", fix="use 0.0 to turn min-p off"
            )
        if self.repetition_penalty is None or self.repetition_penalty <= 0:
            raise ConfigError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
                field="repetition_penalty",
                fix="use 1.0 for no penalty; values above 1 discourage repeats",
            )
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.stop_strings is not None:
            if not all(isinstance(s, str) and s for s in self.stop_strings):
                raise ConfigError(
                    f"stop_strings must be non-empty strings, got {self.stop_strings!r}",
                    field="stop_strings",
                    fix="pass a list such as ['</answer>']",
                )
            self.stop_strings = list(self.stop_strings) or None

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (do_sample=False or temperature 0)."""
        return not self.do_sample or self.temperature == 0


def apply_repetition_penalty(
    logits: torch.Tensor, seen_token_ids: torch.Tensor, penalty: float, seen_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019, "CTRL", section 4.1).

    For every token ``v`` already seen in the row: ``logit_v / penalty`` if ``logit_v > 0`` else
    ``logit_v * penalty``; so ``penalty > 1`` makes seen tokens less likely whatever their sign.
    A token seen several times is penalised once.

    Shapes: ``logits (B, V)``, ``seen_token_ids (B, L)`` long (duplicates allowed), ``seen_mask (B, L)``
    (1 = this position counts; None = all count). Returns ``(B, V)``.
    """
    if penalty == 1.0:
        return logits
    vocab_size = logits.shape[-1]
    if seen_mask is not None:
        # Masked positions point at an extra scratch column that is dropped afterwards.
        seen_token_ids = seen_token_ids.masked_fill(~seen_mask.bool(), vocab_size)
    extended = F.pad(logits, (0, 1))
    seen_logits = extended.gather(-1, seen_token_ids)
    penalised = torch.where(seen_logits > 0, seen_logits / penalty, seen_logits * penalty)
    # scatter with duplicate indices is safe: every duplicate writes the same value
    return extended.scatter(-1, seen_token_ids, penalised)[..., :vocab_size]


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by ``temperature`` (> 0); softmax(z / T) is flatter for T > 1, sharper for T < 1.

    Shapes: ``(B, V) -> (B, V)``.
    """
    if temperature == 1.0:
        return logits
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep the ``top_k`` largest logits per row, set the rest to ``-inf`` (Fan et al. 2018).

    Ties at the k-th value are all kept. ``top_k`` of 0/None, or >= V, is a no-op. Shapes: ``(B, V) -> (B, V)``.
    """
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").

    Keep the smallest set of most likely tokens whose probabilities sum to at least ``top_p``: with
    tokens sorted by probability ``p_(1) >= p_(2) >= ...``, token ``(i)`` is kept iff
    ``sum_{j<i} p_(j) < top_p``. The top token is always kept. Shapes: ``(B, V) -> (B, V)``.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    remove_sorted = mass_before >= top_p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p filtering (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling").

    Drop token ``v`` when ``p_v < min_p * max_u p_u``; the top token always survives.
    Shapes: ``(B, V) -> (B, V)``.
    """
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    sampling: SamplingParams,
    seen_token_ids: torch.Tensor | None = None,
    seen_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply every processor ``sampling`` asks for, in the documented order. ``(B, V) -> (B, V)`` float32.

    Under greedy decoding only the repetition penalty matters (the others never move the argmax).
    """
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen_token_ids is not None:
        logits = apply_repetition_penalty(logits, seen_token_ids, sampling.repetition_penalty, seen_mask)
    if sampling.is_greedy:
        return logits
    logits = apply_temperature(logits, sampling.temperature)
    logits = apply_top_k(logits, sampling.top_k)
    logits = apply_top_p(logits, sampling.top_p)
    logits = apply_min_p(logits, sampling.min_p)
    return logits


def choose_next_tokens(
    processed_logits: torch.Tensor,
    sampling: SamplingParams,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row from processed logits: argmax when greedy, else a categorical draw.

    Shapes: ``(B, V) -> (B,)`` long. With a ``generator`` the draws are reproducible; ``uniform``
    ``(B,)`` float64 in [0, 1) gives each row's draw instead (see :func:`keyed_uniform`).
    """
    if sampling.is_greedy:
        # max(dim) returns the first maximal index like argmax, and is about twice as fast on CPU
        return processed_logits.max(dim=-1).indices
    return sample_from_logits(processed_logits, generator, uniform)


# ----------------------------------------------------------------------------- keyed (counter-based) draws

_MASK32 = 0xFFFFFFFF


def _mix32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash ("lowbias32", C. Wellons) of int64 tensors holding values in [0, 2^32).

    The products can leave int64's range; they wrap, and the low 32 bits kept are exact either way.
    """
    values = values & _MASK32
    values = values ^ (values >> 16)
    values = (values * 0x7FEB352D) & _MASK32
    values = values ^ (values >> 15)
    values = (values * 0x846CA68B) & _MASK32
    return values ^ (values >> 16)


def sampling_key(seed: int, *parts: int | str) -> int:
    """A 63-bit key for one prompt's draws, a pure function of ``seed`` and ``parts``.

    Trainers key a prompt by ``(seed, "train", generation round, position of the prompt in the
    global generation batch)``: nothing about which process holds it.
    """
    text = "/".join(str(part) for part in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def sampling_keys(seed: int, *parts: int | str, positions) -> torch.Tensor:
    """``(P,)`` int64: :func:`sampling_key` ``(seed, *parts, position)`` for each of ``positions``."""
    return torch.tensor([sampling_key(seed, *parts, int(position)) for position in positions], dtype=torch.int64)


def row_streams(prompt_keys: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(P * G,)`` int64 in [0, 2^32): the stream of completion ``j`` of prompt ``p`` at row ``p * G + j``.

    A hash of the prompt's key (both halves) and ``j``, so the G completions of a prompt differ.
    """
    keys = prompt_keys.to(torch.int64).repeat_interleave(group_size)
    member = torch.arange(group_size, device=keys.device, dtype=torch.int64).repeat(prompt_keys.numel())
    return _mix32((keys & _MASK32) ^ _mix32(((keys >> 32) & _MASK32) ^ _mix32(member)))


def keyed_uniform(streams: torch.Tensor, steps: int | torch.Tensor) -> torch.Tensor:
    """Float64 in [0, 1) for token ``steps`` of each row's stream (from :func:`row_streams`).

    Counter-based: the number depends on ``(stream, step)`` only, never on the other rows or on how
    many draws came before. Two 32-bit hashes fill the 53 bits of a double's mantissa. ``streams``
    and ``steps`` broadcast: ``keyed_uniform(streams[:, None], torch.arange(T))`` is the ``(B, T)``
    table of a whole rollout, which the engine computes once instead of once per token.
    """
    steps = torch.as_tensor(steps, dtype=torch.int64, device=streams.device)
    high = _mix32(streams ^ _mix32(2 * steps))
    low = _mix32(streams ^ _mix32(2 * steps + 1))
    return ((high >> 5) * 67108864 + (low >> 6)).to(torch.float64) / 9007199254740992.0


def sample_from_logits(
    logits: torch.Tensor, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """One categorical draw per row of ``softmax(logits)`` by inverting the cumulative distribution.

    ``torch.multinomial`` renormalises and walks the rows in double precision; with a 152k-token
    vocabulary it takes about 30 ms for 8 rows on one CPU core, where a cumulative sum and a binary
    search take under 2 ms. The cumulative sum runs in float64 so that tokens far down the list keep
    their probability. Tokens with probability zero (filtered out) are never drawn: the search returns
    the first index whose cumulative mass is strictly above the uniform draw.
    Shapes: ``(B, V) -> (B,)`` long; ``uniform``, when given, ``(B,)`` in [0, 1) replaces the generator.
    """
    probs = logits.softmax(dim=-1)
    cumulative = probs.to(torch.float64).cumsum_(dim=-1)
    if uniform is None:
        uniform = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=torch.float64)
    else:
        uniform = uniform.to(device=probs.device, dtype=torch.float64).reshape(-1, 1)
    tokens = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True).squeeze(-1)
    # a draw that rounds up to the total mass would fall off the end: take the last token with mass
    overflow = tokens >= probs.shape[-1]
    if bool(overflow.any()):
        last_nonzero = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
        tokens = torch.where(overflow, last_nonzero, tokens)
    return tokens
