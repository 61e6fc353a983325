"""The delta dataset: schema, shard files written atomically (so a harvest can resume), the
``harvest.json`` metadata file, validation and loading.

Layout of a delta dataset directory::

    README.md                           dataset card (``load_dataset(dir)`` reads its ``configs``)
    harvest.json                        metadata: backbone, layer, fingerprint, harvest settings, counts
    data/train-00000-of-00004.arrow     one Arrow stream file per shard of ``shard_size`` source rows

Deltas are stored whole (``delta_storage="full"``: the ``(out, in)`` matrix ``delta``) or, for a
layer whose deltas are rank-1 with a right factor known from its input (see
:mod:`ocd_hf.factorised`), as their left factor (``"factorised"``: ``delta_factor``, ``out``
numbers, with ``Δ = u vᵀ`` and ``v`` given by ``harvest_config["factor_rule"]`` from
``layer_input``). :func:`materialise_deltas` gives full matrices for either storage.

Shards are Arrow files written by ``datasets``' own writer (features in the schema metadata), so
:func:`load_deltas` memory-maps them with ``Dataset.from_file`` without any copy, and
``datasets.load_dataset(dir)`` loads them too. A shard is written batch by batch to a hidden
temporary file and renamed into place only once complete: a harvest killed at any point loses at
most the shard it was writing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from datasets import Array2D, Array3D, Dataset, Features, List, Value, concatenate_datasets
from datasets.arrow_writer import ArrowWriter

from .configuration_ocd import BACKBONE_FIELDS
from .factorised import expand_factors

HARVEST_METADATA_NAME = "harvest.json"
DATA_DIR = "data"
SPLIT = "train"
DATA_FILES_PATTERN = f"{DATA_DIR}/{SPLIT}-*.arrow"
FORMAT_VERSION = 1
DELTA_DTYPES = ("float32", "bfloat16")
DELTA_STORAGES = ("full", "factorised")
# Columns holding deltas or their factors: float32 values, or bfloat16 bit patterns as int16.
DELTA_COLUMNS = ("delta", "trajectory", "delta_factor", "trajectory_factor")

# Metadata that must agree for a harvest to continue in an existing directory.
IDENTITY_KEYS = ("format_version", *BACKBONE_FIELDS, "harvest_config", "source", "num_shards")


def delta_features(
    *,
    in_features: int,
    out_features: int,
    output_dim: int,
    task: str,
    dtype: str = "float32",
    trajectory_steps: int | None = None,
    storage: str = "full",
) -> Features:
    """The ``datasets.Features`` of a delta dataset.

    ``storage="full"`` stores ``delta`` ``(out, in)`` and its ``rank1_energy``; ``"factorised"``
    stores the left factor ``delta_factor`` ``(out,)`` and the ``factor_residual`` measured on the
    real delta (and ``trajectory_factor`` ``(steps, out)`` instead of ``trajectory``). Deltas and
    factors hold float32 values, or for ``dtype="bfloat16"`` the bit patterns of the bfloat16
    values as int16 (Arrow has no bfloat16 type); :func:`load_deltas` decodes both to float32 tensors.
    """
    check_delta_dtype(dtype)
    check_delta_storage(storage)
    values = "float32" if dtype == "float32" else "int16"
    columns: dict[str, Any] = {"id": Value("int64"), "label": Value("int64" if task == "classification" else "float32")}
    if storage == "full":
        columns["delta"] = Array2D((out_features, in_features), values)
    else:
        columns["delta_factor"] = List(Value(values), length=out_features)
    columns["rho"] = Value("float32")
    columns["rank1_energy" if storage == "full" else "factor_residual"] = Value("float32")
    columns.update(
        {
            "layer_input": List(Value("float32"), length=in_features),
            "layer_output": List(Value("float32"), length=out_features),
            "model_output": List(Value("float32"), length=output_dim),
            "loss_before": Value("float32"),
            "loss_after": Value("float32"),
        }
    )
    if trajectory_steps is not None:
        if storage == "full":
            columns["trajectory"] = Array3D((trajectory_steps, out_features, in_features), values)
        else:
            columns["trajectory_factor"] = Array2D((trajectory_steps, out_features), values)
    return Features(columns)


def check_delta_dtype(dtype: str) -> None:
    if dtype not in DELTA_DTYPES:
        raise ValueError(f"dtype must be one of {DELTA_DTYPES}, got {dtype!r}.")


def check_delta_storage(storage: str) -> None:
    if storage not in DELTA_STORAGES:
        raise ValueError(f"delta_storage must be one of {DELTA_STORAGES}, got {storage!r}.")


def delta_storage(metadata: Mapping[str, Any]) -> str:
    """How the deltas described by harvest ``metadata`` are stored: ``"full"`` or ``"factorised"``."""
    return (metadata.get("harvest_config") or {}).get("delta_storage", "full")


def stored_factor_rule(metadata: Mapping[str, Any]) -> str:
    """The right-factor rule (``"sign"`` or ``"input"``) of a factorised delta dataset, from its metadata."""
    rule = (metadata.get("harvest_config") or {}).get("factor_rule")
    if rule is None:
        raise ValueError(
            "The deltas are stored as left factors (delta_factor), but the metadata given names no factor_rule "
            "(harvest_config['factor_rule']), so their right factor is unknown. Pass the dataset's own harvest metadata: "
            "ocd_hf.deltas.load_harvest_metadata(path), or the harvest directory itself."
        )
    return rule


def _as_float(values: Any) -> torch.Tensor:
    """A delta/factor column as float32; raw bfloat16 bit patterns (integers: rows read without
    :func:`load_deltas`' decoding) are decoded."""
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    return tensor.float() if tensor.is_floating_point() else decode_deltas(tensor, "bfloat16")


def materialise_deltas(rows_or_batch: Mapping[str, Any], metadata: Mapping[str, Any], column: str = "delta") -> torch.Tensor:
    """Full delta matrices of some rows of a delta dataset, whatever its storage.

    ``rows_or_batch`` is one row or a batch of rows (``dataset[i]``, ``dataset[a:b]``, ``dataset[[i, j]]``
    or a DataLoader batch of a dataset from :func:`load_deltas`); ``metadata`` its harvest metadata.
    Full storage returns the stored ``delta``; factorised storage expands ``u vᵀ`` from
    ``delta_factor`` and ``layer_input`` (so select only the rows you need: this allocates
    ``batch × out × in`` floats). ``column="trajectory"`` gives the per-step deltas instead.

    Returns:
        ``(batch, out, in)`` (``(batch, steps, out, in)`` for the trajectory), float32.
    """
    if column not in ("delta", "trajectory"):
        raise ValueError(f"column must be 'delta' or 'trajectory', got {column!r}.")
    rank = 2 if column == "delta" else 3
    if column in rows_or_batch:
        deltas = _as_float(rows_or_batch[column])
        return deltas.unsqueeze(0) if deltas.dim() == rank else deltas
    factor_column = f"{column}_factor"
    missing = [name for name in (factor_column, "layer_input") if name not in rows_or_batch]
    if missing:
        raise ValueError(
            f"Cannot materialise {column!r}: the rows have neither {column!r} nor {missing} (they have {sorted(rows_or_batch)}). "
            "Keep these columns when selecting, or store the trajectory at harvest time (store_trajectory=True)."
        )
    factors = _as_float(rows_or_batch[factor_column])
    layer_input = torch.as_tensor(rows_or_batch["layer_input"]).float()
    if layer_input.dim() == 1:
        factors, layer_input = factors.unsqueeze(0), layer_input.unsqueeze(0)
    return expand_factors(factors, layer_input.to(factors.device), stored_factor_rule(metadata))


def round_to_storage(deltas: torch.Tensor, dtype: str) -> torch.Tensor:
    """The float32 values that storing ``deltas`` in ``dtype`` keeps (bfloat16 rounding, or none)."""
    check_delta_dtype(dtype)
    if dtype == "bfloat16":
        return deltas.to(torch.bfloat16).float()
    return deltas.float()


def encode_deltas(deltas: torch.Tensor, dtype: str) -> np.ndarray:
    """Stored form of ``deltas``: float32 values, or bfloat16 bit patterns as int16."""
    check_delta_dtype(dtype)
    if dtype == "bfloat16":
        return deltas.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
    return deltas.detach().to("cpu", torch.float32).numpy()


def decode_deltas(values: np.ndarray | torch.Tensor, dtype: str) -> torch.Tensor:
    """Inverse of :func:`encode_deltas`: float32 tensor of the stored values (exact)."""
    check_delta_dtype(dtype)
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
    renamed to ``path`` on a clean exit, and deleted if the block raises.
    """

    def __init__(self, path: str | os.PathLike, features: Features, dtype: str = "float32") -> None:
        check_delta_dtype(dtype)
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp")
        self.features = features
        self.dtype = dtype
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
            if name in DELTA_COLUMNS:
                batch[name] = encode_deltas(torch.as_tensor(value), self.dtype)
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
    """The ``harvest.json`` metadata of the delta dataset in directory ``path``."""
    file = Path(path) / HARVEST_METADATA_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"No {HARVEST_METADATA_NAME} in {str(path)!r}: not a delta dataset. Create one with "
            "ocd_hf.harvest.harvest_deltas(...)."
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


def check_compatible(existing: Mapping[str, Any], expected: Mapping[str, Any], output_dir: str | os.PathLike) -> None:
    """Refuse to continue a harvest whose directory was made with another backbone, layer or settings."""
    differences = _differences(
        {key: existing.get(key) for key in IDENTITY_KEYS}, {key: expected.get(key) for key in IDENTITY_KEYS}
    )
    if differences:
        raise ValueError(
            f"{str(output_dir)!r} holds a delta harvest made with other settings, so this call cannot "
            f"continue it: {'; '.join(differences)}. Use another output_dir, or repeat the original call to resume."
        )


def prepare_output_dir(output_dir: str | os.PathLike, metadata: Mapping[str, Any], is_main_process: bool = True) -> None:
    """Check that a harvest described by ``metadata`` may start or resume in ``output_dir``.

    The main process writes ``harvest.json`` (marked incomplete) when the directory is new.
    """
    output_dir = Path(output_dir)
    metadata_file = output_dir / HARVEST_METADATA_NAME
    if metadata_file.is_file():
        check_compatible(load_harvest_metadata(output_dir), metadata, output_dir)
        return
    if any((output_dir / DATA_DIR).glob(f"{SPLIT}-*.arrow")):
        raise ValueError(
            f"{str(output_dir / DATA_DIR)!r} holds shard files but {str(output_dir)!r} has no "
            f"{HARVEST_METADATA_NAME}: it was not made by harvest_deltas. Use an empty output_dir."
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


def _open_shards(output_dir: Path, num_shards: int) -> list[Dataset]:
    missing = [index for index in range(num_shards) if not shard_path(output_dir, index, num_shards).is_file()]
    if missing:
        raise ValueError(
            f"Delta dataset {str(output_dir)!r} is incomplete: shards {missing} of {num_shards} are missing. "
            "Run harvest_deltas again with the same arguments to resume."
        )
    return [Dataset.from_file(str(shard_path(output_dir, index, num_shards))) for index in range(num_shards)]


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()), "max": float(values.max())}


def finalize_delta_dataset(output_dir: str | os.PathLike, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Validate every shard, count samples and skipped ids, measure sizes; write the final ``harvest.json``.

    Raises ``ValueError`` if a shard is missing, or if ids are duplicated, out of order or out of range.
    """
    output_dir = Path(output_dir)
    num_shards = metadata["num_shards"]
    shard_size = metadata["harvest_config"]["shard_size"]
    num_rows = metadata["source"]["num_rows"]
    shards = _open_shards(output_dir, num_shards)
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
            f"Delta dataset {str(output_dir)!r} is corrupt: ids must be unique, increasing and in [0, {num_rows}). "
            "Delete the directory and harvest again."
        )
    skipped = np.setdiff1d(np.arange(num_rows), ids)
    rho = table.column("rho").to_numpy()
    data_bytes = sum(shard_path(output_dir, index, num_shards).stat().st_size for index in range(num_shards))
    delta_itemsize = 4 if metadata["harvest_config"]["dtype"] == "float32" else 2
    full_delta_bytes = metadata["in_features"] * metadata["out_features"] * delta_itemsize
    factorised = delta_storage(metadata) == "factorised"
    shape_column = "factor_residual" if factorised else "rank1_energy"
    final = {
        **metadata,
        "complete": True,
        "num_samples": int(ids.size),
        "num_skipped_non_finite": int(skipped.size),
        "skipped_ids": skipped.tolist(),
        "data_bytes": int(data_bytes),
        "bytes_per_sample": float(data_bytes / ids.size) if ids.size else None,
        "delta_bytes_per_sample": metadata["out_features"] * delta_itemsize if factorised else full_delta_bytes,
        "full_delta_bytes_per_sample": full_delta_bytes,
        "statistics": {
            "rho": _summary(rho),
            "log_rho": _summary(np.log(rho[rho > 0])),
            shape_column: _summary(table.column(shape_column).to_numpy()),
            "loss_before": _summary(table.column("loss_before").to_numpy()),
            "loss_after": _summary(table.column("loss_after").to_numpy()),
        },
    }
    for tmp in (output_dir / DATA_DIR).glob(".*.tmp"):
        tmp.unlink()
    write_metadata(output_dir, final)
    return final


def _numpy_dtype(feature: Any) -> str:
    while not isinstance(feature, Value):
        feature = feature.feature if isinstance(feature, List) else Value(feature.dtype)
    return feature.dtype


def _bfloat16_transform(features: Features):
    dtypes = {name: _numpy_dtype(feature) for name, feature in features.items()}

    def transform(batch: dict[str, list]) -> dict[str, torch.Tensor]:
        return {
            name: decode_deltas(np.asarray(values, dtype=np.int16), "bfloat16")
            if name in DELTA_COLUMNS
            else torch.as_tensor(np.asarray(values, dtype=dtypes[name]))
            for name, values in batch.items()
        }

    return transform


def format_deltas(dataset: Dataset, dtype: str) -> Dataset:
    """``dataset`` (delta columns as stored) as torch tensors, the delta and factor columns decoded to float32.

    float32 storage uses the ``"torch"`` format; bfloat16 storage a transform decoding the int16 bit
    patterns (it reads rows as Python lists, about 2 ms per 10k-element delta).
    """
    check_delta_dtype(dtype)
    if dtype == "bfloat16":
        return dataset.with_transform(_bfloat16_transform(dataset.features))
    return dataset.with_format("torch")


def load_deltas(path: str | os.PathLike) -> Dataset:
    """Load a complete delta dataset as a memory-mapped ``datasets.Dataset`` formatted as torch tensors.

    ``delta`` (or, in factorised storage, ``delta_factor``) and ``trajectory`` (``trajectory_factor``)
    come back as float32 tensors whatever the storage dtype; rows are in increasing ``id`` order.
    Use :func:`load_harvest_metadata` for the backbone, layer and settings (``harvest_config``
    holds ``delta_storage`` and ``factor_rule``) and :func:`materialise_deltas` for full matrices.
    """
    metadata = load_harvest_metadata(path)
    if not metadata.get("complete"):
        raise ValueError(
            f"The harvest in {str(path)!r} is not complete. Run harvest_deltas again with the same arguments to resume."
        )
    dataset = concatenate_datasets(_open_shards(Path(path), metadata["num_shards"]))
    return format_deltas(dataset, metadata["harvest_config"]["dtype"])


def resolve_deltas(deltas: str | os.PathLike | tuple[Dataset, Mapping[str, Any]]) -> tuple[Dataset, dict[str, Any]]:
    """A delta dataset and its harvest metadata from a directory (:func:`load_deltas`) or a ``(dataset, metadata)`` pair."""
    if isinstance(deltas, (str, os.PathLike)):
        return load_deltas(deltas), dict(load_harvest_metadata(deltas))
    if isinstance(deltas, (tuple, list)) and len(deltas) == 2 and isinstance(deltas[0], Dataset) and isinstance(deltas[1], Mapping):
        return deltas[0], dict(deltas[1])
    raise TypeError(
        f"deltas must be a path to a delta dataset or a (datasets.Dataset, metadata dict) pair, got {type(deltas).__name__}."
    )
