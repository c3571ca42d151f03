"""Turn validated rows into token ids and loss masks, one function per family of methods.

Conventions shared by every function here:

- token ids are plain lists of ints;
- ``completion_mask[t] == 1`` means token t is a loss target (it is predicted from position t-1;
  the trainer does the shift);
- no doubled special tokens: text rendered by a chat template is tokenized with
  ``add_special_tokens=False`` (the template owns BOS and turn markers); plain text gets the BOS
  token only when the tokenizer has one and adds it by itself;
- a conversational completion is the whole rendered assistant turn: what the template renders for
  ``prompt + completion`` after what it renders for the prompt with the generation prompt, with
  whatever the template writes after the end-of-turn token (ChatML's newline) included, as TRL
  takes it; EOS is appended only when the rendered turn holds none (a template whose turns end
  with another token). Plain-text completions get EOS appended (unless already there).

All functions return a new ``datasets.Dataset`` built with ``Dataset.map(batched=True)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from datasets import Dataset, Features, Sequence, Value

from posttrain.data.formats import DataFormat, FormatInfo, extract_prompt, resolve_format
from posttrain.data.assistant_masks import assistant_spans, ids_and_offsets, mask_from_spans
from posttrain.data.load import describe_source
from posttrain.data.streaming import is_streaming, streamed_sample
from posttrain.data.templates import apply_chat_template_text, render_prompt_completion, require_chat_template
from posttrain.data.tools import TOOLS_COLUMN, ToolTemplateCheck, require_conversational_for_tools, row_tools
from posttrain.errors import ConfigError, DataError

logger = logging.getLogger("posttrain")

SFT_FORMATS = (DataFormat.LANGUAGE_MODELING, DataFormat.PROMPT_COMPLETION, DataFormat.CONVERSATIONAL)
TRUNCATION_MODES = ("keep_end", "keep_start")
# a per-row dict of extra chat-template variables (e.g. {"enable_thinking": False}), as TRL reads it
CHAT_TEMPLATE_KWARGS_COLUMN = "chat_template_kwargs"
# columns a preference row may carry that trainers use as they are
PREFERENCE_EXTRA_COLUMNS = ("margin", "ref_chosen_logps", "ref_rejected_logps")


# ----------------------------------------------------------------------------- special tokens


@dataclass(frozen=True)
class SpecialTokens:
    """How a tokenizer's BOS/EOS apply to plain text.

    Attributes:
        bos: ``[bos_id]`` when the tokenizer puts BOS before plain text by itself, else ``[]``.
        eos_id: the id appended after each completion.
    """

    bos: tuple[int, ...]
    eos_id: int

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialTokens:
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise ConfigError(
                "the tokenizer has no EOS token, so completions cannot be ended",
                field="eos_token",
                fix="set tokenizer.eos_token (e.g. '<|im_end|>' for ChatML models) or pass --eos_token",
            )
        bos_id = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = (bos_id,) if bos_id is not None and probe[:1] == [bos_id] else ()
        return cls(bos, eos_id)

    def with_bos(self, ids: list[int]) -> list[int]:
        return ids if not self.bos or ids[:1] == list(self.bos) else [*self.bos, *ids]

    def with_eos(self, ids: list[int]) -> list[int]:
        """Plain text: EOS appended unless it is already the last token."""
        return ids if ids and ids[-1] == self.eos_id else [*ids, self.eos_id]

    def turn_with_eos(self, ids: list[int]) -> list[int]:
        """A rendered turn: kept whole (``'hi<|im_end|>\\n'`` stays so); EOS appended only if it holds none."""
        return ids if self.eos_id in ids else [*ids, self.eos_id]


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, with no special tokens added (the text or template holds them)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _located(error: DataError, *, source: str, row: int, column: str | None = None) -> DataError:
    """The same error with the place filled in (template helpers do not know the row)."""
    return DataError(
        error.problem,
        source=error.source or source,
        row=error.row if error.row is not None else row,
        column=error.column or column,
        expected=error.expected,
        found=error.found,
        fix=error.fix,
    )


def _per_row(function: Callable, rows: list, indices: list[int], *, source: str, column: str) -> list:
    results = []
    for row_index, row in zip(indices, rows):
        try:
            results.append(function(row))
        except DataError as error:
            raise _located(error, source=source, row=row_index, column=column) from error
    return results


def _map(
    dataset: Dataset, function: Callable, new_columns: dict[str, str], *, num_proc: int | None, remove: list[str], desc: str
) -> Dataset:
    """``dataset.map`` in batches, storing each new column as a list of ``new_columns[name]``
    integers (int32 ids and int8 masks: a quarter of the default int64's memory). A streaming
    dataset is mapped lazily: its rows are tokenized as training reads them."""
    new_features = {name: Sequence(Value(dtype)) for name, dtype in new_columns.items()}
    if is_streaming(dataset):
        # declared features make the result's columns known without reading it; a stream whose features
        # are unknown gets them only when every column is removed (all tokenize_sft keeps is declared)
        features = None
        if dataset.features is not None:
            features = Features({**{n: f for n, f in dataset.features.items() if n not in remove}, **new_features})
        elif remove:
            features = Features(new_features)
        return dataset.map(function, batched=True, with_indices=True, remove_columns=remove or None, features=features)
    features = Features({name: feature for name, feature in dataset.features.items() if name not in remove})
    features.update(new_features)
    return dataset.map(
        function,
        batched=True,
        with_indices=True,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=remove,
        features=features,
        desc=desc,
    )


# ----------------------------------------------------------------------------- SFT


def _check_lengths(ids_rows: list[list[int]], indices: list[int], max_length: int | None, source: str) -> None:
    if max_length is None:
        return
    for row_index, ids in zip(indices, ids_rows):
        if len(ids) > max_length:
            raise DataError(
                "the row is longer than max_length and truncation is off",
                source=source,
                row=row_index,
                expected=f"at most {max_length} tokens",
                found=f"{len(ids)} tokens",
                fix=f"raise max_length to at least {len(ids)}, enable truncation, or drop the row",
            )


def tokenize_sft(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    truncation: bool = True,
    truncation_mode: str = "keep_start",
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    text_field: str = "text",
    num_proc: int | None = None,
    source: str | None = None,
) -> Dataset:
    """Tokenize language-modeling, prompt-completion or conversational rows for SFT.

    Returns a dataset with exactly two columns: ``input_ids`` and ``completion_mask``.

    Args:
        max_length: keep at most this many tokens per row; ``None``: no limit.
        truncation: if False, a row longer than ``max_length`` is a :class:`DataError`.
        truncation_mode: which tokens a longer row keeps: ``keep_start`` the first, ``keep_end`` the last.
        completion_only_loss: for prompt-completion rows, mark only completion tokens (``None``:
            yes; of a completion holding tool results, only its assistant turns); ``False`` marks every token.
        assistant_only_loss: for conversations, mark only the assistant turns' tokens (each turn's
            end-of-turn token and the template's text after it included, tool calls too; never tool
            results or the tool schemas); default: every token.
        text_field: the text column of language-modeling data.

    Conversational rows are rendered with their ``tools`` and ``chat_template_kwargs`` columns when
    the dataset has them (see :mod:`posttrain.data.tools`).
    """
    _check_truncation_mode(truncation_mode)
    source = source or describe_source(dataset)
    probe = streamed_sample(dataset)  # a streaming dataset's format is read from its first rows
    info = resolve_format(probe, SFT_FORMATS, text_field=text_field, source=source)
    if assistant_only_loss and not info.conversational:
        raise ConfigError(
            "assistant_only_loss needs conversational data (a 'messages' column, or conversational "
            f"prompt/completion), but this dataset is {info.format.describe(text_field)} with text values",
            field="assistant_only_loss",
            fix="drop --assistant_only_loss, or use completion_only_loss with prompt/completion data",
        )
    require_conversational_for_tools(probe.column_names, info.conversational, source=source)
    if info.conversational:
        require_chat_template(tokenizer, source=source, column=info.columns[0])
    specials = SpecialTokens.of(tokenizer)
    completion_only = completion_only_loss is not False
    # masks of multi-turn rows rely on turn-by-turn rendering: a template that breaks it is an error then
    tool_check = ToolTemplateCheck(tokenizer, source=source, continuity="error" if assistant_only_loss else "warn")

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        # a row's own template variables and tool schemas (TRL's per-row `chat_template_kwargs` and `tools`)
        template_kwargs = batch.get(CHAT_TEMPLATE_KWARGS_COLUMN) or [None] * len(indices)
        tools = row_tools(batch.get(TOOLS_COLUMN), indices, source=source)
        if info.format is DataFormat.LANGUAGE_MODELING:
            ids_rows = [specials.with_eos(specials.with_bos(ids)) for ids in encode(tokenizer, batch[text_field])]
            masks = [[1] * len(ids) for ids in ids_rows]
        elif info.format is DataFormat.PROMPT_COMPLETION:
            ids_rows, masks = _prompt_completion_rows(batch, indices, list(zip(template_kwargs, tools)))
        else:
            ids_rows, masks = _conversation_rows(batch["messages"], indices, list(zip(template_kwargs, tools)))
        if not truncation:
            _check_lengths(ids_rows, indices, max_length, source)
        elif max_length is not None:
            kept = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids_rows = [ids[kept] for ids in ids_rows]
            masks = [mask[kept] for mask in masks]
        return {"input_ids": ids_rows, "completion_mask": masks}

    def _render_completion(prompt, completion, options):
        template_kwargs, tools = options
        tool_check([*prompt, *completion], tools, template_kwargs)
        prompt_text, text = render_prompt_completion(tokenizer, prompt, completion, tools=tools,
                                                     template_kwargs=template_kwargs)
        if not completion_only or all(message.get("role") == "assistant" for message in completion):
            return prompt_text, text, None
        # a completion holding tool results: the loss is on its assistant turns only
        spans = assistant_spans(tokenizer, [*prompt, *completion], prompt_text + text, template_kwargs, tools)
        offset = len(prompt_text)
        return prompt_text, text, [(start - offset, end - offset) for start, end in spans if start >= offset]

    def _prompt_completion_rows(batch, indices, options):
        if info.conversational:
            rows = list(zip(batch["prompt"], batch["completion"], options))
            rendered = _per_row(lambda row: _render_completion(*row), rows, indices, source=source, column="completion")
            prompts = encode(tokenizer, [prompt for prompt, _, _ in rendered])
            completions, completion_masks = [], []
            for ids, (_, text, spans) in zip(encode(tokenizer, [text for _, text, _ in rendered]), rendered):
                mask = [1] * len(ids)
                if spans is not None:  # the same ids, with each token's characters
                    (ids,), (offsets,) = ids_and_offsets(tokenizer, [text])
                    mask = mask_from_spans(offsets, spans)
                completions.append(specials.turn_with_eos(ids))
                completion_masks.append(mask + [1] * (len(completions[-1]) - len(mask)))
        else:
            prompts = [specials.with_bos(ids) for ids in encode(tokenizer, batch["prompt"])]
            completions = [specials.with_eos(ids) for ids in encode(tokenizer, batch["completion"])]
            completion_masks = [[1] * len(ids) for ids in completions]
        ids_rows, masks = [], []
        for prompt_ids, completion_ids, completion_mask in zip(prompts, completions, completion_masks):
            ids_rows.append(prompt_ids + completion_ids)
            masks.append([0] * len(prompt_ids) + completion_mask if completion_only else [1] * len(ids_rows[-1]))
        return ids_rows, masks

    def _render_conversation(messages, options):
        template_kwargs, tools = options
        tool_check(messages, tools, template_kwargs)
        return apply_chat_template_text(tokenizer, messages, tools=tools, template_kwargs=template_kwargs)

    def _conversation_rows(conversations, indices, options):
        texts = _per_row(lambda row: _render_conversation(*row), list(zip(conversations, options)), indices,
                         source=source, column="messages")
        if not assistant_only_loss:
            ids_rows = encode(tokenizer, texts)
            masks = [[1] * len(ids) for ids in ids_rows]
        else:
            all_spans = _per_row(
                lambda item: assistant_spans(tokenizer, item[0], item[1], *item[2]),
                list(zip(conversations, texts, options)), indices, source=source, column="messages",
            )
            ids_rows, offsets = ids_and_offsets(tokenizer, texts)
            masks = [mask_from_spans(row_offsets, spans) for row_offsets, spans in zip(offsets, all_spans)]
        for ids, mask in zip(ids_rows, masks):
            if specials.eos_id not in ids:
                # the template's end of turn is not EOS: end with EOS, a target if the turn was one
                mask.append(mask[-1] if mask else 1)
                ids.append(specials.eos_id)
        return ids_rows, masks

    return _map(
        dataset, tokenize_batch, {"input_ids": "int32", "completion_mask": "int8"},
        num_proc=num_proc, remove=probe.column_names, desc="Tokenizing (SFT)",
    )


# ----------------------------------------------------------------------------- preference data


def truncate_prompt(prompt_ids: list[int], max_prompt_length: int | None, truncation_mode: str = "keep_end") -> list[int]:
    """At most ``max_prompt_length`` tokens: the last ones (``keep_end``) or the first (``keep_start``)."""
    if max_prompt_length is None or len(prompt_ids) <= max_prompt_length:
        return prompt_ids
    if truncation_mode == "keep_end":
        return prompt_ids[len(prompt_ids) - max_prompt_length :] if max_prompt_length > 0 else []
    return prompt_ids[:max_prompt_length]


def truncate_pair(
    prompt_ids: list[int],
    completions: list[list[int]],
    *,
    max_length: int | None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> tuple[list[int], list[list[int]]]:
    """Fit a prompt and its completions (sharing that prompt) into the length limits.

    1. the prompt is cut to ``max_prompt_length`` per ``truncation_mode``;
    2. each completion is cut to ``max_completion_length`` (keeping its start);
    3. if prompt + longest completion exceeds ``max_length``, the completions are cut (keeping
       their start) to what fits after the prompt; if the prompt alone leaves no room, it is cut
       per ``truncation_mode`` so that completions keep ``min(longest, max_length // 2)`` tokens.
    """
    prompt_ids = truncate_prompt(prompt_ids, max_prompt_length, truncation_mode)
    if max_completion_length is not None:
        completions = [c[:max_completion_length] for c in completions]
    if max_length is not None:
        longest = max((len(c) for c in completions), default=0)
        if len(prompt_ids) + longest > max_length:
            if len(prompt_ids) >= max_length:
                prompt_ids = truncate_prompt(prompt_ids, max_length - min(longest, max_length // 2), truncation_mode)
            room = max_length - len(prompt_ids)
            completions = [c[:room] for c in completions]
    return prompt_ids, completions


def _check_truncation_mode(truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(
            f"unknown truncation_mode {truncation_mode!r}",
            field="truncation_mode",
            fix="use 'keep_end' (cut the prompt's beginning) or 'keep_start' (cut its end)",
        )


def _render_pairs(
    batch: dict[str, list],
    indices: list[int],
    info: FormatInfo,
    completion_columns: tuple[str, ...],
    tokenizer: Any,
    specials: SpecialTokens,
    source: str,
    tool_check: ToolTemplateCheck,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Prompt ids and, per row, the ids of each completion column (plain text ending with EOS; a
    conversational completion is its whole rendered turn, holding EOS, rendered with the row's
    ``tools`` and ``chat_template_kwargs``)."""
    num_rows = len(indices)
    if info.explicit_prompt:
        prompts = batch["prompt"]
        completions = [[batch[c][i] for c in completion_columns] for i in range(num_rows)]
    else:  # implicit prompt: completions are whole texts/conversations sharing their beginning
        pairs = [tuple(batch[c][i] for c in completion_columns) for i in range(num_rows)]
        split = _per_row(lambda pair: extract_prompt(*pair), pairs, indices, source=source, column=completion_columns[0])
        prompts = [prompt for prompt, *_ in split]
        completions = [list(rest) for _, *rest in split]

    if info.conversational:
        template_kwargs = batch.get(CHAT_TEMPLATE_KWARGS_COLUMN) or [None] * num_rows
        tools = row_tools(batch.get(TOOLS_COLUMN), indices, source=source)

        def render(row: tuple[Any, list[Any], dict | None, list | None]) -> tuple[str, list[str]]:
            prompt, row_completions, row_kwargs, schemas = row
            for completion in row_completions:
                tool_check([*prompt, *completion], schemas, row_kwargs)
            rendered = [render_prompt_completion(tokenizer, prompt, c, tools=schemas, template_kwargs=row_kwargs)
                        for c in row_completions]
            return rendered[0][0], [text for _, text in rendered]

        texts = _per_row(render, list(zip(prompts, completions, template_kwargs, tools)), indices, source=source,
                         column=completion_columns[0])
        prompt_ids = encode(tokenizer, [prompt for prompt, _ in texts])
        flat = [specials.turn_with_eos(ids) for ids in encode(tokenizer, [text for _, row in texts for text in row])]
    else:
        prompt_ids = [specials.with_bos(ids) for ids in encode(tokenizer, prompts)]
        flat = [specials.with_eos(ids) for ids in encode(tokenizer, [text for row in completions for text in row])]
    width = len(completion_columns)
    per_row = [flat[i * width : (i + 1) * width] for i in range(num_rows)]
    return prompt_ids, per_row


def encode_prompt_completion(
    tokenizer: Any, prompt: Any, completion: Any, specials: SpecialTokens | None = None
) -> list[int]:
    """Ids of one prompt + completion laid out exactly as :func:`tokenize_preference` lays out a pair's side.

    A reward model reads its score at the last token, so scoring a sequence rendered any other way
    (without the template's text after the turn end, a missing EOS) reads it where training never
    put it. Conversational prompts take a message list or a plain string as the completion (it
    becomes the assistant turn).
    """
    specials = specials or SpecialTokens.of(tokenizer)
    if isinstance(prompt, list):
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        prompt_text, completion_text = render_prompt_completion(tokenizer, prompt, completion)
        prompt_ids, completion_ids = encode(tokenizer, [prompt_text, completion_text])
        return [*prompt_ids, *specials.turn_with_eos(completion_ids)]
    prompt_ids, completion_ids = encode(tokenizer, [prompt, completion])
    return [*specials.with_bos(prompt_ids), *specials.with_eos(completion_ids)]


def _tokenize_completions(
    dataset: Dataset,
    tokenizer: Any,
    fmt: DataFormat,
    completion_columns: tuple[str, ...],
    output_columns: tuple[str, ...],
    keep_columns: tuple[str, ...],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    truncation_mode: str,
    num_proc: int | None,
    source: str | None,
) -> Dataset:
    _check_truncation_mode(truncation_mode)
    source = source or describe_source(dataset)
    info = resolve_format(dataset, [fmt], source=source)
    require_conversational_for_tools(dataset.column_names, info.conversational, source=source)
    if info.conversational:
        require_chat_template(tokenizer, source=source, column=info.columns[0])
    specials = SpecialTokens.of(tokenizer)
    tool_check = ToolTemplateCheck(tokenizer, source=source)

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        prompts, completions = _render_pairs(batch, indices, info, completion_columns, tokenizer, specials, source,
                                             tool_check)
        out: dict[str, list] = {name: [] for name in ("prompt_input_ids", *output_columns)}
        for prompt_ids, row in zip(prompts, completions):
            prompt_ids, row = truncate_pair(
                prompt_ids, row, max_length=max_length, max_prompt_length=max_prompt_length,
                max_completion_length=max_completion_length, truncation_mode=truncation_mode,
            )
            out["prompt_input_ids"].append(prompt_ids)
            for name, ids in zip(output_columns, row):
                out[name].append(ids)
        return out

    remove = [c for c in dataset.column_names if c not in keep_columns]
    new_columns = {name: "int32" for name in ("prompt_input_ids", *output_columns)}
    return _map(dataset, tokenize_batch, new_columns, num_proc=num_proc, remove=remove, desc=f"Tokenizing ({fmt.value})")


def tokenize_preference(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
    num_proc: int | None = None,
    source: str | None = None,
) -> Dataset:
    """Tokenize preference pairs (text or conversations, explicit or implicit prompt).

    Returns columns ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (completion
    ids: plain text ending with EOS, a conversation's whole rendered assistant turn, unless truncated), plus ``margin``, ``ref_chosen_logps`` and
    ``ref_rejected_logps`` when the dataset has them. See :func:`truncate_pair` for the limits.
    """
    return _tokenize_completions(
        dataset, tokenizer, DataFormat.PREFERENCE, ("chosen", "rejected"),
        ("chosen_input_ids", "rejected_input_ids"), PREFERENCE_EXTRA_COLUMNS,
        max_length=max_length, max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length, truncation_mode=truncation_mode,
        num_proc=num_proc, source=source,
    )


def drop_empty_completions(
    dataset: Dataset, source: str | None = None, columns: tuple[str, ...] = ("chosen_input_ids", "rejected_input_ids")
) -> Dataset:
    """Drop the rows in which truncation left a completion with no token (nothing to compare), with
    one warning counting them.

    Raises:
        DataError: every row would be dropped.
    """
    import numpy as np
    import pyarrow.compute as pc

    empty = np.zeros(len(dataset), dtype=bool)
    for column in columns:
        lengths = dataset.with_format("arrow")[column]
        empty |= np.asarray(pc.fill_null(pc.list_value_length(lengths), 0)) == 0
    dropped = int(empty.sum())
    if not dropped:
        return dataset
    source = source or describe_source(dataset)
    if dropped == len(dataset):
        raise DataError(
            "truncation leaves every row with an empty chosen or rejected completion", source=source,
            expected="completions that keep at least one token", found=f"{dropped} of {dropped} rows empty",
            fix="raise max_length (or lower max_prompt_length so that the prompt leaves room)",
        )
    logger.warning("%s: dropped %d of %d rows whose chosen or rejected completion is empty after truncation "
                   "(raise max_length to keep them).", source, dropped, len(dataset))
    return dataset.select(np.flatnonzero(~empty))


def tokenize_unpaired_preference(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
    num_proc: int | None = None,
    source: str | None = None,
) -> Dataset:
    """Tokenize unpaired preference rows: columns ``prompt_input_ids``, ``completion_input_ids``, ``label``."""
    return _tokenize_completions(
        dataset, tokenizer, DataFormat.UNPAIRED_PREFERENCE, ("completion",),
        ("completion_input_ids",), ("label",),
        max_length=max_length, max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length, truncation_mode=truncation_mode,
        num_proc=num_proc, source=source,
    )


# ----------------------------------------------------------------------------- prompts (online methods)


def tokenize_prompts(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_prompt_length: int | None = None,
    num_proc: int | None = None,
    source: str | None = None,
    template_kwargs: dict | None = None,
) -> Dataset:
    """Add ``prompt_input_ids`` for generation; every existing column (``prompt``, ``answer``, ...)
    is kept untouched for reward functions.

    Conversational prompts are rendered with the assistant header (``add_generation_prompt``) and
    ``template_kwargs`` as extra template variables.
    Prompts longer than ``max_prompt_length`` keep their last tokens (the end is what the model
    continues from).
    """
    source = source or describe_source(dataset)
    info = resolve_format(dataset, [DataFormat.PROMPT_ONLY], source=source)
    if info.conversational:
        require_chat_template(tokenizer, source=source, column="prompt")
    specials = SpecialTokens.of(tokenizer)

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        if info.conversational:
            texts = _per_row(
                lambda prompt: apply_chat_template_text(tokenizer, prompt, add_generation_prompt=True,
                                                        template_kwargs=template_kwargs),
                batch["prompt"], indices, source=source, column="prompt",
            )
            ids_rows = encode(tokenizer, texts)
        else:
            ids_rows = [specials.with_bos(ids) for ids in encode(tokenizer, batch["prompt"])]
        return {"prompt_input_ids": [truncate_prompt(ids, max_prompt_length, "keep_end") for ids in ids_rows]}

    return _map(
        dataset, tokenize_batch, {"prompt_input_ids": "int32"}, num_proc=num_proc, remove=[], desc="Tokenizing prompts"
    )
