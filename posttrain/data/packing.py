"""Pack tokenized SFT rows into fewer, fuller rows.

A packed row holds several whole sequences back to back. ``position_ids`` restart at 0 where each
sequence starts: given position ids and no attention mask, transformers keeps every sequence's
attention inside that sequence (see :mod:`posttrain.data.collate`), so packing changes the speed,
not the loss.

Token columns are handled as flat Arrow/NumPy arrays; only the bin assignment is a Python loop
(one ``bisect`` per sequence).
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from datasets.fingerprint import Hasher

from posttrain.data.formats import column_array
from posttrain.data.load import mark_source, source_name
from posttrain.data.streaming import column_names_of
from posttrain.errors import ConfigError, DataError

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Assign items to bins of ``capacity`` by best-fit decreasing.

    Items are taken longest first; each goes into the open bin whose free space is smallest but
    still enough (a new bin if none). Free spaces are kept as a sorted list of distinct values
    (at most ``capacity`` of them), each with a stack of bins, so each step is one ``bisect``.

    Args:
        lengths: (N,) item sizes, each in [1, capacity].

    Returns:
        the bins, each a list of item indices in the order they were placed.
    """
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free space values of open bins
    bins_by_free: dict[int, list[int]] = {}
    for item in order.tolist():
        size = int(lengths[item])
        slot = bisect_left(free_sizes, size)
        if slot == len(free_sizes):
            bin_index, free = len(bins), capacity
            bins.append([])
        else:
            free = free_sizes[slot]
            stack = bins_by_free[free]
            bin_index = stack.pop()
            if not stack:
                del bins_by_free[free]
                free_sizes.pop(slot)
        bins[bin_index].append(item)
        remaining = free - size
        if remaining > 0:
            if remaining not in bins_by_free:
                bins_by_free[remaining] = []
                insort(free_sizes, remaining)
            bins_by_free[remaining].append(bin_index)
    return bins


def _list_array(offsets: np.ndarray, values: pa.Array | np.ndarray) -> pa.Array:
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)


def _lengths(array: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.list_value_length(array), 0), dtype=np.int64)


def _flat_values(array: pa.Array) -> pa.Array:
    """The values of a list array in row order (zero-copy unless the array is a taken/sliced view)."""
    return pc.list_flatten(array)


def _positions(piece_lengths: np.ndarray) -> np.ndarray:
    """Each token's position inside its piece: 0, 1, ..., n-1 for each piece, concatenated."""
    total = int(piece_lengths.sum())
    positions = np.arange(total, dtype=np.int32)
    positions -= np.repeat((np.cumsum(piece_lengths) - piece_lengths).astype(np.int32), piece_lengths)
    return positions


def _split_long_sequences(ids: pa.Array, mask: pa.Array | None, lengths: np.ndarray, max_length: int):
    """Every sequence cut into consecutive pieces of at most ``max_length`` tokens, as list arrays of
    pieces (the token stream is unchanged: only the boundaries are added), and the pieces' lengths."""
    pieces_per_sequence = -(-lengths // max_length)
    sequence_of_piece = np.repeat(np.arange(len(lengths)), pieces_per_sequence)
    first_piece = np.cumsum(pieces_per_sequence) - pieces_per_sequence
    index_in_sequence = np.arange(len(sequence_of_piece)) - np.repeat(first_piece, pieces_per_sequence)
    sequence_starts = np.cumsum(lengths) - lengths
    piece_starts = sequence_starts[sequence_of_piece] + index_in_sequence * max_length
    piece_lengths = np.minimum(max_length, lengths[sequence_of_piece] - index_in_sequence * max_length)
    offsets = np.append(piece_starts, lengths.sum())
    split_mask = _list_array(offsets, _flat_values(mask)) if mask is not None else None
    return _list_array(offsets, _flat_values(ids)), split_mask, piece_lengths.astype(np.int64)


def pack_dataset(dataset: Dataset, max_length: int, *, strategy: str = "bfd") -> Dataset:
    """Pack tokenized rows (``input_ids`` and, if present, ``completion_mask``) into rows of at
    most ``max_length`` tokens.

    Strategies:
        ``"bfd"``: best-fit decreasing over whole sequences; a sequence longer than ``max_length``
            is first truncated to its first ``max_length`` tokens.
        ``"bfd_split"``: the same, but a longer sequence is first split into pieces of
            ``max_length`` tokens (the last one shorter), packed as sequences of their own: no token
            is lost, and each piece starts at position 0.
        ``"wrapped"``: all sequences concatenated in order and cut every ``max_length`` tokens; a
            sequence may continue on the next row (its piece there starts at position 0).

    Returns:
        a dataset with ``input_ids``, ``completion_mask``, ``position_ids`` (restarting at 0 at each
        sequence or piece) and ``seq_lengths`` (the lengths of the pieces in the row). Other
        columns are dropped.
    """
    if strategy not in PACKING_STRATEGIES:
        raise ConfigError(f"unknown packing strategy {strategy!r}", field="packing_strategy",
                          fix="use 'bfd', 'bfd_split' or 'wrapped'")
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"packing needs a positive max_length, got {max_length!r}", field="max_length", fix="e.g. 1024")
    if "input_ids" not in dataset.column_names:
        raise DataError(
            "packing needs tokenized rows",
            source=source_name(dataset),
            expected="an 'input_ids' column",
            found=f"columns {dataset.column_names}",
            fix="tokenize the dataset first (posttrain.data.tokenize.tokenize_sft)",
        )
    ids = column_array(dataset, "input_ids")
    lengths = _lengths(ids)
    if "completion_mask" in dataset.column_names:
        mask = column_array(dataset, "completion_mask")
        mask_lengths = _lengths(mask)
        if not np.array_equal(mask_lengths, lengths):
            row = int(np.flatnonzero(mask_lengths != lengths)[0])
            raise DataError(
                "completion_mask and input_ids differ in length", source=source_name(dataset), row=row,
                column="completion_mask", expected=f"{lengths[row]} values", found=f"{mask_lengths[row]}",
                fix="build the mask from the same tokens",
            )
    else:
        mask = None

    if strategy == "bfd_split" and lengths.max(initial=0) > max_length:
        ids, mask, lengths = _split_long_sequences(ids, mask, lengths, max_length)
    if strategy in ("bfd", "bfd_split"):
        if lengths.max(initial=0) > max_length:
            ids = pc.list_slice(ids, 0, max_length)
            mask = pc.list_slice(mask, 0, max_length) if mask is not None else None
            lengths = np.minimum(lengths, max_length)
        keep = np.flatnonzero(lengths > 0)
        bins = best_fit_decreasing(lengths[keep], max_length)
        order = keep[np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(keep))]
        # whole rows are copied in bin order (contiguous copies, not a token-level gather)
        order_array = pa.array(order)
        packed_ids = _flat_values(pc.take(ids, order_array))
        packed_mask = _flat_values(pc.take(mask, order_array)) if mask is not None else None
        piece_lengths = lengths[order]
        pieces_per_row = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    else:
        # the token stream is left as it is: only the row boundaries change
        packed_ids = _flat_values(ids)
        packed_mask = _flat_values(mask) if mask is not None else None
        total = int(lengths.sum())
        sequence_starts = np.cumsum(lengths) - lengths
        piece_starts = np.union1d(sequence_starts[lengths > 0], np.arange(0, total, max_length))
        piece_lengths = np.diff(np.append(piece_starts, total))
        row_of_piece = piece_starts // max_length
        pieces_per_row = np.bincount(row_of_piece, minlength=int(row_of_piece[-1]) + 1 if len(row_of_piece) else 0)

    if packed_mask is None:
        packed_mask = pa.array(np.ones(len(packed_ids), dtype=np.int8))
    piece_offsets = np.concatenate([[0], np.cumsum(pieces_per_row)])
    row_tokens = np.add.reduceat(piece_lengths, piece_offsets[:-1]) if len(pieces_per_row) else np.zeros(0, np.int64)
    token_offsets = np.concatenate([[0], np.cumsum(row_tokens)])
    table = pa.table(
        {
            "input_ids": _list_array(token_offsets, packed_ids),
            "completion_mask": _list_array(token_offsets, packed_mask),
            "position_ids": _list_array(token_offsets, pa.array(_positions(piece_lengths))),
            "seq_lengths": _list_array(piece_offsets, pa.array(piece_lengths.astype(np.int64))),
        }
    )
    # a fingerprint from the inputs: letting datasets hash the new table costs seconds
    fingerprint = Hasher.hash((getattr(dataset, "_fingerprint", None), "posttrain.pack", strategy, max_length))
    packed = Dataset(table, fingerprint=fingerprint)
    source = source_name(dataset)
    return mark_source(packed, source) if source else packed


def pack_stream(dataset, max_length: int, *, strategy: str = "bfd", buffer_rows: int = 1000):
    """:func:`pack_dataset` on the fly for a streaming dataset: each run of ``buffer_rows`` tokenized
    rows is packed on its own as training reads it (a sequence is never packed with rows of another run)."""

    def pack_buffer(batch: dict[str, list]) -> dict[str, list]:
        return pack_dataset(Dataset.from_dict(batch), max_length, strategy=strategy).to_dict()

    return dataset.map(pack_buffer, batched=True, batch_size=buffer_rows, remove_columns=column_names_of(dataset))
