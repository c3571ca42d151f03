"""A corpus of bad inputs: each case is what a user might give, and the address its error must name.

Every case runs twice, through the command line (tests/cli/test_malformed_cli.py: exit status 2 and
one line ``posttrain <cmd>: error: ... Fix: ...``) and through the Python API
(tests/data/test_malformed.py: a ``PosttrainError`` subclass). Files are written into a temporary
folder by :func:`write_case_files`; ``expect`` lists what the message must contain (file name, row,
column or flag). Broken model directories are made once per module by :func:`build_model_variants`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------------------- helpers for rows


def _conversation(user: str = "2+2?", assistant: str = "4") -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _jsonl(*rows: Any) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


CHAT = [{"messages": _conversation(f"{i}+1?", str(i + 1))} for i in range(4)]
TEXT = [{"text": f"the cat sat on mat number {i}."} for i in range(4)]
PAIRS = [{"prompt": f"{i}+1?", "completion": f" {i + 1}"} for i in range(4)]
PREFERENCES = [{"prompt": f"{i}+1?", "chosen": f" {i + 1}", "rejected": f" {i + 2}"} for i in range(4)]
PROMPTS = [{"prompt": f"what is {i}+1?"} for i in range(4)]


def _with(rows: list[dict], index: int, row: dict) -> list[dict]:
    """``rows`` with ``row`` put in at ``index`` (the bad row, so its number is known)."""
    return rows[:index] + [row] + rows[index:]


# ----------------------------------------------------------------------------- the case type


@dataclass
class Case:
    """One bad input.

    Attributes:
        id: the test id; also the stem of the data file, so messages can be checked for it.
        method: the sub-command (``sft``, ``reward``, ``dpo``, ``grpo``, ``rloo``, ``online-dpo``).
        data: the data file's content: rows (written as JSON lines), text or bytes; ``None`` when the
            case gives a dataset path in ``dataset`` instead.
        suffix: the data file's extension.
        dataset: the dataset path to pass, relative to the case folder (default: the data file).
        extra_files: more files to write, relative path -> content.
        config: config values, given as flags on the command line and as keyword arguments in Python.
        cli_args: raw command-line arguments (flag spellings, YAML files) with no Python equivalent.
        model: which model directory to use (see :func:`build_model_variants`).
        expect: substrings the message must contain: the address (file, row, column or flag).
        api: False when the input only exists on the command line (YAML files, flag syntax).
        error: the name of the PosttrainError subclass the Python API raises.
    """

    id: str
    method: str = "sft"
    data: Any = None
    suffix: str = ".jsonl"
    dataset: str | None = None
    extra_files: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    cli_args: list[str] = field(default_factory=list)
    model: str = "good"
    expect: list[str] = field(default_factory=list)
    api: bool = True
    error: str = "DataError"

    @property
    def data_name(self) -> str:
        return self.id + self.suffix


def _good_data(method: str) -> list[dict]:
    return {"sft": CHAT, "reward": PREFERENCES, "dpo": PREFERENCES}.get(method, PROMPTS)


def _data_case(id: str, data: Any, *expect: str, method: str = "sft", suffix: str = ".jsonl", **kwargs) -> Case:
    name = id + suffix
    return Case(id, method, data, suffix, expect=[name, *expect], **kwargs)


def _config_case(id: str, method: str = "sft", expect_flag: str | None = None, **config: Any) -> Case:
    flag = expect_flag or next(iter(config))
    return Case(id, method, _good_data(method), config=config, expect=[f"--{flag}"], error="ConfigError")


def _model_case(id: str, model: str, *expect: str) -> Case:
    return Case(id, "sft", CHAT, model=model, expect=["--model_name_or_path", *expect], error="ConfigError")


# ----------------------------------------------------------------------------- the corpus

LATIN1_TEXT = "café crème".encode("latin-1")  # 0xe9 is not UTF-8 on its own

CASES: list[Case] = [
    # -- the file cannot be read as rows
    _data_case("latin1_jsonl", _jsonl(*TEXT[:2]).encode() + b'{"text": "' + LATIN1_TEXT + b'"}\n', "line 3", "UTF-8"),
    _data_case("latin1_in_message", _jsonl(*CHAT[:3]).encode()
               + b'{"messages": [{"role": "user", "content": "' + LATIN1_TEXT + b'"}, '
               b'{"role": "assistant", "content": "ok"}]}\n', "line 4", "UTF-8"),
    _data_case("latin1_csv", b"prompt,completion\nhello,world\n" + LATIN1_TEXT + b",x\n", "line 3", "UTF-8",
               suffix=".csv"),
    _data_case("latin1_json_array", b'[{"text": "ok"},\n {"text": "' + LATIN1_TEXT + b'"}]\n', "line 2", "UTF-8",
               suffix=".json"),
    _data_case("empty_jsonl", "", "the file is empty"),
    _data_case("blank_lines_jsonl", "\n\n   \n", "the file is empty"),
    _data_case("empty_csv", "", "the file is empty", suffix=".csv"),
    _data_case("header_only_csv", "prompt,completion\n", "header line but no rows", suffix=".csv"),
    _data_case("empty_json_array", "[]\n", "the file is empty", suffix=".json"),
    _data_case("bad_json_middle", _jsonl(*CHAT[:2]) + '{"messages": [{"role": "user", "content": "x"}\n'
               + _jsonl(*CHAT[2:]), "line 3", "malformed JSON"),
    _data_case("cut_off_last_line", _jsonl(*TEXT) + '{"text": "the end', "line 5", "malformed JSON"),
    _data_case("number_line", _jsonl(*TEXT[:1]) + "5\n" + _jsonl(*TEXT[1:]), "line 2", "JSON object"),
    _data_case("list_line", _jsonl(*TEXT[:2]) + '["the", "cat"]\n', "line 3", "JSON object"),
    _data_case("bad_json_array", '[{"text": "a"},\n {"text": ]\n', "line 2", "malformed JSON", suffix=".json"),
    _data_case("corrupt_parquet", b"PAR1 this is not parquet", "could not read", suffix=".parquet"),
    _data_case("text_file", "the cat sat on the mat\n", "unsupported file type '.txt'", suffix=".txt"),
    _data_case("no_extension", _jsonl(*TEXT), "unsupported file type", suffix=""),
    Case("missing_file", dataset="does/not/exist.jsonl", expect=["exist.jsonl", "no such file"]),
    Case("empty_folder", dataset="empty_folder", extra_files={"empty_folder/.keep": ""},
         expect=["empty_folder", "no data files"]),
    Case("folder_of_notes", dataset="notes", extra_files={"notes/readme.txt": "rows live elsewhere"},
         expect=["notes", "no data files"]),
    Case("folder_without_train_split", dataset="splits", extra_files={"splits/test.jsonl": _jsonl(*CHAT)},
         expect=["splits", "no 'train' split"]),
    Case("unreachable_hub_id", dataset="someone/no-such-dataset", expect=["someone/no-such-dataset", "could not load"]),
    # -- columns fit no format this method accepts
    _data_case("csv_wrong_header", "question,answer\n2+2?,4\n", "found columns ['answer', 'question']", suffix=".csv"),
    _data_case("sharegpt_unknown_role", _jsonl({"conversations": [{"from": "narrator", "value": "hi"}]}),
               "narrator"),
    _data_case("text_field_absent", _jsonl(*TEXT), "'body'", config={"dataset_text_field": "body"}),
    _data_case("sft_only_labels", _jsonl({"label": True}, {"label": False}), "found columns ['label']"),
    _data_case("reward_without_rejected", _jsonl({"chosen": "a", "other": "b"}), "found columns ['chosen', 'other']",
               method="reward"),
    _data_case("dpo_prompt_completion", _jsonl(*PAIRS), "found columns ['completion', 'prompt']", method="dpo"),
    _data_case("grpo_without_prompt", _jsonl(*CHAT), "found columns ['messages']", method="grpo"),
    _data_case("rloo_without_prompt", _jsonl(*TEXT), "found columns ['text']", method="rloo"),
    _data_case("online_dpo_without_prompt", _jsonl(*TEXT), "found columns ['text']", method="online-dpo"),
    # -- a row is empty or holds the wrong type (language modeling and prompt-completion)
    _data_case("empty_text", _jsonl(*_with(TEXT, 1, {"text": ""})), "row 1", "column 'text'", "empty text"),
    _data_case("blank_text", _jsonl(*_with(TEXT, 2, {"text": "  \n "})), "row 2", "column 'text'"),
    _data_case("empty_object_row", _jsonl(*_with(TEXT, 1, {})), "row 1", "column 'text'", "missing value"),
    _data_case("null_text", _jsonl(*_with(TEXT, 3, {"text": None})), "row 3", "column 'text'"),
    _data_case("int_text", _jsonl(*_with(TEXT, 1, {"text": 5})), "row 1", "column 'text'", "found int 5"),
    _data_case("all_int_text", _jsonl({"text": 3}, {"text": 4}), "row 0", "column 'text'", "found int 3"),
    _data_case("bool_text", _jsonl(*_with(TEXT, 2, {"text": True})), "row 2", "column 'text'"),
    _data_case("list_for_string", _jsonl(*_with(TEXT, 1, {"text": ["the", "cat"]})), "row 1", "column 'text'",
               "a list"),
    _data_case("object_for_string", _jsonl(*_with(TEXT, 1, {"text": {"body": "x"}})), "row 1", "column 'text'"),
    _data_case("int_completion", _jsonl(*_with(PAIRS, 2, {"prompt": "1+1?", "completion": 2})), "row 2",
               "column 'completion'"),
    _data_case("null_prompt", _jsonl(*_with(PAIRS, 1, {"prompt": None, "completion": "x"})), "row 1",
               "column 'prompt'"),
    _data_case("mixed_formats", _jsonl(*TEXT[:1], *PAIRS), "row 0", "column 'prompt'", "missing value"),
    _data_case("string_and_conversation", _jsonl(*_with(PAIRS, 1, {"prompt": "hi", "completion": _conversation()[1:]})),
               "row 1", "column 'completion'"),
    _data_case("huge_row_no_truncation", _jsonl(*_with(TEXT, 1, {"text": "word " * 400})), "row 1",
               "longer than max_length", config={"truncation": False, "max_length": 32}),
    # -- conversations
    _data_case("messages_string", _jsonl(*_with(CHAT, 1, {"messages": "hello"})), "row 1", "column 'messages'"),
    _data_case("messages_empty_list", _jsonl(*_with(CHAT, 2, {"messages": []})), "row 2", "empty conversation"),
    _data_case("messages_null", _jsonl(*_with(CHAT, 1, {"messages": None})), "row 1", "column 'messages'"),
    _data_case("message_not_object", _jsonl(*_with(CHAT, 1, {"messages": ["hi", "there"]})), "row 1",
               "column 'messages'"),
    _data_case("message_without_role", _jsonl(*_with(CHAT, 3, {"messages": [{"content": "hi"}]})), "row 3",
               "no 'role'"),
    _data_case("unknown_role", _jsonl(*_with(CHAT, 1, {"messages": [{"role": "human", "content": "a"},
                                                                    {"role": "gpt", "content": "b"}]})),
               "row 1", "unknown role", "'human'"),
    _data_case("message_without_content", _jsonl(*_with(CHAT, 1, {"messages": [{"role": "user", "content": "a"},
                                                                               {"role": "assistant"}]})),
               "row 1", "message 1"),
    _data_case("message_null_content", _jsonl(*_with(CHAT, 2, {"messages": [{"role": "user", "content": None},
                                                                            {"role": "assistant", "content": "b"}]})),
               "row 2", "message 0"),
    _data_case("message_int_content", _jsonl(*_with(CHAT, 1, {"messages": [{"role": "user", "content": 7},
                                                                           {"role": "assistant", "content": "b"}]})),
               "row 1", "message 0"),
    _data_case("empty_assistant_message", _jsonl(*_with(CHAT, 1, {"messages": _conversation("hi", "")})), "row 1",
               "message 1 (assistant) is empty"),
    _data_case("no_assistant_turn", _jsonl(*_with(CHAT, 2, {"messages": _conversation()[:1]})), "row 2",
               "no assistant turn"),
    _data_case("assistant_first", _jsonl(*_with(CHAT, 1, {"messages": _conversation()[::-1] + _conversation()[1:]})),
               "row 1", "comes before any user turn"),
    _data_case("greeting_before_user", _jsonl(*_with(CHAT, 3, {"messages": [
                   {"role": "system", "content": "be kind"}, {"role": "assistant", "content": "hello!"},
                   *_conversation()]})), "row 3", "message 1 (assistant) comes before any user turn"),
    _data_case("prompt_without_user", _jsonl({"prompt": [{"role": "user", "content": "hi"}],
                                              "completion": [{"role": "assistant", "content": "yo"}]},
                                             {"prompt": [{"role": "system", "content": "be brief"}],
                                              "completion": [{"role": "assistant", "content": "yo"}]}),
               "row 1", "column 'prompt'", "no user turn"),
    # -- preference and prompt-only rows
    _data_case("null_rejected", _jsonl(*_with(PREFERENCES, 1, {"prompt": "a", "chosen": "b", "rejected": None})),
               "row 1", "column 'rejected'", method="dpo"),
    _data_case("int_chosen", _jsonl(*_with(PREFERENCES, 2, {"prompt": "a", "chosen": 1, "rejected": "c"})),
               "row 2", "column 'chosen'", method="dpo"),
    _data_case("empty_chosen", _jsonl(*_with(PREFERENCES, 1, {"prompt": "a", "chosen": "", "rejected": "c"})),
               "row 1", "column 'chosen'", method="reward"),
    _data_case("margin_not_number", _jsonl(*[dict(r, margin=1.0) for r in PREFERENCES[:2]],
                                           dict(PREFERENCES[2], margin="high")),
               "row 2", "column 'margin'", method="reward"),
    _data_case("implicit_pair_assistant_first", _jsonl(
                   {"chosen": _conversation(), "rejected": _conversation("2+2?", "5")},
                   {"chosen": _conversation()[::-1], "rejected": _conversation("2+2?", "5")}),
               "row 1", "column 'chosen'", "before any user turn", method="dpo"),
    _data_case("reward_overlong_error", _jsonl(*_with(PREFERENCES, 2, {"prompt": "a", "chosen": " cat" * 300,
                                                                       "rejected": " dog"})),
               "row 2", method="reward", config={"overlong_policy": "error", "max_length": 32}),
    _data_case("null_prompt_grpo", _jsonl(*_with(PROMPTS, 1, {"prompt": None})), "row 1", "column 'prompt'",
               method="grpo"),
    _data_case("int_prompt_rloo", _jsonl(*_with(PROMPTS, 2, {"prompt": 12})), "row 2", "column 'prompt'",
               method="rloo"),
    _data_case("empty_prompt_online_dpo", _jsonl(*_with(PROMPTS, 1, {"prompt": ""})), "row 1", "column 'prompt'",
               method="online-dpo"),
    # -- impossible values of common fields
    _config_case("negative_learning_rate", learning_rate=-1e-5),
    _config_case("nan_learning_rate", learning_rate=float("nan")),
    _config_case("text_learning_rate", learning_rate="fast"),
    _config_case("zero_batch_size", per_device_train_batch_size=0),
    _config_case("list_batch_size", per_device_train_batch_size=[1, 2]),
    _config_case("zero_eval_batch_size", per_device_eval_batch_size=0),
    _config_case("zero_gradient_accumulation", "dpo", gradient_accumulation_steps=0),
    _config_case("negative_epochs", num_train_epochs=-1),
    _config_case("zero_max_length", max_length=0),
    _config_case("negative_max_length", "reward", max_length=-5),
    _config_case("zero_max_prompt_length", "dpo", max_prompt_length=0),
    _config_case("negative_weight_decay", weight_decay=-0.1),
    _config_case("negative_max_grad_norm", max_grad_norm=-1.0),
    _config_case("negative_warmup_steps", warmup_steps=-10),
    _config_case("zero_logging_steps", logging_steps=0),
    _config_case("negative_seed", seed=-1),
    _config_case("adam_beta1_above_one", adam_beta1=1.5),
    _config_case("zero_logits_chunk_size", "grpo", logits_chunk_size=0),
    _config_case("warmup_ratio_above_one", warmup_ratio=2.0),
    _config_case("unknown_dpo_loss_type", "dpo", loss_type="sigmoidal"),
    _config_case("unknown_grpo_loss_type", "grpo", loss_type="ppo2"),
    _config_case("one_generation_grpo", "grpo", num_generations=1),
    _config_case("unknown_online_dpo_loss_type", "online-dpo", loss_type="hinge2"),
    _config_case("unknown_truncation_mode", "dpo", truncation_mode="keep_middle"),
    _config_case("unknown_overlong_policy", "reward", overlong_policy="shorten"),
    _config_case("unknown_packing_strategy", packing=True, packing_strategy="greedy", expect_flag="packing_strategy"),
    _config_case("missing_resume_path", resume_from_checkpoint="runs/nowhere/checkpoint-5"),
    _config_case("push_to_hub_offline", push_to_hub=True),
    # -- the model directory
    _model_case("truncated_weights", "truncated_weights", "truncated_weights", "damaged or truncated"),
    _model_case("model_without_config", "no_config", "no_config", "no config.json"),
    _model_case("model_without_tokenizer", "no_tokenizer", "no_tokenizer", "no tokenizer files"),
    _model_case("missing_model_dir", "missing", "missing_model", "no such directory"),
    _model_case("model_path_is_file", "file", "model.bin", "it is a file, not a model directory"),
    _model_case("empty_model_dir", "empty", "empty_model", "no config.json"),
    # -- the command line only: YAML files and flag syntax
    Case("yaml_unknown_key", data=CHAT, cli_args=["--config", "{dir}/run.yaml"],
         extra_files={"run.yaml": "learning_rate: 1e-5\nlearnig_rate: 2e-5\n"}, expect=["run.yaml", "learnig_rate"],
         api=False),
    Case("yaml_bad_value", data=CHAT, cli_args=["--config", "{dir}/run.yaml"],
         extra_files={"run.yaml": "learning_rate: fast\n"}, expect=["learning_rate", "fast"], api=False),
    Case("yaml_not_mapping", data=CHAT, cli_args=["--config", "{dir}/run.yaml"],
         extra_files={"run.yaml": "- learning_rate\n- 1e-5\n"}, expect=["run.yaml", "mapping"], api=False),
    Case("yaml_syntax_error", data=CHAT, cli_args=["--config", "{dir}/run.yaml"],
         extra_files={"run.yaml": "learning_rate: [1e-5\n"}, expect=["run.yaml", "not valid YAML"], api=False),
    Case("missing_yaml_file", data=CHAT, cli_args=["--config", "{dir}/nowhere.yaml"],
         expect=["nowhere.yaml", "does not exist"], api=False),
    Case("misspelled_flag", data=CHAT, cli_args=["--learnig_rate", "1e-5"], expect=["--learnig_rate"], api=False),
    Case("flag_without_number", data=CHAT, cli_args=["--num_train_epochs", "three"],
         expect=["num_train_epochs", "three"], api=False),
]


# ----------------------------------------------------------------------------- materialising cases


def _write(path: str, content: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(content, list):
        content = _jsonl(*content)
    with open(path, "wb") as handle:
        handle.write(content if isinstance(content, bytes) else content.encode("utf-8"))


def write_case_files(case: Case, folder: str) -> str:
    """Write the case's files under ``folder``; return the dataset path to pass."""
    for name, content in case.extra_files.items():
        _write(os.path.join(folder, name), content)
    if case.data is not None:
        _write(os.path.join(folder, case.data_name), case.data)
    if case.dataset is None:
        return os.path.join(folder, case.data_name)
    if case.dataset.startswith("someone/"):
        return case.dataset  # a hub id
    return os.path.join(folder, case.dataset)


def build_model_variants(tiny_model_dir: str, folder: str) -> dict[str, str]:
    """The good tiny model and broken copies of it: name -> path."""
    variants = {"good": tiny_model_dir}

    def copy(name: str, drop: tuple[str, ...] = ()) -> str:
        path = os.path.join(folder, name)
        shutil.copytree(tiny_model_dir, path, ignore=shutil.ignore_patterns(*drop) if drop else None)
        return path

    variants["truncated_weights"] = copy("truncated_weights")
    weights = os.path.join(variants["truncated_weights"], "model.safetensors")
    with open(weights, "rb") as handle:
        head = handle.read(os.path.getsize(weights) // 2)
    with open(weights, "wb") as handle:
        handle.write(head)  # an interrupted copy
    variants["no_config"] = copy("no_config", ("config.json",))
    variants["no_tokenizer"] = copy("no_tokenizer", ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json",
                                                     "chat_template*"))
    variants["missing"] = os.path.join(folder, "missing_model")
    variants["file"] = os.path.join(folder, "model.bin")
    _write(variants["file"], b"\0" * 16)
    variants["empty"] = os.path.join(folder, "empty_model")
    os.makedirs(variants["empty"])
    return variants


def cli_values(values: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Config values as command-line flags, and those a flag cannot spell (lists) for a YAML file."""
    flags, for_yaml = [], {}
    for name, value in values.items():
        if isinstance(value, list):
            for_yaml[name] = value
        else:
            flags.append(f"--{name}={value}")  # '=' keeps a negative number from reading as a flag
    return flags, for_yaml


def method_extras(method: str) -> tuple[list[str], dict[str, Any]]:
    """What each method needs besides model and data: (command-line flags, trainer keyword arguments)."""
    if method in ("grpo", "rloo"):
        return (["--reward_funcs", "format", "--num_generations", "2", "--max_completion_length", "4"],
                {"reward_funcs": ["format"]})
    if method == "online-dpo":
        return ["--reward_funcs", "format", "--max_completion_length", "4"], {"reward_funcs": ["format"]}
    return [], {}


def config_defaults(method: str) -> dict[str, Any]:
    """Small, fast settings shared by every case of a method (a case's own config wins)."""
    defaults: dict[str, Any] = {"max_steps": 1, "save_strategy": "no", "per_device_train_batch_size": 2}
    if method in ("grpo", "rloo"):
        defaults.update(num_generations=2, max_completion_length=4)
    if method == "online-dpo":
        defaults.update(max_completion_length=4)
    return defaults
