"""Harvest: for every sample of a dataset, the weight delta of one Linear layer fine-tuned on that
sample alone, with the conditioning ``I(x)``, written shard by shard into a resumable delta dataset.

The math is :func:`ocd_hf.overfit.overfit_deltas` (a whole batch of independent single-sample
fine-tunings at once). Under ``accelerate launch`` every process harvests every
``num_processes``-th shard and the main process validates the whole dataset at the end, so the
result does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoTokenizer

from .cards import write_dataset_card
from .deltas import (
    ShardWriter,
    check_delta_dtype,
    delta_features,
    finalize_delta_dataset,
    load_deltas,
    pending_shards,
    prepare_output_dir,
    round_to_storage,
    shard_path,
)
from .modeling_ocd import load_pretrained_backbone
from .overfit import OPTIMIZERS, LossFn, overfit_deltas
from .target import Conditioning, backbone_task, describe_backbone, find_target_linear, model_output_tensor, pool_tokens

if TYPE_CHECKING:
    from accelerate import Accelerator

CollateFn = Callable[[Mapping[str, Any]], Mapping[str, Any]]
LABEL_INPUT_NAMES = ("labels", "label")
TASK_LOSS_NAMES = {"classification": "cross_entropy", "regression": "squared_error"}


def rank1_energy(deltas: torch.Tensor) -> torch.Tensor:
    """``σ₁² / Σσᵢ²`` of every matrix of a ``(batch, out, in)`` tensor, batched.

    1 means exactly rank-1. An all-zero delta counts as rank-1 (energy 1). ``σ₁²`` is the largest
    eigenvalue of the float64 Gram matrix of the unit-norm delta on its smaller side (2-6x faster
    than ``svdvals`` on CPU); ``svdvals`` is the fallback if that eigensolver does not converge.
    """
    deltas = deltas.double()
    total = deltas.pow(2).sum((-2, -1))
    unit = deltas / total.sqrt().clamp_min(torch.finfo(torch.float64).tiny)[..., None, None]
    transposed = unit.transpose(-1, -2)
    gram = unit @ transposed if unit.shape[-2] <= unit.shape[-1] else transposed @ unit
    try:
        top = torch.linalg.eigvalsh(gram)[..., -1]
    except torch.linalg.LinAlgError:
        top = torch.linalg.svdvals(unit)[..., 0].pow(2)
    return torch.where(total > 0, top.clamp(0, 1), torch.ones_like(top)).float()


class FirstForward:
    """The target layer's input/output and the backbone's output in the first forward pass of a block."""

    def __init__(self) -> None:
        self.layer_io: tuple[torch.Tensor, torch.Tensor] | None = None
        self.outputs: Any = None

    def conditioning(self, attention_mask: torch.Tensor | None) -> Conditioning:
        """``I(x)`` pooled as :func:`~ocd_hf.target.capture_conditioning` pools it."""
        if self.layer_io is None or self.outputs is None:
            raise RuntimeError("No forward pass of the backbone through the target layer was recorded.")
        layer_input, layer_output = self.layer_io
        model_output = model_output_tensor(self.outputs)
        return Conditioning(
            layer_input=pool_tokens(layer_input, attention_mask),
            layer_output=pool_tokens(layer_output, attention_mask),
            model_output=pool_tokens(model_output, attention_mask),
            raw_input=layer_input,
            outputs=self.outputs,
            target_is_output=layer_output is model_output,
        )


@contextlib.contextmanager
def record_first_forward(backbone: nn.Module, layer: nn.Linear) -> Iterator[FirstForward]:
    """Record :class:`FirstForward` during the block; later passes (with deltas injected) are ignored."""
    first = FirstForward()

    def on_layer(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if first.layer_io is None:
            first.layer_io = (args[0], output)

    def on_backbone(module: nn.Module, args: tuple, output: Any) -> None:
        if first.outputs is None:
            first.outputs = output

    handles = [layer.register_forward_hook(on_layer), backbone.register_forward_hook(on_backbone)]
    try:
        yield first
    finally:
        for handle in handles:
            handle.remove()


def harvest_batch(
    backbone: nn.Module,
    layer: nn.Linear,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    ids: torch.Tensor,
    *,
    task: str,
    optimizer: str = "adam",
    lr: float = 5e-4,
    steps: int = 3,
    loss_fn: LossFn | None = None,
    store_trajectory: bool = False,
    dtype: str = "float32",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Delta-dataset columns for one batch, and the ids of the samples skipped as non-finite.

    ``I(x)`` is taken from the un-finetuned backbone (which must be in eval mode) during the first
    forward pass of :func:`~ocd_hf.overfit.overfit_deltas`, its unmodified base pass, so it costs no
    extra forward. ``rho`` and ``rank1_energy`` describe the delta as stored (after rounding to
    ``dtype``). A sample with any non-finite value (delta, trajectory, conditioning or loss) is left out.
    """
    with record_first_forward(backbone, layer) as first:
        result = overfit_deltas(
            backbone, layer, inputs, labels, task=task, optimizer=optimizer, lr=lr, steps=steps, loss_fn=loss_fn,
            return_trajectory=store_trajectory,
        )
    cond = first.conditioning(inputs.get("attention_mask"))
    columns = {
        "id": ids,
        "label": labels,
        "delta": round_to_storage(result.deltas, dtype),
        "layer_input": cond.layer_input.float(),
        "layer_output": cond.layer_output.float(),
        "model_output": cond.model_output.float(),
        "loss_before": result.loss_before.float(),
        "loss_after": result.loss_after.float(),
    }
    if store_trajectory:
        columns["trajectory"] = round_to_storage(result.trajectory, dtype)
    columns = {name: value.detach().cpu() for name, value in columns.items()}
    finite = torch.ones(ids.shape[0], dtype=torch.bool)
    for value in columns.values():
        if value.is_floating_point():
            finite &= torch.isfinite(value.reshape(value.shape[0], -1)).all(1)
    columns = {name: value[finite] for name, value in columns.items()}
    columns["rho"] = columns["delta"].pow(2).mean((1, 2)).sqrt()
    columns["rank1_energy"] = rank1_energy(columns["delta"])
    return columns, ids[~finite]


class SampleReader:
    """Turns rows ``[start, end)`` of a ``datasets.Dataset`` into ``(backbone inputs, labels)``.

    With ``collate_fn``, it receives the batch dict ``dataset[start:end]`` (in the dataset's
    current format, e.g. lists of strings for a text column) and returns the backbone's inputs.
    Without it, the columns ``input_columns`` (default: the dataset columns that are arguments of
    ``backbone.forward``, such as ``input_ids``/``attention_mask`` or ``pixel_values``) are stacked
    as tensors. A ``labels``/label entry in the collated inputs is dropped.
    """

    def __init__(
        self,
        dataset: Dataset,
        backbone: nn.Module,
        task: str,
        label_column: str = "label",
        input_columns: list[str] | None = None,
        collate_fn: CollateFn | None = None,
    ) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"dataset must be a datasets.Dataset (map-style, so a harvest can resume), got {type(dataset).__name__}. "
                "Convert with datasets.Dataset.from_dict / from_generator, or materialise an IterableDataset first."
            )
        if len(dataset) == 0:
            raise ValueError("dataset is empty: there is nothing to harvest.")
        if label_column not in dataset.column_names:
            raise ValueError(
                f"label_column {label_column!r} is not a column of the dataset (columns: {dataset.column_names}). "
                "Pass label_column= with the column holding the labels."
            )
        self.dataset = dataset
        self.label_column = label_column
        self.collate_fn = collate_fn
        self.labels = self._read_labels(task)
        self.input_columns = None if collate_fn is not None else self._input_columns(backbone, input_columns)
        self.device = next(backbone.parameters()).device
        if self.input_columns is not None:
            # numpy, not torch: 3x faster on nested-list columns (e.g. pixel_values made by .map).
            self.formatted = dataset.with_format("numpy", columns=self.input_columns)

    def _read_labels(self, task: str) -> torch.Tensor:
        labels = np.asarray(self.dataset.select_columns([self.label_column]).with_format("numpy")[:][self.label_column])
        if labels.ndim != 1:
            raise ValueError(
                f"label_column {self.label_column!r} must hold one scalar label per row, got shape {labels.shape}."
            )
        if task == "classification":
            if not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"The backbone is a classifier but label_column {self.label_column!r} has dtype {labels.dtype}; "
                    "class labels must be integers (for regression, configure the backbone with num_labels=1)."
                )
            return torch.from_numpy(labels.astype(np.int64))
        if not np.issubdtype(labels.dtype, np.number):
            raise ValueError(f"Regression labels in {self.label_column!r} must be numbers, got dtype {labels.dtype}.")
        return torch.from_numpy(labels.astype(np.float32))

    def _input_columns(self, backbone: nn.Module, input_columns: list[str] | None) -> list[str]:
        columns = self.dataset.column_names
        if input_columns is not None:
            unknown = [name for name in input_columns if name not in columns]
            if unknown:
                raise ValueError(f"input_columns {unknown} are not columns of the dataset (columns: {columns}).")
            return list(input_columns)
        parameters = inspect.signature(backbone.forward).parameters
        found = [name for name in columns if name in parameters and name not in (self.label_column, *LABEL_INPUT_NAMES)]
        if not found:
            raise ValueError(
                f"None of the dataset columns {columns} is an input of {type(backbone).__name__}.forward "
                f"(arguments: {[name for name in parameters if name != 'kwargs']}). Tokenize/preprocess the dataset, "
                "pass input_columns=, or pass collate_fn=(batch dict -> dict of input tensors)."
            )
        return found

    @property
    def labels_sha256(self) -> str:
        return hashlib.sha256(self.labels.numpy().tobytes()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.dataset)

    def __call__(self, start: int, end: int) -> tuple[dict[str, Any], torch.Tensor]:
        if self.collate_fn is not None:
            inputs = dict(self.collate_fn(self.dataset[start:end]))
        else:
            batch = self.formatted[start:end]
            ragged = [name for name, value in batch.items() if not (isinstance(value, np.ndarray) and value.dtype.kind in "biuf")]
            if ragged:
                raise ValueError(
                    f"Columns {ragged} have rows of different lengths or non-numeric values and cannot be stacked. "
                    "Pad them when preprocessing (e.g. tokenizer(..., padding='max_length')) or pass "
                    "collate_fn=transformers.DataCollatorWithPadding(tokenizer)."
                )
            inputs = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in batch.items()}
        inputs = {
            name: value.to(self.device) if isinstance(value, torch.Tensor) else value
            for name, value in inputs.items()
            if name not in (self.label_column, *LABEL_INPUT_NAMES)
        }
        return inputs, self.labels[start:end]


def loss_name(loss: LossFn | None, task: str) -> str:
    """How the harvest loss is recorded in the metadata."""
    if loss is None:
        return TASK_LOSS_NAMES[task]
    return f"{getattr(loss, '__module__', '')}.{getattr(loss, '__qualname__', type(loss).__name__)}".lstrip(".")


def harvest_deltas(
    backbone: nn.Module,
    dataset: Dataset,
    target_module: str,
    output_dir: str | os.PathLike,
    *,
    label_column: str = "label",
    input_columns: list[str] | None = None,
    collate_fn: CollateFn | None = None,
    batch_size: int = 32,
    optimizer: str = "adam",
    lr: float = 5e-4,
    steps: int = 3,
    loss: LossFn | None = None,
    store_trajectory: bool = False,
    dtype: str = "float32",
    shard_size: int = 1024,
    accelerator: "Accelerator | PartialState | None" = None,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Fine-tune ``target_module`` of ``backbone`` on every sample of ``dataset`` alone; store the deltas.

    For each row ``s = (x, y)``: ``Δ_s = θ_s − θ`` after ``steps`` steps of ``optimizer`` (defaults:
    the official OCD settings, Adam, lr 5e-4, 3 steps) on the layer's weight only, plus ``I(x)``
    from the un-finetuned model. Rows are written to ``output_dir`` shard by shard (``shard_size``
    rows each, memory bounded by one batch); see :mod:`ocd_hf.deltas` for the layout and columns.

    Calling again with the same arguments after an interruption resumes from the last complete
    shard; a directory made with another backbone, layer or settings is refused. Samples with
    non-finite values are skipped with a warning and listed in the metadata (``skipped_ids``).
    Under ``accelerate launch`` each process harvests every ``num_processes``-th shard; pass the
    ``Accelerator`` (or ``PartialState``) in use, or one is created. The backbone is moved to its
    device and run in eval mode.

    Args:
        loss: per-sample loss ``(model output, labels) -> (batch,)``; default the task loss
            (cross-entropy for classification, squared error for a backbone with ``num_labels=1``).
        dtype: ``"float32"`` (exact deltas) or ``"bfloat16"`` (half the size, stored bit-exactly).
        base_model_name_or_path / base_model_revision: recorded in the metadata and card; default
            the backbone's ``config._name_or_path`` / ``config._commit_hash``.

    Returns:
        The delta dataset, loaded with :func:`ocd_hf.deltas.load_deltas`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}.")
    check_delta_dtype(dtype)
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    state = accelerator if accelerator is not None else PartialState()
    output_dir = Path(output_dir)
    name, layer = find_target_linear(backbone, target_module)
    backbone.to(state.device)
    was_training = backbone.training
    backbone.eval()
    try:
        reader = SampleReader(
            dataset, backbone, task=backbone_task(backbone), label_column=label_column, input_columns=input_columns,
            collate_fn=collate_fn,
        )
        first_inputs = reader(0, min(batch_size, len(reader)))[0]
        try:
            description = describe_backbone(backbone, name, example_inputs=first_inputs)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"{type(backbone).__name__} failed on the first batch, built from inputs {sorted(first_inputs)}: {error}. "
                "Pass input_columns= with the model's input columns, or collate_fn= to build its inputs."
            ) from error
        config = getattr(backbone, "config", None)
        metadata = {
            "format_version": 1,
            **description,
            "base_model_name_or_path": base_model_name_or_path or description["base_model_name_or_path"],
            "base_model_revision": base_model_revision or getattr(config, "_commit_hash", None),
            "harvest_config": {
                "optimizer": optimizer,
                "lr": lr,
                "steps": steps,
                "loss": loss_name(loss, description["task"]),
                "dtype": dtype,
                "store_trajectory": store_trajectory,
                "shard_size": shard_size,
                "conditioning": "un-finetuned model; per-token tensors averaged over valid tokens",
            },
            "source": {"num_rows": len(reader), "label_column": label_column, "labels_sha256": reader.labels_sha256},
            "num_shards": math.ceil(len(reader) / shard_size),
        }
        prepare_output_dir(output_dir, metadata, is_main_process=state.is_main_process)
        state.wait_for_everyone()
        _harvest_shards(backbone, layer, reader, output_dir, metadata, state, batch_size, loss, progress)
    finally:
        backbone.train(was_training)
    state.wait_for_everyone()
    if state.is_main_process:
        final = finalize_delta_dataset(output_dir, metadata)
        write_dataset_card(output_dir, final)
    state.wait_for_everyone()
    return load_deltas(output_dir)


def _harvest_shards(
    backbone: nn.Module,
    layer: nn.Linear,
    reader: SampleReader,
    output_dir: Path,
    metadata: Mapping[str, Any],
    state: Any,
    batch_size: int,
    loss: LossFn | None,
    progress: bool,
) -> None:
    """Harvest this process's missing shards, one atomic shard file at a time."""
    settings = metadata["harvest_config"]
    num_shards, shard_size, num_rows = metadata["num_shards"], settings["shard_size"], metadata["source"]["num_rows"]
    features = delta_features(
        in_features=metadata["in_features"],
        out_features=metadata["out_features"],
        output_dim=metadata["output_dim"],
        task=metadata["task"],
        dtype=settings["dtype"],
        trajectory_steps=settings["steps"] if settings["store_trajectory"] else None,
    )
    shards = pending_shards(output_dir, num_shards, state.process_index, state.num_processes)
    bounds = [(index * shard_size, min((index + 1) * shard_size, num_rows)) for index in shards]
    bar = tqdm(
        total=sum(end - start for start, end in bounds),
        desc=f"Harvesting {metadata['target_module']}",
        unit="sample",
        disable=not (progress and state.is_local_main_process),
    )
    with bar:
        for index, (shard_start, shard_end) in zip(shards, bounds):
            with ShardWriter(shard_path(output_dir, index, num_shards), features, settings["dtype"]) as writer:
                for start in range(shard_start, shard_end, batch_size):
                    end = min(start + batch_size, shard_end)
                    inputs, labels = reader(start, end)
                    columns, skipped = harvest_batch(
                        backbone, layer, inputs, labels, torch.arange(start, end), task=metadata["task"],
                        optimizer=settings["optimizer"], lr=settings["lr"], steps=settings["steps"], loss_fn=loss,
                        store_trajectory=settings["store_trajectory"], dtype=settings["dtype"],
                    )
                    if skipped.numel():
                        warnings.warn(
                            f"Skipped {skipped.numel()} sample(s) with non-finite deltas or conditioning: ids "
                            f"{skipped.tolist()}. They are listed in harvest.json (skipped_ids).",
                            stacklevel=3,
                        )
                    writer.write(columns)
                    bar.update(end - start)


def load_source_dataset(name_or_path: str, config_name: str | None = None, split: str = "train") -> Dataset:
    """One split of a dataset: a ``save_to_disk`` directory (``Dataset`` or ``DatasetDict``), else ``load_dataset``."""
    path = Path(name_or_path)
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        loaded = load_from_disk(str(path))
    else:
        loaded = load_dataset(name_or_path, config_name, split=split)
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise ValueError(f"Split {split!r} not found in {name_or_path!r}; it has {list(loaded)}. Pass split=.")
        loaded = loaded[split]
    return loaded


def harvest_from_pretrained(
    model_name_or_path: str,
    dataset_name_or_path: str,
    target_module: str,
    output_dir: str | os.PathLike,
    *,
    model_revision: str | None = None,
    model_class: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    max_length: int = 128,
    max_samples: int | None = None,
    batch_size: int = 32,
    optimizer: str = "adam",
    lr: float = 5e-4,
    steps: int = 3,
    dtype: str = "float32",
    shard_size: int = 1024,
    store_trajectory: bool = False,
    progress: bool = True,
) -> Dataset:
    """:func:`harvest_deltas` from names: the entry point of ``ocd-hf harvest``.

    Loads the backbone (``model_class``, default the first of ``config.architectures``, from
    ``transformers`` or :mod:`ocd_hf.backbones`), the ``split`` of the dataset (a Hub id, a
    ``load_dataset`` builder path or a ``save_to_disk`` directory; the first ``max_samples`` rows),
    and builds the inputs with the model's tokenizer (``text_column``) or image processor
    (``image_column``), or takes the dataset's own input columns.
    """
    if text_column is not None and image_column is not None:
        raise ValueError("Pass text_column or image_column, not both.")
    backbone = load_pretrained_backbone(model_name_or_path, model_class, revision=model_revision)
    dataset = load_source_dataset(dataset_name_or_path, dataset_config, split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    collate_fn = None
    if text_column is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, revision=model_revision)

        def collate_fn(batch: Mapping[str, Any]) -> Mapping[str, Any]:
            return tokenizer(batch[text_column], padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    elif image_column is not None:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path, revision=model_revision)

        def collate_fn(batch: Mapping[str, Any]) -> Mapping[str, Any]:
            return processor(batch[image_column], return_tensors="pt")

    return harvest_deltas(
        backbone, dataset, target_module, output_dir, label_column=label_column, collate_fn=collate_fn,
        batch_size=batch_size, optimizer=optimizer, lr=lr, steps=steps, store_trajectory=store_trajectory, dtype=dtype,
        shard_size=shard_size, base_model_name_or_path=model_name_or_path, base_model_revision=model_revision,
        progress=progress,
    )
