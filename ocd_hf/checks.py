"""Checks of user input at the public boundary, shared by every method: each raises a ``ValueError`` or
``TypeError`` naming the argument, the value and the fix, before any work or write happens."""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

# transformers' losses skip label -100; a per-sample delta needs a real label, so it is called out by name.
IGNORE_INDEX = -100
SHOWN = 5  # offending rows named in a message
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json")  # what Dataset / DatasetDict.save_to_disk write


def only_local(name_or_path: str) -> bool:
    """Whether ``name_or_path`` can only be a local path, not a Hub id (``namespace/name``): absolute, starting with
    ``.`` or ``~``, or with more than one ``/``. A missing one is then a missing directory, not a Hub lookup."""
    return Path(name_or_path).expanduser().is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return any((Path(path) / name).is_file() for name in SAVED_DATASET_FILES)


def check_int(name: str, value: Any, minimum: int, optional: bool = False, fix: str | None = None) -> None:
    """Refuse a ``value`` that is not an integer (``TypeError``; ``bool`` and floats included) or is below ``minimum``."""
    if value is None and optional:
        return
    advice = f" ({fix})" if fix else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} of type {type(value).__name__}{advice}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}{advice}.")


def check_number(name: str, value: Any, positive: bool, fix: str) -> None:
    """Refuse a ``value`` that is not a finite real number, or is not ``> 0`` (``positive``) / ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__} ({fix}).")
    bound = "> 0" if positive else ">= 0"
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value} ({fix}).")


def check_generator(generator: Any, name: str = "generator") -> None:
    """Refuse a ``generator`` that is neither ``None`` nor a ``torch.Generator`` (a seed passed as an int, say)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator or None, got {generator!r} of type {type(generator).__name__}; "
            f"for a seed, pass {name}=torch.Generator().manual_seed({generator if isinstance(generator, int) else 0})."
        )


def check_writable_dir(path: str | os.PathLike, name: str = "output_dir") -> Path:
    """Create directory ``path`` if needed and prove it writable with a probe file, so that a run fails before its work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise ValueError(
            f"{name}={str(path)!r} is not a writable directory ({type(error).__name__}: {error.strerror or error}). Choose a "
            "directory you can write to, or fix its permissions, before starting: nothing was computed."
        ) from error
    return path


def rows_named(positions: torch.Tensor, ids: Sequence[Any] | torch.Tensor | None) -> str:
    """The first offending rows, by id when ``ids`` are given, else by position."""
    shown = positions[:SHOWN].tolist()
    if ids is None:
        text = f"row(s) {shown} of the batch"
    else:
        text = f"row id(s) {[ids[i].item() if isinstance(ids, torch.Tensor) else ids[i] for i in shown]}"
    return text + (f" and {len(positions) - SHOWN} more" if len(positions) > SHOWN else "")


def check_class_labels(labels: Any, num_classes: int | None, name: str = "labels", ids: Sequence[Any] | torch.Tensor | None = None) -> torch.Tensor:
    """Class indices ``(batch,)`` as ``int64``; refuses fractional or non-finite floats, booleans, and labels outside
    ``[0, num_classes)`` (``-100``, transformers' ignore index, included), naming the rows (``ids`` or positions)."""
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be integer class indices, got dtype {labels.dtype}.")
    if labels.is_floating_point():
        bad = (~torch.isfinite(labels) | (labels != labels.round())).nonzero().flatten()
        if len(bad):
            raise ValueError(
                f"{name} must be integer class indices, got {labels.dtype} values such as {labels[bad[:SHOWN]].tolist()} at "
                f"{rows_named(bad, ids)}; pass integer labels (a fractional label is not a class)."
            )
    labels = labels.long()
    out_of_range = labels < 0
    if num_classes is not None:
        out_of_range |= labels >= num_classes
    bad = out_of_range.nonzero().flatten()
    if len(bad):
        values = labels[bad[:SHOWN]].tolist()
        ignore = (
            f" {IGNORE_INDEX} is transformers' ignore index: a per-sample fit needs a real label, so drop those rows."
            if IGNORE_INDEX in labels[bad].tolist() else ""
        )
        bound = f"[0, {num_classes})" if num_classes is not None else "0..N-1 (no negative labels)"
        raise ValueError(f"{name} must be class indices in {bound}; got {values} at {rows_named(bad, ids)}.{ignore}")
    return labels


def check_finite_inputs(inputs: Mapping[str, Any], ids: Sequence[Any] | torch.Tensor | None = None) -> None:
    """Refuse floating-point tensor inputs holding NaN or infinity (they would give NaN outputs and deltas without a word)."""
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            rows = (~torch.isfinite(value)).reshape(value.shape[0], -1).any(1).nonzero().flatten() if value.dim() else torch.zeros(1, dtype=torch.long)
            raise ValueError(f"Input {key!r} holds NaN or infinite values at {rows_named(rows, ids)}; clean or drop those rows first.")
