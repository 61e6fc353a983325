"""OCD's delta dataset: the schema of one Linear's per-sample deltas on the shared weight-dataset storage.

Deltas are stored whole (``delta_storage="full"``: the ``(out, in)`` matrix ``delta``) or, for a
layer whose deltas are rank-1 with a right factor known from its input (see
:mod:`ocd_hf.factorised`), as their left factor (``"factorised"``: ``delta_factor``, ``out``
numbers, with ``Δ = u vᵀ`` and ``v`` given by ``harvest_config["factor_rule"]`` from
``layer_input``). :func:`materialise_deltas` gives full matrices for either storage. Sharding,
atomic writes, resumption and loading are :mod:`ocd_hf.weight_datasets`'.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch
from datasets import Array2D, Array3D, Dataset, Features, List, Value

from ... import weight_datasets
from ...factorised import RULE_FOR_OPTIMIZER, expand_factors, factorise_deltas
from ...logging import get_logger
from ...weight_datasets import (
    DATA_FILES_PATTERN,
    HARVEST_METADATA_NAME,
    SPLIT,
    round_to_storage,
    shard_path,
    write_metadata,
)
from ...weight_datasets import (
    STORAGE_DTYPES as DELTA_DTYPES,
)
from ...weight_datasets import (
    check_storage_dtype as check_delta_dtype,
)
from ...weight_datasets import (
    decode_weights as decode_deltas,
)
from ...weight_datasets import (
    encode_weights as encode_deltas,
)
from .configuration import BACKBONE_FIELDS

__all__ = [
    "DATA_FILES_PATTERN", "DELTA_COLUMNS", "DELTA_DTYPES", "DELTA_STORAGES", "HARVEST_METADATA_NAME", "SPLIT",
    "check_compatible", "check_delta_dtype", "decode_deltas", "delta_features", "delta_storage", "encode_deltas", "finalize_delta_dataset",
    "format_deltas", "load_deltas", "load_harvest_metadata", "materialise_deltas", "prepare_output_dir", "resolve_deltas",
    "round_to_storage", "shard_path", "stored_factor_rule",
]

logger = get_logger(__name__)

FORMAT_VERSION = 1
DELTA_STORAGES = ("full", "factorised")
# Columns holding deltas or their factors: float32 values, or bfloat16 bit patterns as int16.
DELTA_COLUMNS = ("delta", "trajectory", "delta_factor", "trajectory_factor")

# delta_mode="auto" is decided once per harvest: factorised when the mean relative residual ‖Δ − u vᵀ‖/‖Δ‖ over
# ALL deltas is at most this. Training refuses factorised deltas whose mean residual exceeds 0.05
# (training.MAX_FACTOR_RESIDUAL); residuals are >= 0, so any subset of at least half the rows (a training split)
# has a mean at most twice the whole mean: a decision below 0.025 is never refused by training.
AUTO_FACTORISED_MEAN_RESIDUAL = 0.025
DECISION_BATCH_SIZE = 256

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
    check_delta_storage(storage)
    values = weight_datasets.storage_value_type(dtype)
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
            "ocd_hf.load_harvest_metadata(path), or the harvest directory itself."
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


def load_harvest_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``harvest.json`` metadata of the delta dataset in directory ``path``."""
    try:
        return weight_datasets.load_harvest_metadata(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"No {HARVEST_METADATA_NAME} in {str(path)!r}: not a delta dataset. Create one with ocd_hf.harvest_deltas(...)."
        ) from error


def check_compatible(existing: Mapping[str, Any], expected: Mapping[str, Any], output_dir: str | os.PathLike) -> None:
    """Refuse to continue a delta harvest whose directory was made with another backbone, layer or settings."""
    weight_datasets.check_compatible(existing, expected, output_dir, IDENTITY_KEYS)


def prepare_output_dir(output_dir: str | os.PathLike, metadata: Mapping[str, Any], is_main_process: bool = True) -> None:
    """Check that a delta harvest described by ``metadata`` may start or resume in ``output_dir``."""
    weight_datasets.prepare_output_dir(output_dir, metadata, IDENTITY_KEYS, is_main_process)


def finalize_delta_dataset(output_dir: str | os.PathLike, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Validate every shard, count samples and skipped ids, measure sizes; write the final ``harvest.json``.

    Raises ``ValueError`` if a shard is missing, or if ids are duplicated, out of order or out of range.
    """
    factorised = delta_storage(metadata) == "factorised"
    shape_column = "factor_residual" if factorised else "rank1_energy"
    final, table = weight_datasets.finalize_weight_dataset(
        output_dir, metadata, statistics_columns=("rho", shape_column, "loss_before", "loss_after")
    )
    rho = table.column("rho").to_numpy()
    delta_itemsize = 4 if metadata["harvest_config"]["dtype"] == "float32" else 2
    full_delta_bytes = metadata["in_features"] * metadata["out_features"] * delta_itemsize
    final["delta_bytes_per_sample"] = metadata["out_features"] * delta_itemsize if factorised else full_delta_bytes
    final["full_delta_bytes_per_sample"] = full_delta_bytes
    final["statistics"]["log_rho"] = weight_datasets.summary(np.log(rho[rho > 0]))
    final["delta_mode_decision"] = decide_delta_mode(final, Dataset(table))
    logger.info(f"delta_mode='auto' will train {final['delta_mode_decision']['delta_mode']!r}: {final['delta_mode_decision']['reason']}")
    write_metadata(output_dir, final)
    return final


def decide_delta_mode(metadata: Mapping[str, Any], dataset: Dataset) -> dict[str, Any]:
    """What ``delta_mode="auto"`` trains on these deltas, decided once for the whole harvest, with the reason.

    ``"factorised"`` when the layer sees one vector per sample, its optimizer has a right-factor rule and the
    mean relative residual of ``Δ ≈ u vᵀ`` over every delta is at most :data:`AUTO_FACTORISED_MEAN_RESIDUAL`; else
    ``"full"``. The mean comes from the residual sums every shard recorded while harvesting (``shards[i].sums`` in
    ``metadata``); a harvest without them (made before they were recorded) reads every residual instead: stored
    factors carry theirs, full deltas are factorised here, ``DECISION_BATCH_SIZE`` at a time. Stored in
    ``harvest.json`` (``delta_mode_decision``), which training follows.
    """
    optimizer = str((metadata.get("harvest_config") or {}).get("optimizer", "")).lower()
    if metadata.get("per_token"):
        return {"delta_mode": "full", "reason": "the layer is applied to every token, so its deltas are not rank-1"}
    if optimizer not in RULE_FOR_OPTIMIZER:
        return {"delta_mode": "full", "reason": f"optimizer {optimizer!r} has no right-factor rule"}
    if len(dataset) == 0:
        return {"delta_mode": "full", "reason": "no delta to measure the rank on"}
    recorded = weight_datasets.column_mean(metadata, "factor_residual")
    if recorded is not None:
        mean, count = recorded
    else:
        mean, count = _mean_factor_residual(metadata, dataset, RULE_FOR_OPTIMIZER[optimizer])
    measured = (f"mean relative residual ‖Δ − u vᵀ‖/‖Δ‖ over all {count} deltas {mean:.3g} "
                f"{'<=' if mean <= AUTO_FACTORISED_MEAN_RESIDUAL else '>'} {AUTO_FACTORISED_MEAN_RESIDUAL}")
    mode = "factorised" if mean <= AUTO_FACTORISED_MEAN_RESIDUAL else "full"
    return {"delta_mode": mode, "mean_factor_residual": mean, "threshold": AUTO_FACTORISED_MEAN_RESIDUAL, "reason": measured}


def _mean_factor_residual(metadata: Mapping[str, Any], dataset: Dataset, rule: str) -> tuple[float, int]:
    """The mean factor residual over every row of ``dataset`` and the row count, read from the rows."""
    if delta_storage(metadata) == "factorised":
        # [:] then the column: dataset["column"] is a lazy datasets.Column, which torch reads row by row (1000x slower).
        residuals = torch.as_tensor(dataset.select_columns(["factor_residual"]).with_format("numpy")[:]["factor_residual"])
    else:
        rows = format_deltas(dataset.select_columns(["delta", "layer_input"]), metadata["harvest_config"]["dtype"])
        residuals = torch.cat([
            factorise_deltas(batch["delta"].float(), batch["layer_input"].float(), rule)[1]
            for batch in (rows[start : start + DECISION_BATCH_SIZE] for start in range(0, len(rows), DECISION_BATCH_SIZE))
        ])
    return float(residuals.double().mean()), residuals.numel()


def format_deltas(dataset: Dataset, dtype: str) -> Dataset:
    """``dataset`` (delta columns as stored) as torch tensors, the delta and factor columns decoded to float32."""
    return weight_datasets.format_weights(dataset, dtype, DELTA_COLUMNS)


def load_deltas(path: str | os.PathLike, verify: bool = False) -> Dataset:
    """Load a complete delta dataset as a memory-mapped ``datasets.Dataset`` formatted as torch tensors.

    Every shard is checked against the size, row count and ids the harvest recorded; ``verify=True``
    also checks its sha256 (reads every byte once). A bad shard raises ``ValueError`` naming the file.

    ``delta`` (or, in factorised storage, ``delta_factor``) and ``trajectory`` (``trajectory_factor``)
    come back as float32 tensors whatever the storage dtype; rows are in increasing ``id`` order.
    Use :func:`load_harvest_metadata` for the backbone, layer and settings (``harvest_config``
    holds ``delta_storage`` and ``factor_rule``) and :func:`materialise_deltas` for full matrices.
    """
    load_harvest_metadata(path)
    return weight_datasets.load_weight_dataset(path, DELTA_COLUMNS, verify=verify)


def resolve_deltas(deltas: str | os.PathLike | tuple[Dataset, Mapping[str, Any]]) -> tuple[Dataset, dict[str, Any]]:
    """A delta dataset and its harvest metadata from a directory (:func:`load_deltas`) or a ``(dataset, metadata)`` pair."""
    if isinstance(deltas, (str, os.PathLike)):
        return load_deltas(deltas), dict(load_harvest_metadata(deltas))
    if isinstance(deltas, (tuple, list)) and len(deltas) == 2 and isinstance(deltas[0], Dataset) and isinstance(deltas[1], Mapping):
        return deltas[0], dict(deltas[1])
    raise TypeError(
        f"deltas must be a path to a delta dataset or a (datasets.Dataset, metadata dict) pair, got {type(deltas).__name__}."
    )
