"""The data path shared by every method: load → detect and validate → template → tokenize →
pack → collate. Knows nothing of losses.

The names below are the stable entry points; see ``docs/data-formats.md`` for the formats.
"""

from __future__ import annotations

from posttrain.data.collate import (
    PaddingCollator,
    PaddingFreeCollator,
    PreferenceCollator,
    PromptCollator,
    UnpairedPreferenceCollator,
)
from posttrain.data.formats import (
    DataFormat,
    FormatInfo,
    detect_format,
    extract_prompt,
    resolve_format,
    validate_dataset,
)
from posttrain.data.load import describe_source, load_data, load_mixture, mark_source, source_name
from posttrain.data.packing import pack_dataset, pack_stream
from posttrain.data.prompts import RepeatedBlockSampler, prepare_prompt_dataset
from posttrain.data.sharegpt import convert_sharegpt
from posttrain.data.templates import (
    apply_chat_template_text,
    has_chat_template,
    render_prompt_completion,
    require_chat_template,
)
from posttrain.data.tokenize import (
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
    tokenize_unpaired_preference,
    truncate_pair,
)

__all__ = [
    "DataFormat",
    "FormatInfo",
    "PaddingCollator",
    "PaddingFreeCollator",
    "PreferenceCollator",
    "PromptCollator",
    "RepeatedBlockSampler",
    "UnpairedPreferenceCollator",
    "apply_chat_template_text",
    "convert_sharegpt",
    "describe_source",
    "detect_format",
    "extract_prompt",
    "has_chat_template",
    "load_data",
    "load_mixture",
    "mark_source",
    "pack_dataset",
    "pack_stream",
    "prepare_prompt_dataset",
    "render_prompt_completion",
    "require_chat_template",
    "resolve_format",
    "source_name",
    "tokenize_preference",
    "tokenize_prompts",
    "tokenize_sft",
    "tokenize_unpaired_preference",
    "truncate_pair",
    "validate_dataset",
]
