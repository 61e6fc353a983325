"""The batching contract shared by harvests and evaluations: ``(inputs, labels)`` batches from a list,
a DataLoader or a ``datasets.Dataset``, float columns of a dataset as tensors, and the split of a
loaded dataset that a command asked for."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict
from torch import nn
from torch.utils.data import DataLoader

Batch = tuple[dict[str, Any], torch.Tensor]
DEFAULT_SPLIT = "train"


def select_split(
    loaded: Dataset | DatasetDict, split: str | None, source: str, default: str | None = DEFAULT_SPLIT
) -> Dataset:
    """The split ``split`` of a loaded dataset (``source`` names it in errors), never silently another one.

    A ``DatasetDict`` must hold ``split``; with ``split=None`` its ``default`` split (``None`` for an
    evaluation, which must not default to training data), or its only split.
    A single ``Dataset`` (a ``save_to_disk`` directory of one split) is returned for ``split=None`` or
    for the split it was saved from (``Dataset.split``); any other ``split`` is a ``ValueError`` naming
    what the directory holds, since using the rows anyway could report training numbers as test numbers.
    """
    if isinstance(loaded, DatasetDict):
        if split is None and (default in loaded or len(loaded) == 1):
            split = default if default in loaded else next(iter(loaded))
        if split not in loaded:
            raise ValueError(
                f"{source!r} has no split {split!r}; its splits are {sorted(loaded)}. Pass one of them as split= (--split)."
            )
        return loaded[split]
    if split is not None and split != (str(loaded.split) if loaded.split is not None else None):
        holds = f"the split {str(loaded.split)!r}" if loaded.split is not None else "one dataset without split names"
        raise ValueError(
            f"{source!r} holds {holds}, not a split {split!r}: its rows would be used as {split!r} data. Drop split= "
            "(--split) to use this dataset as it is, or point at a directory saved with DatasetDict.save_to_disk "
            "that has the split."
        )
    return loaded


def column_tensor(dataset: Dataset, rows: slice | list[int], column: str) -> torch.Tensor:
    """One column of some rows as a float32 tensor, through the dataset's own format or transform
    (``load_deltas`` decodes bfloat16-stored deltas with a transform)."""
    subset = dataset.select_columns([column])
    if subset.format["type"] is None:
        subset = subset.with_format("numpy")
    values = subset[rows][column]
    if isinstance(values, torch.Tensor):
        return values.float()
    if isinstance(values, list) and values and isinstance(values[0], torch.Tensor):
        return torch.stack(values).float()
    return torch.as_tensor(np.asarray(values, dtype=np.float32))


def fixed_shape_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """A column of nested lists with the same length at every level (e.g. ``pixel_values`` made by ``.map``) as one
    numeric array ``(rows, *shape)`` (int64 or float32, as the numpy formatter gives), straight from its Arrow buffers;
    ``None`` when it is not one (ragged rows, nulls,
    non-numeric values, extension types such as ``Array3D``, which the numpy formatter reads fast itself).

    Hand-written because the numpy formatter of ``datasets`` converts nested lists row by row and level by level:
    25x slower than this on 28x28 images."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = [len(array)]
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        if array.null_count:
            return None
        lengths = pc.list_value_length(array)
        low, high = pc.min_max(lengths).values() if len(array) else (pa.scalar(0), pa.scalar(0))
        if low.as_py() != high.as_py():
            return None
        shape.append(high.as_py())
        array = array.flatten()  # the values of the rows in the slice only
    if array.null_count:
        return None
    # The numpy formatter's dtypes: int64 for integers, float32 for floats.
    if pa.types.is_integer(array.type):
        dtype = np.int64
    elif pa.types.is_floating(array.type):
        dtype = np.float32
    elif pa.types.is_boolean(array.type):
        dtype = np.bool_
    else:
        return None
    # A copy: a zero-copy view of the Arrow buffer is read-only, and a tensor made from it must be writable.
    return np.array(array.to_numpy(zero_copy_only=False), dtype=dtype).reshape(shape)


def split_batch(batch: Any) -> Batch:
    """``(inputs, labels)`` from an ``(inputs, labels)`` pair or a dict holding ``labels`` or ``label``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping):
        return dict(batch[0]), torch.as_tensor(batch[1])
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        for key in ("labels", "label"):
            if key in inputs:
                return inputs, torch.as_tensor(inputs.pop(key))
    raise ValueError(
        "Each batch must be an (inputs_dict, labels) pair or a dict with a 'labels' (or 'label') entry; "
        f"got {type(batch).__name__}."
    )


def iterate_batches(
    data: Iterable[Any] | Dataset,
    backbone: nn.Module,
    collate_fn: Callable[[list[dict]], Any] | None = None,
    batch_size: int = 32,
    label_column: str = "label",
) -> Iterable[Any]:
    """Batches from a list/DataLoader of batches, or from a ``datasets.Dataset``.

    A ``Dataset`` without ``collate_fn`` keeps the label column and the columns the backbone's
    ``forward`` accepts, as torch tensors (equal lengths needed: pad first or pass a
    ``DataCollatorWithPadding``). With ``collate_fn`` the rows are passed to it unchanged.
    """
    if not isinstance(data, Dataset):
        return data
    if label_column not in data.column_names:
        raise ValueError(f"The dataset has no label column {label_column!r} (columns: {data.column_names}); pass label_column=.")
    if collate_fn is not None:
        return DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)
    accepted = inspect.signature(backbone.forward).parameters
    inputs = [c for c in data.column_names if c in accepted and c not in (label_column, "labels")]
    if not inputs:
        raise ValueError(
            f"No column of the dataset ({data.column_names}) is an input of {type(backbone).__name__}.forward; "
            "tokenize/preprocess it first or pass collate_fn=."
        )
    table = data.with_format("torch", columns=[*inputs, label_column])

    def collate(rows: list[dict]) -> Batch:
        try:
            stacked = {c: torch.stack([row[c] for row in rows]) for c in inputs}
        except RuntimeError as error:
            raise ValueError(
                f"Cannot stack the dataset's columns {inputs} into a batch ({error}); pad them to equal length or pass "
                "collate_fn=transformers.DataCollatorWithPadding(tokenizer)."
            ) from error
        return stacked, torch.stack([row[label_column] for row in rows])

    return DataLoader(table, batch_size=batch_size, collate_fn=collate)


def to_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
