"""Batched, KV-cached sampling with a plain (or PEFT-wrapped) Hugging Face causal LM.

The loop, in one place:

1. left-pad the *unique* prompts and run them through the model once, filling a ``DynamicCache``;
2. copy that cache (and the last-position logits) ``num_generations`` times per prompt, so a group
   of G completions pays for its prompt once, not G times;
3. decode one token per step for every unfinished row, feeding the cache, the growing attention mask
   and each row's own position (``prompt_length + step``: left padding shifts the columns, not the
   positions);
4. a row is done at EOS or when its decoded text contains a stop string; done rows emit pad, and
   once a quarter of the rows in the batch are done they are dropped from the compute batch
   (``Cache.batch_select_indices``), so a long straggler does not drag the whole batch along.

With ``max_batch_tokens`` the rows are sampled in slices (steps 1-4 per slice), so long completions
need the KV cache of one slice at a time, not of the whole batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from posttrain.errors import ConfigError
from posttrain.models.lm_head import cache_argument_name
from posttrain.rollout.kv_cache import reserved_dynamic_cache
from posttrain.rollout.lean_decode import LeanDecoder
from posttrain.rollout.batch import RolloutBatch, check_num_generations, left_pad, normalize_prompts
from posttrain.rollout.sampling import SamplingParams, choose_next_tokens, keyed_uniform, process_logits, row_streams

# Drop finished rows from the compute batch once at least this fraction of it is finished. Each drop
# copies the remaining KV cache, about the memory traffic of one decode step, so dropping on every
# finished row would cost more than it saves.
COMPACT_FRACTION = 0.25


class StopStringChecker:
    """Finds stop strings in a completion by decoding only its last few tokens.

    A stop string of ``b`` UTF-8 bytes spans at most ``b`` tokens (every token is at least one
    byte), so decoding the last ``b + 2`` tokens after each step sees every occurrence that ends in
    the newest token; earlier occurrences were caught at earlier steps. The extra tokens keep the
    occurrence away from the window's first token, which some decoders render without its leading
    space.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]) -> None:
        if tokenizer is None:
            raise ConfigError(
                "stop_strings need a tokenizer to decode completions", field="stop_strings", fix="pass tokenizer= to the engine"
            )
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.window = max(len(s.encode("utf-8")) for s in self.stop_strings) + 2

    def hits(self, token_tails: list[list[int]]) -> list[bool]:
        """For each row's most recent tokens (at least ``self.window`` of them when available), whether
        a stop string appears in their decoded text."""
        texts = self.tokenizer.batch_decode(token_tails, skip_special_tokens=False)
        return [any(stop in text for stop in self.stop_strings) for text in texts]


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class HFRolloutEngine:
    """Samples completions with a Hugging Face causal LM, without ``model.generate``.

    Args:
        model: a ``transformers`` causal LM, or one wrapped by ``peft.get_peft_model``.
        tokenizer: its tokenizer; used for the default EOS / pad ids and to decode for stop strings.
        eos_token_ids: token ids that end a completion; default: the tokenizer's EOS plus the model's
            ``generation_config.eos_token_id``.
        pad_token_id: id written after a completion ends and used for left padding; default: the
            tokenizer's pad token, else the first EOS id.
        share_prompt_prefill: run each unique prompt through the model once and copy its KV cache to
            its ``num_generations`` rows (True, faster), or repeat the prompt before the forward (False).
        drop_finished_rows: remove finished rows from the compute batch as they accumulate.
        reserve_cache: back the ``DynamicCache`` with memory reserved for prompt + completion, so a
            decode step writes one column instead of copying the whole cache (see ``kv_cache``).
        lean_decode: decode with :class:`~posttrain.rollout.lean_decode.LeanDecoder` when it supports
            the model (Llama, Qwen2, Qwen3), instead of the model's forward; the prompt always goes
            through the model's forward.
        sampler_logprobs: also return each sampled token's log-prob under the distribution it was drawn
            from (``RolloutBatch.sampler_logps``), for the sampler/trainer agreement check and
            importance-sampling correction; costs one log-softmax per decode step.
        max_batch_tokens: most KV-cache positions held at once, counted as rows x (prompt width +
            ``max_completion_length``); a larger batch is sampled in slices of rows, one after another
            (whole groups when one fits). None: the whole batch at once. With ``prompt_keys`` a row's
            draws do not depend on its slice, so the completions are the same for any slicing; with a
            ``generator`` the slices consume it in turn.

    ``generate`` runs under ``torch.no_grad()`` with the model in eval mode (so gradient
    checkpointing, which disables the KV cache in training mode, stays out of the way) and restores
    every module's train/eval mode afterwards.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        eos_token_ids: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        share_prompt_prefill: bool = True,
        drop_finished_rows: bool = True,
        reserve_cache: bool = True,
        lean_decode: bool = True,
        sampler_logprobs: bool = False,
        max_batch_tokens: int | None = None,
    ) -> None:
        if max_batch_tokens is not None and (isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int)
                                             or max_batch_tokens < 1):
            raise ConfigError(
                f"rollout_max_batch_tokens must be a positive integer, got {max_batch_tokens!r}",
                field="rollout_max_batch_tokens",
                fix="give the most KV-cache positions (rows x (prompt + completion length)) to hold at once, or leave it unset",
            )
        self.max_batch_tokens = max_batch_tokens
        self.model = model
        self.sampler_logprobs = sampler_logprobs
        self.lean_decode = lean_decode
        self.tokenizer = tokenizer
        self.share_prompt_prefill = share_prompt_prefill
        self.drop_finished_rows = drop_finished_rows
        self.reserve_cache = reserve_cache
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._config = base.config
        generation_config = getattr(base, "generation_config", None)

        if eos_token_ids is None:
            ids = _as_id_list(getattr(tokenizer, "eos_token_id", None))
            ids += _as_id_list(getattr(generation_config, "eos_token_id", None))
            eos_token_ids = list(dict.fromkeys(ids))
        self.eos_token_ids = _as_id_list(eos_token_ids)

        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(generation_config, "pad_token_id", None)
        if pad_token_id is None and self.eos_token_ids:
            pad_token_id = self.eos_token_ids[0]
        if pad_token_id is None:
            raise ConfigError(
                "no pad token id: the tokenizer has neither a pad nor an EOS token",
                field="pad_token_id",
                fix="pass pad_token_id= to the engine or set tokenizer.pad_token",
            )
        self.pad_token_id = int(pad_token_id)

        parameters = inspect.signature(base.forward).parameters
        self._cache_kwarg = cache_argument_name(base.forward)
        self._keeps_last_logits = "logits_to_keep" in parameters
        # MoE models: the router's auxiliary loss is a training term, and with a KV cache transformers
        # pairs the new tokens' router logits with the whole attention mask and fails
        self._skips_router_logits = "output_router_logits" in parameters

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_weights(self, model: torch.nn.Module) -> None:
        """Sample with ``model``'s current weights. The engine runs the module it was given, so when that is
        ``model`` (what trainers pass: the policy they train) there is nothing to copy; another module's weights
        are copied in, and must have the same names and shapes."""
        if model is self.model:
            return
        self.model.load_state_dict(model.state_dict())

    def generate(
        self,
        prompt_ids: list[list[int]] | torch.Tensor,
        *,
        num_generations: int = 1,
        sampling: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        prompt_mask: torch.Tensor | None = None,
        prompt_keys: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """Sample ``num_generations`` completions for each prompt.

        Args:
            prompt_ids: token ids, one list per prompt (any lengths), or a ``(B, P)`` tensor; with a
                tensor, pass ``prompt_mask`` or leading pad tokens are taken as left padding.
            num_generations: completions per prompt (the group size G).
            sampling: a :class:`SamplingParams`; default ``SamplingParams()``.
            generator: a ``torch.Generator`` on the model's device, for reproducible sampling.
            prompt_keys: ``(num_prompts,)`` int64 sampling keys (:func:`~posttrain.rollout.sampling.sampling_keys`),
                instead of ``generator``: completion ``j`` of prompt ``p`` draws token ``t`` from a counter-based
                hash of ``(key_p, j, t)``, so its completions do not depend on the rest of the batch.

        Returns:
            a :class:`RolloutBatch` of ``len(prompts) * num_generations`` rows, prompt-major.
        """
        sampling = sampling if sampling is not None else SamplingParams()
        check_num_generations(num_generations)
        prompts = normalize_prompts(prompt_ids, self.pad_token_id, prompt_mask)
        device = self.device
        if generator is not None and generator.device.type != device.type:
            raise ConfigError(
                f"the generator is on {generator.device} but the model is on {device}",
                field="generator",
                fix=f"create it with torch.Generator(device='{device.type}')",
            )
        streams = None
        if prompt_keys is not None:
            if generator is not None:
                raise ConfigError("both a generator and prompt_keys were given", field="prompt_keys",
                                  fix="pass one source of randomness: prompt_keys (one key per prompt) or a generator")
            if prompt_keys.numel() != len(prompts):
                raise ConfigError(f"{prompt_keys.numel()} prompt_keys for {len(prompts)} prompts", field="prompt_keys",
                                  fix="pass one sampling key per prompt")
            streams = row_streams(prompt_keys.to(device), num_generations)
        stop_checker = StopStringChecker(self.tokenizer, sampling.stop_strings) if sampling.stop_strings else None
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                return self._generate(prompts, num_generations, sampling, generator, stop_checker, device, streams)
        finally:
            for module, training in modes:
                module.training = training

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """One model call; returns the ``(B, V)`` float32 logits of the last position."""
        kwargs = {self._cache_kwarg: cache}
        if self._keeps_last_logits:
            kwargs["logits_to_keep"] = 1
        if self._skips_router_logits:
            kwargs["output_router_logits"] = False
        output = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs
        )
        return output.logits[:, -1, :].float()

    def _row_slices(self, num_rows: int, group_size: int, row_positions: int) -> list[tuple[int, int]]:
        """``[start, stop)`` row ranges sampled one after another so that no slice's KV cache holds more than
        ``max_batch_tokens`` positions (rows x (prompt width + max_completion_length)); whole groups when
        the budget holds one, so each slice still prefills a prompt once for its group."""
        if self.max_batch_tokens is None or num_rows * row_positions <= self.max_batch_tokens:
            return [(0, num_rows)]
        rows = max(1, self.max_batch_tokens // row_positions)
        if rows >= group_size:
            rows -= rows % group_size
        return [(start, min(start + rows, num_rows)) for start in range(0, num_rows, rows)]

    def _generate(
        self,
        prompts: list[list[int]],
        group_size: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        stop_checker: StopStringChecker | None,
        device: torch.device,
        streams: torch.Tensor | None = None,
    ) -> RolloutBatch:
        pad = self.pad_token_id
        unique_ids, unique_mask = left_pad(prompts, pad, device)
        num_rows, prompt_width = len(prompts) * group_size, unique_ids.shape[1]
        max_new = sampling.max_completion_length
        # Per-row results, indexed by the original row; each slice fills its own rows.
        generated = torch.full((num_rows, max_new), pad, dtype=torch.long, device=device)
        lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
        done = torch.zeros(num_rows, dtype=torch.bool, device=device)
        sampled_logps = torch.zeros((num_rows, max_new), device=device) if self.sampler_logprobs else None
        # built per call: hooks or adapters may have been added since the last one
        lean = LeanDecoder.build(self.model) if self.lean_decode else None
        if lean is not None:
            lean.prepare(prompt_width + max_new, device)
        for start, stop in self._row_slices(num_rows, group_size, prompt_width + max_new):
            self._sample_rows(
                unique_ids, unique_mask, group_size, start, stop, sampling, generator, stop_checker, lean,
                None if streams is None else streams[start:stop], generated[start:stop], lengths[start:stop], done[start:stop],
                None if sampled_logps is None else sampled_logps[start:stop],
            )

        completion_width = max(int(lengths.max()), 1)
        completion_ids = generated[:, :completion_width].contiguous()  # do not keep the full buffer alive
        completion_mask = (torch.arange(completion_width, device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()
        return RolloutBatch(
            prompt_ids=unique_ids.repeat_interleave(group_size, dim=0),
            prompt_mask=unique_mask.repeat_interleave(group_size, dim=0),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            is_truncated=~done,
            prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
            group_size=group_size,
            sampler_logps=None if sampled_logps is None else sampled_logps[:, :completion_width].contiguous(),
        )

    def _sample_rows(
        self,
        unique_ids: torch.Tensor,
        unique_mask: torch.Tensor,
        group_size: int,
        start: int,
        stop: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        stop_checker: StopStringChecker | None,
        lean: LeanDecoder | None,
        streams: torch.Tensor | None,
        generated: torch.Tensor,
        lengths: torch.Tensor,
        done: torch.Tensor,
        sampled_logps: torch.Tensor | None = None,
    ) -> None:
        """Sample rows ``start .. stop - 1`` (row ``r`` continues prompt ``r // group_size``), writing into
        ``generated`` ``(stop - start, max_new)``, ``lengths``, ``done`` and ``sampled_logps`` (views of the
        whole batch's)."""
        pad, device = self.pad_token_id, unique_ids.device
        first_prompt, last_prompt = start // group_size, (stop - 1) // group_size
        row_prompt = torch.arange(start, stop, device=device) // group_size
        row_prompt_ids, row_prompt_mask = unique_ids[row_prompt], unique_mask[row_prompt]
        num_rows, prompt_width = row_prompt_ids.shape
        max_new = sampling.max_completion_length

        if self.reserve_cache:
            cache = reserved_dynamic_cache(self._config, prompt_width + max_new)
        else:
            cache = DynamicCache(config=self._config)
        if self.share_prompt_prefill:
            prefill_ids, prefill_mask = unique_ids[first_prompt : last_prompt + 1], unique_mask[first_prompt : last_prompt + 1]
        else:
            prefill_ids, prefill_mask = row_prompt_ids, row_prompt_mask
        # Left padding: a row's first real token sits at position 0 whatever its column.
        prefill_positions = (prefill_mask.cumsum(dim=-1) - 1).clamp(min=0)
        last_logits = self._forward(prefill_ids, prefill_mask, prefill_positions, cache)
        if self.share_prompt_prefill and num_rows > prefill_ids.shape[0]:
            if start % group_size == 0 and stop % group_size == 0:
                cache.batch_repeat_interleave(group_size)
                last_logits = last_logits.repeat_interleave(group_size, dim=0)
            else:  # a slice that cuts through a group
                local = row_prompt - first_prompt
                cache.batch_select_indices(local)
                last_logits = last_logits[local]

        # Per-row state, indexed by the rows still in the compute batch (`batch_rows`). Tokens, lengths, flags
        # and log-probs go to `row_*` tensors of those rows, copied into the slice's outputs only when rows
        # leave the batch and at the end: four index_put calls per token cost a sixth of the sampling loop.
        batch_rows = torch.arange(num_rows, device=device)
        row_tokens = torch.full((num_rows, max_new), pad, dtype=torch.long, device=device)
        row_logps = torch.zeros((num_rows, max_new), device=device) if sampled_logps is not None else None
        row_lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
        row_done = torch.zeros(num_rows, dtype=torch.bool, device=device)

        def write_rows() -> None:
            generated[batch_rows] = row_tokens
            lengths[batch_rows] = row_lengths
            done[batch_rows] = row_done
            if row_logps is not None:
                sampled_logps[batch_rows] = row_logps

        attention = torch.ones((num_rows, prompt_width + max_new), dtype=torch.long, device=device)
        attention[:, :prompt_width] = row_prompt_mask
        next_position = row_prompt_mask.sum(dim=-1)
        use_penalty = sampling.repetition_penalty != 1.0
        if use_penalty:
            seen_ids = torch.full((num_rows, prompt_width + max_new), pad, dtype=torch.long, device=device)
            seen_ids[:, :prompt_width] = row_prompt_ids
            seen_mask = torch.zeros((num_rows, prompt_width + max_new), dtype=torch.bool, device=device)
            seen_mask[:, :prompt_width] = row_prompt_mask.bool()

        # keyed draws: each row's uniform number for every token, in one vectorised hash
        uniforms = None
        if streams is not None and not sampling.is_greedy:
            uniforms = keyed_uniform(streams.unsqueeze(1), torch.arange(max_new, device=device))
        eos_ids = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)
        eos_id = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else None  # one comparison instead of isin

        for step in range(max_new):
            width = prompt_width + step
            if use_penalty:
                processed = process_logits(last_logits, sampling, seen_ids[:, :width], seen_mask[:, :width])
            else:
                processed = process_logits(last_logits, sampling)
            uniform = None if uniforms is None else uniforms[:, step]
            tokens = choose_next_tokens(processed, sampling, generator, uniform)
            was_done = row_done
            running = ~was_done
            tokens = tokens.masked_fill(was_done, pad)
            row_tokens[:, step] = tokens
            if row_logps is not None:
                chosen = torch.log_softmax(processed, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
                row_logps[:, step] = chosen.masked_fill(was_done, 0.0)
            row_lengths += running
            finished_now = running & (tokens == eos_id if eos_id is not None else torch.isin(tokens, eos_ids))
            if stop_checker is not None:
                local_rows = torch.arange(len(batch_rows), device=device)
                finished_now |= self._stop_hits(stop_checker, row_tokens, local_rows, running & ~finished_now, step)
            row_done = was_done | finished_now
            # rows that left the batch were done, so the batch's rows decide
            if step == max_new - 1 or bool(row_done.all()):
                break

            batch_done = row_done
            if self.drop_finished_rows and int(batch_done.sum()) >= COMPACT_FRACTION * len(batch_rows):
                write_rows()
                keep = (~batch_done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                batch_rows, tokens, batch_done = batch_rows[keep], tokens[keep], batch_done[keep]
                row_tokens, row_lengths, row_done = row_tokens[keep], row_lengths[keep], row_done[keep]
                if row_logps is not None:
                    row_logps = row_logps[keep]
                attention, next_position = attention[keep], next_position[keep]
                if uniforms is not None:
                    uniforms = uniforms[keep]
                if use_penalty:
                    seen_ids, seen_mask = seen_ids[keep], seen_mask[keep]
            if use_penalty:
                seen_ids[:, width] = tokens
                seen_mask[:, width] = ~batch_done
            if lean is not None:
                last_logits = lean.step(tokens, attention[:, : width + 1], next_position, cache)
            else:
                last_logits = self._forward(
                    tokens.unsqueeze(1), attention[:, : width + 1], next_position.unsqueeze(1), cache
                )
            next_position = next_position + 1
        write_rows()

    @staticmethod
    def _stop_hits(
        checker: StopStringChecker, generated: torch.Tensor, batch_rows: torch.Tensor, to_check: torch.Tensor, step: int
    ) -> torch.Tensor:
        """``(len(batch_rows),)`` bool: which rows just completed a stop string (only ``to_check`` rows are decoded)."""
        hits = torch.zeros_like(to_check)
        check_index = to_check.nonzero().squeeze(1)
        if check_index.numel() == 0:
            return hits
        start = max(0, step + 1 - checker.window)
        # rows still generating have produced exactly step + 1 tokens, so their tail is one slice
        tails = generated[batch_rows[check_index], start : step + 1].tolist()
        found = torch.tensor(checker.hits(tails), dtype=torch.bool, device=hits.device)
        hits[check_index] = found
        return hits
