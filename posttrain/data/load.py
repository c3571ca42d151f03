"""Load a dataset from whatever a user points at: a ``Dataset``, a ``DatasetDict``, a local file,
a local folder, a hub id, or a mixture of several of these.

Every dataset loaded from a path remembers where it came from (a marker in
``dataset.info.description``), so that a later validation error can name the file. Datasets from
the hub or built in memory fall back to a name the caller gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from posttrain.errors import ConfigError, DataError

SOURCE_MARKER = "posttrain-source:"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_SPLIT_ALIASES = {
    "train": ("train", "training"),
    "test": ("test", "testing"),
    "validation": ("validation", "valid", "val", "dev", "eval"),
}
_SPLIT_SEPARATORS = re.compile(r"[-_.]")


# ----------------------------------------------------------------------------- source tracking


def mark_source(dataset: Dataset, source: str) -> Dataset:
    """Record ``source`` (a path or a name) on ``dataset``; survives ``map``/``select``/``filter``."""
    dataset.info.description = SOURCE_MARKER + source
    return dataset


def source_name(dataset: Any) -> str | None:
    """The path or name recorded by :func:`mark_source`, or ``None`` when there is none."""
    info = getattr(dataset, "info", None)
    description = getattr(info, "description", None) or ""
    if description.startswith(SOURCE_MARKER):
        return description[len(SOURCE_MARKER) :]
    return None


def describe_source(dataset: Any, fallback: str = "dataset") -> str:
    """A name for ``dataset`` to put in error messages: its file path when it came from one."""
    return source_name(dataset) or fallback


# ----------------------------------------------------------------------------- single sources


def load_data(
    spec: Any,
    *,
    config_name: str | None = None,
    split: str = "train",
    data_files: Any = None,
    seed: int = 0,
) -> Dataset:
    """Load one split of a dataset as a ``datasets.Dataset``.

    Args:
        spec: a ``Dataset`` (returned as is); a ``DatasetDict`` (``split`` is taken); a path to a
            ``.json``/``.jsonl``/``.csv``/``.parquet`` file; a folder of such files (files named
            after splits, e.g. ``train.jsonl``/``test.jsonl``, are picked by ``split``) or made by
            ``save_to_disk``; a hub id (needs a network); or a list of mixture entries
            (see :func:`load_mixture`).
        config_name: the hub dataset's configuration (subset) name.
        split: which split to return.
        data_files: passed to ``datasets.load_dataset`` for hub ids and builder names
            (e.g. ``spec="json", data_files="a.jsonl"``); for a local folder, files inside it.
        seed: seeds the subsampling and shuffling of a mixture.

    Raises:
        DataError: the path does not exist, a file is malformed (names the file and the line),
            the split is missing (lists the ones there are), or a hub id could not be loaded.
    """
    if isinstance(spec, Dataset):
        return spec
    if isinstance(spec, DatasetDict) or (
        isinstance(spec, Mapping) and spec and all(isinstance(v, Dataset) for v in spec.values())
    ):
        return _pick_split(spec, split, source=source_name(next(iter(spec.values()), None)) or "dataset")
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        return load_mixture(list(spec), seed=seed, split=split)
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(
            f"cannot load a dataset from a {type(spec).__name__}",
            expected="a datasets.Dataset, a DatasetDict, a file or folder path, or a hub id",
            found=type(spec).__name__,
            fix="pass one of those",
        )

    path = os.path.expanduser(os.fspath(spec))
    if os.path.isfile(path):
        return _load_file(path)
    if os.path.isdir(path):
        return _load_folder(path, split, data_files)
    if _looks_like_local_path(path):
        raise DataError(
            "no such file or folder",
            source=path,
            fix="check the path (relative paths start from the working directory "
            f"{os.getcwd()!r})",
        )
    return _load_hub(path, config_name, split, data_files)


def _looks_like_local_path(path: str) -> bool:
    """True when ``path`` cannot be a hub id: it has a file extension, or starts like a path."""
    if os.path.splitext(path)[1].lower() in FILE_BUILDERS or path.endswith((".arrow", ".txt")):
        return True
    # hub ids are "name" or "owner/name"
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path


def _load_file(path: str) -> Dataset:
    extension = os.path.splitext(path)[1].lower()
    builder = FILE_BUILDERS.get(extension)
    if builder is None:
        raise DataError(
            f"unsupported file type {extension or '(none)'!r}",
            source=path,
            expected="a .json, .jsonl, .csv or .parquet file",
            fix="convert the file to JSON lines (one object per line) or parquet",
        )
    if os.path.getsize(path) == 0:
        raise _empty_file_error(path)
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as error:  # noqa: BLE001 - any reader failure becomes one DataError naming the file
        if builder in ("json", "csv"):
            _diagnose_text_file(path, builder)  # raises naming the line when it finds the problem
        raise DataError(
            f"could not read the file ({type(error).__name__}: {_root_message(error)})",
            source=path,
            fix=f"check that it is a valid {extension} file",
        ) from error
    if builder == "json":
        _check_text_is_valid(dataset, path)
        dataset = _reencode_mixed_columns(dataset, path)
    return mark_source(dataset, path)


def _check_text_is_valid(dataset: Dataset, path: str) -> None:
    """The JSON reader copies bytes that are not UTF-8 into string columns unchecked; reading such
    a row later raises deep inside a run. Arrow's full validation finds them in one pass."""
    try:
        dataset.data.table.validate(full=True)
    except pa.ArrowInvalid as error:
        _diagnose_text_file(path, "json")
        raise DataError(f"the file holds invalid text ({_root_message(error)})", source=path,
                        fix="re-save the file as UTF-8 JSON lines") from error


def _reencode_mixed_columns(dataset: Dataset, path: str) -> Dataset:
    """Re-read, from the file, each column whose values differ in type from row to row.

    ``datasets`` stores such values as JSON text, but keeps a string that happens to parse as JSON
    unquoted: the string " 1" comes back as the number 1, "true" as True. Validation would then
    blame the wrong row (and training would see other data than the file holds), so each such
    column is encoded again from the file, value by value."""
    table = dataset.data.table
    mixed = [name for name, feature in dataset.features.items()
             if _holds_json(feature) and _json_leaves_hold_scalars(table.column(name))]
    if not mixed:
        return dataset  # e.g. messages whose keys differ: each JSON value is a whole object, stored faithfully
    with open(path, encoding="utf-8-sig") as handle:
        text = handle.read()
    try:
        stripped = text.lstrip()
        rows = json.loads(stripped) if stripped.startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                       if line.strip()]
    except json.JSONDecodeError:
        return dataset  # a layout the reader understood and this does not (e.g. one {"data": [...]} object)
    if not isinstance(rows, list) or len(rows) != len(dataset) or not all(isinstance(r, dict) for r in rows):
        return dataset
    for name in mixed:
        feature = dataset.features[name]
        try:
            storage = pa.array([_json_storage(row.get(name), feature) for row in rows])
            column = datasets.table.cast_array_to_feature(storage, feature)
        except (pa.ArrowException, TypeError, ValueError):
            continue  # keep the reader's values
        table = table.set_column(table.schema.get_field_index(name), name, column)
    # a fingerprint derived from the reader's, which would otherwise be computed by hashing the table
    return Dataset(datasets.table.InMemoryTable(table), info=dataset.info.copy(),
                   fingerprint=hashlib.sha256(f"{dataset._fingerprint}:{mixed}".encode()).hexdigest()[:16])


def _json_leaves_hold_scalars(column: Any) -> bool:
    """True when some JSON-text value of ``column`` is not an object (so it may be a mangled string)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        if _is_json_array(chunk):
            texts = chunk.storage
            if pc.any(pc.invert(pc.starts_with(texts, "{"))).as_py():
                return True
        elif pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            if _json_leaves_hold_scalars(chunk.flatten()):
                return True
        elif pa.types.is_struct(chunk.type):
            if any(_json_leaves_hold_scalars(child) for child in chunk.flatten()):
                return True
    return False


def _is_json_array(array: Any) -> bool:
    return getattr(array.type, "extension_name", None) == "arrow.json"


def _holds_json(feature: Any) -> bool:
    if isinstance(feature, datasets.Json):
        return True
    if isinstance(feature, dict):
        return any(_holds_json(inner) for inner in feature.values())
    inner = getattr(feature, "feature", None)
    return inner is not None and _holds_json(inner)


def _json_storage(value: Any, feature: Any) -> Any:
    """``value`` with every part that ``feature`` stores as JSON text written as JSON text."""
    if value is None:
        return None
    if isinstance(feature, datasets.Json):
        return json.dumps(value)
    if isinstance(feature, dict) and isinstance(value, dict):
        return {key: _json_storage(value.get(key), inner) for key, inner in feature.items()}
    inner = getattr(feature, "feature", None)
    if inner is not None and isinstance(value, list):
        return [_json_storage(item, inner) for item in value]
    return value


def _empty_file_error(path: str, problem: str = "the file is empty") -> DataError:
    return DataError(problem, source=path, expected="at least one row",
                     fix="check that the file was written completely, or point at another file")


def _diagnose_text_file(path: str, builder: str) -> None:
    """Find what made the reader fail in a text file: its own errors name neither file nor line.

    Runs only on failure, so valid files load at the reader's speed."""
    with open(path, "rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
            try:
                raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                column = len(raw_line[: error.start].decode("utf-8", errors="replace")) + 1
                raise DataError(
                    f"the file is not UTF-8 text: byte 0x{raw_line[error.start]:02x} at character {column}",
                    source=path,
                    line=number,
                    expected="UTF-8 text",
                    found=raw_line[max(0, error.start - 20) : error.start + 20].decode("utf-8", errors="replace").strip(),
                    fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)",
                ) from None
    with open(path, encoding="utf-8-sig") as handle:
        lines = [line for line in handle if line.strip()]
    if not lines:
        raise _empty_file_error(path, "the file is empty (blank lines only)")
    if builder == "csv" and len(lines) == 1:
        raise _empty_file_error(path, "the file has a header line but no rows")
    if builder == "json":
        _diagnose_json_file(path)


def _diagnose_json_file(path: str) -> None:
    """Find the malformed line of a JSON / JSON-lines file the arrow reader could not read."""
    with open(path, encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
        if head.startswith("["):  # a JSON array: one document
            handle.seek(0)
            try:
                document = json.load(handle)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"malformed JSON ({error.msg}, character {error.colno})",
                    source=path,
                    line=error.lineno,
                    fix="fix that line, or write one JSON object per line (.jsonl)",
                ) from error
            if document == []:
                raise _empty_file_error(path, "the file is empty (a JSON array with no rows)")
            return
        handle.seek(0)
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                if number == 1 and head.startswith("{") and _is_single_json_document(path):
                    return  # a pretty-printed JSON object, e.g. {"data": [...]}: leave it to the reader
                raise DataError(
                    f"malformed JSON ({error.msg}, character {error.colno})",
                    source=path,
                    line=number,
                    found=line.strip()[:80],
                    fix="fix that line: each line must be one complete JSON object",
                ) from error
            if not isinstance(value, dict):
                raise DataError(
                    "each line must be a JSON object",
                    source=path,
                    line=number,
                    expected="an object like {\"prompt\": ..., \"completion\": ...}",
                    found=type(value).__name__,
                    fix="wrap each row in an object whose keys are the column names",
                )


def _is_single_json_document(path: str) -> bool:
    with open(path, encoding="utf-8") as handle:
        try:
            json.load(handle)
        except json.JSONDecodeError:
            return False
    return True


def _root_message(error: BaseException) -> str:
    """The innermost cause's message: the reader's wrappers say only that 'an error occurred'."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _split_of(file_path: str, folder: str) -> str | None:
    """The split a file belongs to by its name (``train.jsonl``, ``test-00000-of-00002.parquet``,
    ``validation/part.jsonl``), or ``None`` when the name says nothing."""
    relative = os.path.relpath(file_path, folder)
    parts = relative.split(os.sep)
    candidates = [os.path.splitext(parts[-1])[0]] + parts[:-1][::-1]
    for candidate in candidates:
        first_word = _SPLIT_SEPARATORS.split(candidate.lower())[0]
        for split, aliases in _SPLIT_ALIASES.items():
            if first_word in aliases:
                return split
    return None


def _load_folder(folder: str, split: str, data_files: Any) -> Dataset:
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")) or os.path.isfile(
        os.path.join(folder, "state.json")
    ):
        loaded = datasets.load_from_disk(folder)
        if isinstance(loaded, DatasetDict):
            return mark_source(_pick_split(loaded, split, source=folder), f"{folder} [{split}]")
        return mark_source(loaded, folder)

    if data_files is not None:
        names = [data_files] if isinstance(data_files, str) else list(data_files)
        files = [os.path.join(folder, name) for name in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DataError("data file not found", source=missing[0], fix="check data_files")
    else:
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(folder)
            for name in names
            if os.path.splitext(name)[1].lower() in FILE_BUILDERS and not name.startswith(".")
        )
    if not files:
        raise DataError(
            "the folder holds no data files",
            source=folder,
            expected=".json, .jsonl, .csv or .parquet files, or a save_to_disk dataset",
            fix="point at a file, or put data files (e.g. train.jsonl) in the folder",
        )

    by_split: dict[str, list[str]] = {}
    for file in files:
        by_split.setdefault(_split_of(file, folder) or "", []).append(file)
    if set(by_split) == {""}:
        by_split = {"train": by_split[""]}  # no file is named after a split: they are all training data
    else:
        by_split.pop("", None)
    wanted = _canonical_split(split)
    if wanted not in by_split:
        raise DataError(
            f"no {split!r} split in the folder",
            source=folder,
            expected=f"a file named after the split, e.g. {split}.jsonl",
            found=f"splits {sorted(by_split)}",
            fix=f"use one of {sorted(by_split)} as the split, or add a {split} file",
        )
    chosen = by_split[wanted]
    parts = [_load_file(file) for file in chosen]
    if len(parts) == 1:
        return parts[0]
    dataset = _concatenate(parts, [os.path.relpath(f, folder) for f in chosen], source=folder)
    return mark_source(dataset, folder)


def _canonical_split(split: str) -> str:
    lowered = split.lower()
    for canonical, aliases in _SPLIT_ALIASES.items():
        if lowered in aliases:
            return canonical
    return lowered


def _pick_split(splits: Mapping[str, Any], split: str, *, source: str) -> Dataset:
    if split in splits:
        return splits[split]
    wanted = _canonical_split(split)
    for name in splits:
        if _canonical_split(name) == wanted:
            return splits[name]
    available = sorted(splits)
    raise DataError(
        f"no {split!r} split",
        source=source,
        found=f"splits {available}",
        fix=f"choose one of {available}" + (f", e.g. split={available[0]!r}" if available else ""),
    )


def _load_hub(name: str, config_name: str | None, split: str, data_files: Any) -> Dataset:
    try:
        dataset = datasets.load_dataset(name, config_name, split=split, data_files=data_files)
    except Exception as error:  # noqa: BLE001 - the hub raises many types; all mean "could not load"
        raise DataError(
            f"could not load dataset {name!r}: it is not a local file or folder, and loading it "
            f"as a hub id failed ({type(error).__name__}: {_root_message(error)})",
            fix="pass a local path (a .jsonl/.json/.csv/.parquet file or a folder), or check the "
            "id, the network and the config/split names",
        ) from error
    if isinstance(dataset, DatasetDict):
        dataset = _pick_split(dataset, split, source=name)
    return mark_source(dataset, name if data_files is None else f"{name}:{data_files}")


# ----------------------------------------------------------------------------- mixtures

_MIXTURE_KEYS = {"path", "name", "split", "proportion", "rows", "data_files"}


def load_mixture(entries: Iterable[Mapping[str, Any]], *, seed: int = 0, split: str = "train") -> Dataset:
    """Sample several sources and shuffle them into one dataset.

    Each entry is a dict ``{"path": ..., "name": config (optional), "split": (optional, default
    ``split``), "proportion": fraction in (0, 1]`` or ``"rows": count}`` (neither: all rows).
    Rows are drawn without replacement, deterministically for a given ``seed``.

    Raises:
        ConfigError: an entry is malformed.
        DataError: a source cannot be loaded, or the sources' columns differ.
    """
    entries = list(entries)
    if not entries:
        raise ConfigError("the dataset mixture is empty", field="datasets", fix="list at least one source")
    parts, names = [], []
    for index, entry in enumerate(entries):
        field = f"datasets[{index}]"
        if not isinstance(entry, Mapping) or "path" not in entry:
            raise ConfigError(
                "each mixture entry must be a mapping with a 'path'", field=field, fix="write {path: data.jsonl}"
            )
        unknown = set(entry) - _MIXTURE_KEYS
        if unknown:
            raise ConfigError(
                f"unknown key(s) {sorted(unknown)}", field=field, fix=f"use only {sorted(_MIXTURE_KEYS)}"
            )
        if "proportion" in entry and "rows" in entry:
            raise ConfigError("give either 'proportion' or 'rows', not both", field=field, fix="drop one of them")
        dataset = load_data(
            entry["path"],
            config_name=entry.get("name"),
            split=entry.get("split") or split,
            data_files=entry.get("data_files"),
        )
        count = _rows_to_take(entry, len(dataset), field)
        if count < len(dataset):
            dataset = dataset.shuffle(seed=seed + index).select(range(count))
        parts.append(dataset)
        names.append(describe_source(dataset, fallback=str(entry["path"])))
    mixed = _concatenate(parts, names, source="dataset mixture") if len(parts) > 1 else parts[0]
    mixed = mixed.shuffle(seed=seed).flatten_indices()
    return mark_source(mixed, "mixture of " + ", ".join(names))


def _rows_to_take(entry: Mapping[str, Any], available: int, field: str) -> int:
    if "rows" in entry:
        rows = entry["rows"]
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(f"rows must be a positive integer, got {rows!r}", field=f"{field}.rows", fix="e.g. rows: 1000")
        if rows > available:
            raise ConfigError(
                f"asks for {rows} rows but the source has {available}",
                field=f"{field}.rows",
                fix=f"use at most {available}, or a proportion",
            )
        return rows
    proportion = entry.get("proportion", 1.0)
    if isinstance(proportion, bool) or not isinstance(proportion, (int, float)) or not 0 < proportion <= 1:
        raise ConfigError(
            f"proportion must be a number in (0, 1], got {proportion!r}",
            field=f"{field}.proportion",
            fix="e.g. proportion: 0.5",
        )
    return max(1, round(proportion * available))


def _concatenate(parts: list[Dataset], names: list[str], *, source: str) -> Dataset:
    reference = parts[0]
    for part, name in zip(parts[1:], names[1:]):
        missing = sorted(set(reference.column_names) - set(part.column_names))
        extra = sorted(set(part.column_names) - set(reference.column_names))
        if missing or extra:
            raise DataError(
                f"the sources of {source} have different columns ({names[0]} vs {name})",
                source=name,
                expected=f"columns {sorted(reference.column_names)}",
                found=f"columns {sorted(part.column_names)}",
                fix="give every source the same columns (rename, or drop "
                + (f"{extra}" if extra else f"add {missing}")
                + ")",
            )
    try:
        aligned = [parts[0]] + [p.select_columns(reference.column_names).cast(reference.features) for p in parts[1:]]
        return datasets.concatenate_datasets(aligned)
    except Exception as error:  # noqa: BLE001 - arrow type conflicts come in several exception types
        raise DataError(
            f"the sources of {source} have the same columns but incompatible types "
            f"({type(error).__name__}: {_root_message(error)})",
            source=source,
            expected=f"features {reference.features}",
            fix="make each column hold the same kind of value in every source",
        ) from error
