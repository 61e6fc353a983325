"""Weight datasets: sharded, resumable, atomically written ``datasets`` storage for harvested weights.

A method passes its schema (``datasets.Features``), the columns that hold weights (stored as float32
or as bfloat16 bit patterns) and the metadata keys that identify a harvest; this module never names
a method. Layout of a weight dataset directory::

    README.md                           dataset card (``load_dataset(dir)`` reads its ``configs``)
    harvest.json                        metadata: where the weights come from, settings, counts
    data/train-00000-of-00004.arrow     one Arrow stream file per shard of ``shard_size`` source rows

Shards are Arrow files written by ``datasets``' own writer (features in the schema metadata), so
they memory-map with ``Dataset.from_file`` without any copy, and ``datasets.load_dataset(dir)``
loads them too. A shard is written batch by batch to a hidden temporary file and renamed into place
only once complete: a harvest killed at any point loses at most the shard it was writing. (Written
here because ``datasets`` has no resumable, atomic, append-by-shard writer.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets
from datasets.arrow_writer import ArrowWriter

HARVEST_METADATA_NAME = "harvest.json"
DATA_DIR = "data"
SPLIT = "train"
DATA_FILES_PATTERN = f"{DATA_DIR}/{SPLIT}-*.arrow"
STORAGE_DTYPES = ("float32", "bfloat16")


def check_storage_dtype(dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}.")


def storage_value_type(dtype: str) -> str:
    """The Arrow value type of a weight column stored in ``dtype`` (Arrow has no bfloat16: its bit patterns as int16)."""
    check_storage_dtype(dtype)
    return "float32" if dtype == "float32" else "int16"


def round_to_storage(weights: torch.Tensor, dtype: str) -> torch.Tensor:
    """The float32 values that storing ``weights`` in ``dtype`` keeps (bfloat16 rounding, or none)."""
    check_storage_dtype(dtype)
    if dtype == "bfloat16":
        return weights.to(torch.bfloat16).float()
    return weights.float()


def encode_weights(weights: torch.Tensor, dtype: str) -> np.ndarray:
    """Stored form of ``weights``: float32 values, or bfloat16 bit patterns as int16."""
    check_storage_dtype(dtype)
    if dtype == "bfloat16":
        return weights.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
    return weights.detach().to("cpu", torch.float32).numpy()


def decode_weights(values: np.ndarray | torch.Tensor, dtype: str) -> torch.Tensor:
    """Inverse of :func:`encode_weights`: float32 tensor of the stored values (exact)."""
    check_storage_dtype(dtype)
    tensor = torch.as_tensor(values)
    if dtype == "bfloat16":
        return tensor.to(torch.int16).view(torch.bfloat16).float()
    return tensor.float()


def shard_path(output_dir: str | os.PathLike, index: int, num_shards: int) -> Path:
    """Path of shard ``index`` (Hub naming: ``data/train-00003-of-00010.arrow``)."""
    return Path(output_dir) / DATA_DIR / f"{SPLIT}-{index:05d}-of-{num_shards:05d}.arrow"


class ShardWriter:
    """Context manager writing one shard batch by batch; the file appears only if the block completes.

    Rows go to a hidden temporary file next to the shard, which is flushed to disk and atomically
    renamed to ``path`` on a clean exit, and deleted if the block raises. Columns named in
    ``weight_columns`` are encoded in ``dtype`` (:func:`encode_weights`).
    """

    def __init__(
        self, path: str | os.PathLike, features: Features, dtype: str = "float32", weight_columns: Collection[str] = ()
    ) -> None:
        check_storage_dtype(dtype)
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp")
        self.features = features
        self.dtype = dtype
        self.weight_columns = set(weight_columns)
        self._writer: ArrowWriter | None = None

    def __enter__(self) -> "ShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ArrowWriter(features=self.features, path=str(self.tmp_path))
        return self

    def write(self, columns: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Append rows given as ``(batch, ...)`` tensors or arrays, one per column of the features."""
        missing = sorted(set(self.features) - set(columns))
        if missing:
            raise ValueError(f"Missing columns {missing} for this shard; expected {list(self.features)}.")
        batch = {}
        for name in self.features:
            value = columns[name]
            if name in self.weight_columns:
                batch[name] = encode_weights(torch.as_tensor(value), self.dtype)
            else:
                batch[name] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        self._writer.write_batch(batch)

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._writer.finalize()
        finally:
            self._writer.close()
        if exc_type is not None:
            self.tmp_path.unlink(missing_ok=True)
            return
        with open(self.tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp_path, self.path)


def write_metadata(output_dir: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Write ``harvest.json`` atomically (temporary file + rename)."""
    path = Path(output_dir) / HARVEST_METADATA_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_harvest_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``harvest.json`` metadata of the weight dataset in directory ``path``."""
    file = Path(path) / HARVEST_METADATA_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"No {HARVEST_METADATA_NAME} in {str(path)!r}: not a weight dataset. Create one with a harvest "
            "(e.g. ocd_hf.harvest_deltas(...))."
        )
    return json.loads(file.read_text(encoding="utf-8"))


def _differences(existing: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> list[str]:
    differences = []
    for key in sorted(set(existing) | set(expected)):
        old, new = existing.get(key), expected.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences += _differences(old, new, prefix=f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key} (directory: {old!r}, this call: {new!r})")
    return differences


def check_compatible(
    existing: Mapping[str, Any], expected: Mapping[str, Any], output_dir: str | os.PathLike, identity_keys: Sequence[str]
) -> None:
    """Refuse to continue a harvest whose directory was made with other settings (any of ``identity_keys`` differs)."""
    differences = _differences(
        {key: existing.get(key) for key in identity_keys}, {key: expected.get(key) for key in identity_keys}
    )
    if differences:
        raise ValueError(
            f"{str(output_dir)!r} holds a harvest made with other settings, so this call cannot "
            f"continue it: {'; '.join(differences)}. Use another output_dir, or repeat the original call to resume."
        )


def prepare_output_dir(
    output_dir: str | os.PathLike, metadata: Mapping[str, Any], identity_keys: Sequence[str], is_main_process: bool = True
) -> None:
    """Check that a harvest described by ``metadata`` may start or resume in ``output_dir``.

    The main process writes ``harvest.json`` (marked incomplete) when the directory is new.
    """
    output_dir = Path(output_dir)
    metadata_file = output_dir / HARVEST_METADATA_NAME
    if metadata_file.is_file():
        check_compatible(load_harvest_metadata(output_dir), metadata, output_dir, identity_keys)
        return
    if any((output_dir / DATA_DIR).glob(f"{SPLIT}-*.arrow")):
        raise ValueError(
            f"{str(output_dir / DATA_DIR)!r} holds shard files but {str(output_dir)!r} has no "
            f"{HARVEST_METADATA_NAME}: it was not made by a harvest. Use an empty output_dir."
        )
    if is_main_process:
        write_metadata(output_dir, {**metadata, "complete": False})


def pending_shards(output_dir: str | os.PathLike, num_shards: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
    """Shards of process ``process_index`` (every ``num_processes``-th) not yet written completely."""
    return [
        index
        for index in range(process_index, num_shards, num_processes)
        if not shard_path(output_dir, index, num_shards).is_file()
    ]


def open_shards(output_dir: str | os.PathLike, num_shards: int) -> list[Dataset]:
    """Every shard of a weight dataset, memory-mapped; ``ValueError`` naming the missing ones."""
    output_dir = Path(output_dir)
    missing = [index for index in range(num_shards) if not shard_path(output_dir, index, num_shards).is_file()]
    if missing:
        raise ValueError(
            f"Weight dataset {str(output_dir)!r} is incomplete: shards {missing} of {num_shards} are missing. "
            "Run the harvest again with the same arguments to resume."
        )
    return [Dataset.from_file(str(shard_path(output_dir, index, num_shards))) for index in range(num_shards)]


def summary(values: np.ndarray) -> dict[str, float]:
    """Mean, std, min and max of ``values`` (empty for no values)."""
    if values.size == 0:
        return {}
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()), "max": float(values.max())}


def finalize_weight_dataset(
    output_dir: str | os.PathLike, metadata: Mapping[str, Any], statistics_columns: Sequence[str] = ()
) -> tuple[dict[str, Any], Any]:
    """Validate every shard, count samples and skipped ids, measure sizes; return the final metadata
    (``complete``, counts, ``data_bytes``, ``bytes_per_sample``, ``statistics`` of ``statistics_columns``)
    and the concatenated Arrow table, for a method to add its own figures before :func:`write_metadata`.

    ``metadata`` needs ``num_shards``, ``harvest_config.shard_size`` and ``source.num_rows``. Raises
    ``ValueError`` if a shard is missing, or if ids are duplicated, out of order or out of range.
    """
    output_dir = Path(output_dir)
    num_shards = metadata["num_shards"]
    shard_size = metadata["harvest_config"]["shard_size"]
    num_rows = metadata["source"]["num_rows"]
    shards = open_shards(output_dir, num_shards)
    for index, shard in enumerate(shards):
        shard_ids = shard.data.column("id").to_numpy()
        if shard_ids.size and (shard_ids[0] < index * shard_size or shard_ids[-1] >= (index + 1) * shard_size):
            raise ValueError(
                f"Shard {index} of {str(output_dir)!r} holds ids outside [{index * shard_size}, {(index + 1) * shard_size}): "
                "it was not written by this harvest. Delete the directory and harvest again."
            )
    table = concatenate_datasets(shards).data
    ids = table.column("id").to_numpy()
    if ids.size and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= num_rows):
        raise ValueError(
            f"Weight dataset {str(output_dir)!r} is corrupt: ids must be unique, increasing and in [0, {num_rows}). "
            "Delete the directory and harvest again."
        )
    skipped = np.setdiff1d(np.arange(num_rows), ids)
    data_bytes = sum(shard_path(output_dir, index, num_shards).stat().st_size for index in range(num_shards))
    final = {
        **metadata,
        "complete": True,
        "num_samples": int(ids.size),
        "num_skipped_non_finite": int(skipped.size),
        "skipped_ids": skipped.tolist(),
        "data_bytes": int(data_bytes),
        "bytes_per_sample": float(data_bytes / ids.size) if ids.size else None,
        "statistics": {column: summary(table.column(column).to_numpy()) for column in statistics_columns},
    }
    for tmp in (output_dir / DATA_DIR).glob(".*.tmp"):
        tmp.unlink()
    return final, table


def _numpy_dtype(feature: Any) -> str:
    while not isinstance(feature, Value):
        feature = feature.feature if isinstance(feature, List) else Value(feature.dtype)
    return feature.dtype


def _bfloat16_transform(features: Features, weight_columns: Collection[str]):
    dtypes = {name: _numpy_dtype(feature) for name, feature in features.items()}

    def transform(batch: dict[str, list]) -> dict[str, torch.Tensor]:
        return {
            name: decode_weights(np.asarray(values, dtype=np.int16), "bfloat16")
            if name in weight_columns
            else torch.as_tensor(np.asarray(values, dtype=dtypes[name]))
            for name, values in batch.items()
        }

    return transform


def format_weights(dataset: Dataset, dtype: str, weight_columns: Collection[str]) -> Dataset:
    """``dataset`` (weight columns as stored) as torch tensors, the ``weight_columns`` decoded to float32.

    float32 storage uses the ``"torch"`` format; bfloat16 storage a transform decoding the int16 bit
    patterns (it reads rows as Python lists, about 2 ms per 10k-element matrix).
    """
    check_storage_dtype(dtype)
    if dtype == "bfloat16":
        return dataset.with_transform(_bfloat16_transform(dataset.features, set(weight_columns)))
    return dataset.with_format("torch")


def load_weight_dataset(path: str | os.PathLike, weight_columns: Collection[str]) -> Dataset:
    """A complete weight dataset, memory-mapped and formatted as torch tensors (:func:`format_weights`)."""
    metadata = load_harvest_metadata(path)
    if not metadata.get("complete"):
        raise ValueError(
            f"The harvest in {str(path)!r} is not complete. Run the harvest again with the same arguments to resume."
        )
    dataset = concatenate_datasets(open_shards(path, metadata["num_shards"]))
    return format_weights(dataset, metadata["harvest_config"]["dtype"], weight_columns)
