"""Streaming datasets (``datasets.IterableDataset``): rows read in order, with no length.

The data layer reads a stream's first rows to detect its format and check them before training;
the rest are tokenized (and packed) lazily, as training reads them.
"""

from __future__ import annotations

# rows of a streaming dataset read ahead to detect its format and check its rows before training
STREAM_SAMPLE_ROWS = 256


def is_streaming(dataset) -> bool:
    """True for a ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``): no length, read in order."""
    from datasets import IterableDataset

    return isinstance(dataset, IterableDataset)


def streamed_sample(dataset, rows: int = STREAM_SAMPLE_ROWS):
    """The first ``rows`` rows of a streaming dataset as a ``datasets.Dataset`` (the dataset itself otherwise)."""
    if not is_streaming(dataset):
        return dataset
    from datasets import Dataset

    return Dataset.from_list(list(dataset.take(rows)))


def column_names_of(dataset) -> list[str]:
    """Column names, also of a streaming dataset whose features are unknown until read."""
    names = getattr(dataset, "column_names", None)
    if names is None and is_streaming(dataset):
        names = streamed_sample(dataset, 1).column_names
    return list(names or [])
