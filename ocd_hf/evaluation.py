"""Evaluate a trained OCD hypernetwork on a held-out split against the base model, ablations and bounds.

Rows (see :data:`ROW_DESCRIPTIONS`): ``base``; ``ocd_1``, ``ocd_ens{k}``, ``ocd_mean{k}``; the ablations
``no_scale``, ``nearest_neighbour`` and ``alternative_layer``; the bounds ``oracle`` (overfits on the
true test label) and ``label_free`` (``Σ_y p_base(y|x) Δ(x, y)``). Every row is computed batch by
batch with no loop over samples. Stochastic rows are repeated over sampling seeds, and
:func:`aggregate_results` combines the tables of independently trained models. Both return a
:class:`ResultsTable` that saves itself as JSON, a markdown table and a PNG plot.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .deltas import materialise_deltas, resolve_deltas
from .factorised import expand_factors
from .modeling_ocd import OCDWrapper
from .overfit import overfit_deltas
from .target import Conditioning, model_output_tensor

Batch = tuple[dict[str, Any], torch.Tensor]

STOCHASTIC_ROWS = ("ocd_1", "ocd_ens", "ocd_mean", "no_scale", "alternative_layer")
ROW_KINDS = {
    "base": "reference",
    "ocd_1": "OCD",
    "ocd_ens": "OCD",
    "ocd_mean": "OCD",
    "no_scale": "ablation",
    "nearest_neighbour": "ablation",
    "alternative_layer": "ablation",
    "oracle": "bound",
    "label_free": "bound",
}
ROW_DESCRIPTIONS = {
    "base": "the backbone alone",
    "ocd_1": "OCD, one draw (the first of the ensemble's draws)",
    "ocd_ens": "OCD, ensemble of {k} draws (mean of the probabilities / predictions)",
    "ocd_mean": "OCD, mean network: the mean of the {k} drawn deltas",
    "no_scale": "ablation: the first draw scaled by the global ρ = exp(log_rho_mean) instead of ρ̂(x)",
    "nearest_neighbour": "ablation: the harvested Δ of the training sample nearest in standardised I(x)",
    "alternative_layer": "ablation: OCD, one draw, with a hypernetwork on another layer ({layer})",
    "oracle": "bound, uses the TRUE test label: overfit the layer on the test sample as in the harvest",
    "label_free": "bound, needs test-time overfitting on every label: Σ_y p_base(y|x) Δ(x, y)",
}
METRIC_FORMATS = {"flips_fixed": "{:.1f}", "flips_broken": "{:.1f}"}
DEFAULT_PLOT_METRICS = {"classification": ("accuracy", "cross_entropy"), "regression": ("mse",)}
BOUND_MARK = " †"


def row_name(row: str, num_samples: int) -> str:
    """The displayed name of a row: ``ocd_ens`` / ``ocd_mean`` carry the ensemble size."""
    return f"{row}{num_samples}" if row in ("ocd_ens", "ocd_mean") else row


# ----- results ------------------------------------------------------------------------------------


@dataclass
class ResultRow:
    """One row of a results table: every metric's values over runs (sampling seeds or models)."""

    name: str
    kind: str
    description: str
    values: dict[str, list[float]] = field(default_factory=dict)

    @property
    def num_runs(self) -> int:
        return max((len(v) for v in self.values.values()), default=0)

    def mean(self, metric: str) -> float:
        return float(np.mean(self.values[metric]))

    def sd(self, metric: str) -> float:
        """Sample standard deviation over runs; ``nan`` for a single run."""
        values = self.values[metric]
        return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


@dataclass
class ResultsTable:
    """Metrics per row with their runs; renders as JSON, markdown (``mean ± sd``) and a PNG plot.

    ``runs_label`` says what the runs of a row are: ``"seeds"`` (sampling seeds of one model) or
    ``"models"`` (independently trained models, from :func:`aggregate_results`).
    """

    rows: list[ResultRow]
    metadata: dict[str, Any] = field(default_factory=dict)
    runs_label: str = "seeds"

    def __getitem__(self, name: str) -> ResultRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No row {name!r}; rows are {[r.name for r in self.rows]}.")

    @property
    def metrics(self) -> list[str]:
        """Every metric of any row, in first-seen order."""
        return list(dict.fromkeys(m for row in self.rows for m in row.values))

    def to_dict(self) -> dict[str, Any]:
        rows = [
            {
                "name": row.name,
                "kind": row.kind,
                "description": row.description,
                "num_runs": row.num_runs,
                "metrics": {
                    m: {"mean": _json_number(row.mean(m)), "sd": _json_number(row.sd(m)), "values": [_json_number(x) for x in v]}
                    for m, v in row.values.items()
                },
            }
            for row in self.rows
        ]
        return {"runs_label": self.runs_label, "metadata": self.metadata, "rows": rows}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The table as JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False, default=str)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> "ResultsTable":
        """Read a table written by :meth:`to_json` (a file path or the JSON text itself)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text(encoding="utf-8")
        data = json.loads(text)
        rows = [
            ResultRow(
                r["name"], r["kind"], r["description"],
                {m: [float("nan") if x is None else float(x) for x in v["values"]] for m, v in r["metrics"].items()},
            )
            for r in data["rows"]
        ]
        return cls(rows, data.get("metadata", {}), data.get("runs_label", "seeds"))

    def to_markdown(self, metrics: Sequence[str] | None = None) -> str:
        """A markdown table with ``mean ± sd`` per metric, the number of runs, and the bounds marked."""
        metrics = list(metrics or self.metrics)
        header = ["row", "kind", f"n {self.runs_label}", *metrics]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            name = row.name + (BOUND_MARK if row.kind == "bound" else "")
            cells = [name, row.kind, str(row.num_runs)] + [_format_cell(row, m) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- `{row.name}`: {row.description}" for row in self.rows]
        if any(row.kind == "bound" for row in self.rows):
            notes.append(f"- {BOUND_MARK.strip()} bounds are not deployable methods: they overfit at test time and `oracle` uses the test labels.")
        if "majority_accuracy" in self.metadata:
            notes.append(f"- majority-class accuracy on this split: {self.metadata['majority_accuracy']:.4f}")
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"

    def plot(self, path: str | os.PathLike, metrics: Sequence[str] | None = None) -> Path:
        """Save a bar chart as PNG: one panel per metric, each row's difference from ``base`` (the
        effects are small next to the metric itself), error bars = sd over runs, bounds hatched."""
        from matplotlib.figure import Figure

        task = self.metadata.get("task", "classification")
        metrics = [m for m in (metrics or DEFAULT_PLOT_METRICS.get(task, ())) if m in self.metrics] or self.metrics[:2]
        colours = {"reference": "0.55", "OCD": "tab:blue", "ablation": "tab:orange", "bound": "tab:green"}
        figure = Figure(figsize=(4.5 * len(metrics), 0.45 * len(self.rows) + 1.5), layout="constrained")
        for index, metric in enumerate(metrics):
            axis = figure.add_subplot(1, len(metrics), index + 1)
            rows = [row for row in self.rows if metric in row.values]
            has_base = any(row.name == "base" for row in rows)
            reference = self["base"].mean(metric) if has_base else 0.0
            positions = np.arange(len(rows))
            errors = [0.0 if math.isnan(row.sd(metric)) else row.sd(metric) for row in rows]
            heights = [row.mean(metric) - reference for row in rows]
            bars = axis.barh(positions, heights, xerr=errors, color=[colours.get(r.kind, "0.3") for r in rows])
            for bar, row in zip(bars, rows):
                if row.kind == "bound":
                    bar.set_hatch("//")
            axis.axvline(0.0, color="k", linewidth=0.8)
            axis.set_yticks(positions, [row.name + (BOUND_MARK if row.kind == "bound" else "") for row in rows])
            axis.invert_yaxis()
            axis.set_title(f"{metric} − base (base = {reference:.4g})" if has_base else metric)
        figure.suptitle(f"OCD evaluation (mean ± sd over {self.runs_label}; † bounds)")
        figure.savefig(path, dpi=110)
        return Path(path)

    def save(self, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``results.json``, ``results.md`` and ``results.png`` into ``output_dir``."""
        directory = Path(output_dir)
        if directory.is_file():
            raise ValueError(f"output_dir {directory} is a file; pass a directory.")
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"json": directory / "results.json", "markdown": directory / "results.md", "plot": directory / "results.png"}
        self.to_json(paths["json"])
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        self.plot(paths["plot"])
        return paths


def _json_number(value: float) -> float | None:
    """Strict JSON has no NaN/Infinity: non-finite values are written as ``null``."""
    return value if math.isfinite(value) else None


def _format_cell(row: ResultRow, metric: str) -> str:
    if metric not in row.values:
        return "—"
    fmt = METRIC_FORMATS.get(metric, "{:.4f}")
    mean, sd = row.mean(metric), row.sd(metric)
    return fmt.format(mean) if math.isnan(sd) else f"{fmt.format(mean)} ± {fmt.format(sd)}"


def aggregate_results(results: Sequence[ResultsTable]) -> ResultsTable:
    """Combine the tables of independently trained models into one: each row's values become the
    per-model means, so the table shows ``mean ± sd`` over models."""
    if not results:
        raise ValueError("aggregate_results needs at least one ResultsTable.")
    tasks = {r.metadata.get("task") for r in results}
    if len(tasks) > 1:
        raise ValueError(f"Cannot aggregate results of different tasks: {sorted(map(str, tasks))}.")
    rows: dict[str, ResultRow] = {}
    for table in results:
        for row in table.rows:
            merged = rows.setdefault(row.name, ResultRow(row.name, row.kind, row.description))
            for metric in row.values:
                merged.values.setdefault(metric, []).append(row.mean(metric))
    metadata = {"task": tasks.pop(), "num_models": len(results), "models": [r.metadata for r in results]}
    return ResultsTable(list(rows.values()), metadata, runs_label="models")


# ----- metrics ------------------------------------------------------------------------------------


@dataclass
class FlipCounts:
    """Predictions that differ from the base model's: all of them, those that fix an error, those that break a hit."""

    flipped: int
    fixed: int
    broken: int


def count_flips(base_predictions: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor) -> FlipCounts:
    """Count flipped predictions vs the base model, and how many flips fix or break the prediction."""
    flipped = predictions != base_predictions
    base_correct = base_predictions == labels
    correct = predictions == labels
    return FlipCounts(int(flipped.sum()), int((flipped & ~base_correct & correct).sum()), int((flipped & base_correct & ~correct).sum()))


def delta_cosine(deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine between deltas ``(batch, ..., out, in)`` and reference deltas ``(batch, out, in)``,
    averaged over any draw dimensions: ``(batch,)``."""
    flat = deltas.reshape(deltas.shape[0], -1, reference[0].numel()).float()
    return F.cosine_similarity(flat, reference.reshape(reference.shape[0], 1, -1).float(), dim=-1).mean(1)


class MetricAccumulator:
    """Running sums of one row's metrics over batches (no per-sample Python work)."""

    def __init__(self, task: str, num_classes: int) -> None:
        self.task = task
        self.num_classes = num_classes
        self.count = 0
        self.sums: dict[str, float] = {}
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long) if task == "classification" else None

    def _add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def update(
        self, outputs: torch.Tensor, labels: torch.Tensor, base_outputs: torch.Tensor | None = None, cosine: torch.Tensor | None = None
    ) -> None:
        """Add a batch: ``outputs`` are log-probabilities/logits ``(batch, classes)`` or predictions ``(batch, dims)``."""
        self.count += labels.shape[0]
        if cosine is not None:
            self._add("delta_cosine", cosine.sum())
        if self.task == "regression":
            target = labels.reshape(labels.shape[0], -1).to(outputs.dtype)
            self._add("mse", (outputs.reshape(labels.shape[0], -1) - target).pow(2).mean(1).sum())
            return
        predictions = outputs.argmax(-1)
        self._add("correct", (predictions == labels).sum())
        self._add("cross_entropy", F.cross_entropy(outputs, labels, reduction="sum"))
        self.confusion += torch.bincount(labels * self.num_classes + predictions, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        ).cpu()
        if base_outputs is not None:
            flips = count_flips(base_outputs.argmax(-1), predictions, labels)
            self._add("flipped", flips.flipped)
            self._add("flips_fixed", flips.fixed)
            self._add("flips_broken", flips.broken)

    def compute(self) -> dict[str, float]:
        """The row's metrics over everything seen."""
        n = max(self.count, 1)
        metrics: dict[str, float] = {}
        if self.task == "regression":
            metrics["mse"] = self.sums["mse"] / n
        else:
            metrics["accuracy"] = self.sums["correct"] / n
            support = self.confusion.sum(1)
            recall = self.confusion.diag()[support > 0].double() / support[support > 0]
            metrics["balanced_accuracy"] = float(recall.mean())
            metrics["cross_entropy"] = self.sums["cross_entropy"] / n
            if "flipped" in self.sums:
                metrics["flip_rate"] = self.sums["flipped"] / n
                metrics["flips_fixed"] = self.sums["flips_fixed"]
                metrics["flips_broken"] = self.sums["flips_broken"]
        if "delta_cosine" in self.sums:
            metrics["delta_cosine"] = self.sums["delta_cosine"] / n
        return metrics


# ----- nearest-neighbour ablation -----------------------------------------------------------------

CONDITION_COLUMNS = {"input": "layer_input", "activation": "layer_output", "output": "model_output"}


class NearestNeighbourDeltas:
    """The harvested delta of the training sample nearest to a query in the conditioning space.

    Each feature of ``I(x)`` is standardised with the training statistics and each component is
    divided by the square root of its width, so the input, activation and output components
    weigh equally. Distances are computed for a query batch against ``chunk_size`` training rows
    at a time, so memory stays bounded by ``batch × chunk_size``.

    Deltas stored as left factors (``delta_factor``, see :mod:`ocd_hf.deltas`) are expanded to
    ``u_n v_nᵀ`` (``v_n`` from the neighbour's own ``layer_input`` by ``metadata``'s factor rule)
    for the selected neighbours only.
    """

    def __init__(
        self,
        deltas: Dataset,
        components: Sequence[str] = ("input", "activation", "output"),
        chunk_size: int = 4096,
        progress: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.delta_columns = ["delta_factor", "layer_input"] if "delta_factor" in deltas.column_names else ["delta"]
        missing = [c for c in [*self.delta_columns, *(CONDITION_COLUMNS[c] for c in components)] if c not in deltas.column_names]
        if missing:
            raise ValueError(
                f"The delta dataset lacks the columns {missing}; pass a dataset in the delta-dataset format "
                "(ocd_hf.deltas.load_deltas(path))."
            )
        if len(deltas) == 0:
            raise ValueError("The delta dataset is empty; the nearest-neighbour ablation needs harvested training deltas.")
        self.dataset = deltas
        self.metadata = dict(metadata or {})
        self.components = list(components)
        self.chunk_size = chunk_size
        starts = tqdm(range(0, len(deltas), chunk_size), desc="nearest-neighbour index", disable=not progress)
        chunks = [{c: column_tensor(deltas, slice(start, start + chunk_size), CONDITION_COLUMNS[c]) for c in self.components} for start in starts]
        self.features = {c: torch.cat([chunk[c] for chunk in chunks]) for c in self.components}
        self.mean = {c: f.mean(0) for c, f in self.features.items()}
        self.std = {c: f.std(0, unbiased=False).clamp_min(1e-6) for c, f in self.features.items()}
        self.features = torch.cat([self.standardise(c, f) for c, f in self.features.items()], dim=1)
        self.delta_shape = tuple(self.deltas([0]).shape[1:])

    def deltas(self, rows: list[int]) -> torch.Tensor:
        """Full deltas ``(len(rows), out, in)`` of some training rows, whatever the storage."""
        return materialise_deltas({c: column_tensor(self.dataset, rows, c) for c in self.delta_columns}, self.metadata)

    def standardise(self, component: str, values: torch.Tensor) -> torch.Tensor:
        return (values.float().cpu() - self.mean[component]) / self.std[component] / math.sqrt(values.shape[-1])

    def query_features(self, cond: Conditioning) -> torch.Tensor:
        values = {"input": cond.layer_input, "activation": cond.layer_output, "output": cond.model_output}
        return torch.cat([self.standardise(c, values[c]) for c in self.components], dim=1)

    def nearest(self, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """Index into the delta dataset and Euclidean distance of each query's nearest training sample."""
        queries = self.query_features(cond)
        if queries.shape[1] != self.features.shape[1]:
            raise ValueError(
                f"The query conditioning has {queries.shape[1]} features but the delta dataset has {self.features.shape[1]}: "
                "the deltas were harvested from another layer or backbone."
            )
        best = torch.full((queries.shape[0],), float("inf"))
        index = torch.zeros(queries.shape[0], dtype=torch.long)
        for start in range(0, self.features.shape[0], self.chunk_size):
            distances = torch.cdist(queries, self.features[start : start + self.chunk_size])
            chunk_best, chunk_index = distances.min(1)
            better = chunk_best < best
            best = torch.where(better, chunk_best, best)
            index = torch.where(better, chunk_index + start, index)
        return index, best

    def __call__(self, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(deltas (batch, out, in), indices, distances)`` of the nearest training samples."""
        index, distance = self.nearest(cond)
        return self.deltas(index.tolist()).to(cond.layer_input.device), index, distance


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


# ----- data ---------------------------------------------------------------------------------------


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


# ----- evaluation ---------------------------------------------------------------------------------


def oracle_settings(model: OCDWrapper, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Overfitting settings of the harvest (``config.harvest_config``; defaults Adam, lr 5e-4, 3 steps)."""
    return {**model.overfit_settings(), **(overrides or {})}


def available_rows(task: str, has_deltas: bool, has_alternative: bool, generator: str = "diffusion") -> list[str]:
    """Every row that the task, the generator and the given inputs allow, in table order."""
    rows = ["base", "ocd_1", "ocd_ens", "ocd_mean"] + ([] if generator == "label" else ["no_scale"])
    if has_deltas:
        rows.append("nearest_neighbour")
    if has_alternative:
        rows.append("alternative_layer")
    rows.append("oracle")
    if task == "classification":
        rows.append("label_free")
    return rows


def _check_rows(
    rows: Sequence[str], task: str, has_deltas: bool, has_alternative: bool, num_samples: int, generator: str = "diffusion"
) -> list[str]:
    requested = [name[:-len(str(num_samples))] if name in (f"ocd_ens{num_samples}", f"ocd_mean{num_samples}") else name for name in rows]
    unknown = sorted(set(requested) - set(ROW_KINDS))
    if unknown:
        raise ValueError(f"Unknown rows {unknown}; choose from {[row_name(r, num_samples) for r in ROW_KINDS]}.")
    if "nearest_neighbour" in requested and not has_deltas:
        raise ValueError("The nearest_neighbour row needs the harvested training deltas: pass delta_dataset=.")
    if "alternative_layer" in requested and not has_alternative:
        raise ValueError("The alternative_layer row needs a second trained OCDWrapper: pass alternative_model=.")
    if "no_scale" in requested and generator == "label":
        raise ValueError("The no_scale row ablates the scale net, which a 'label' generator does not have; drop it.")
    if "label_free" in requested and task != "classification":
        raise ValueError("The label_free bound is defined for classification only (it sums over labels).")
    return ["base", *[r for r in requested if r != "base"]]


def _check_labels(labels: torch.Tensor, task: str, num_classes: int) -> torch.Tensor:
    """Class indices ``(batch,)`` for classification, float targets for regression."""
    if task == "regression":
        return labels.float()
    labels = labels.reshape(-1)
    if labels.is_floating_point() or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Classification labels must be integer class indices in [0, {num_classes}); got {labels.dtype} values "
            f"in [{labels.min().item()}, {labels.max().item()}]."
        )
    return labels.long()


def _output_rows(outputs: Any, batch: int, task: str) -> torch.Tensor:
    """The model output as ``(batch, classes)`` logits or ``(batch, dims)`` predictions."""
    tensor = model_output_tensor(outputs)
    if task == "classification" and tensor.dim() != 2:
        raise ValueError(
            f"evaluate_ocd scores one prediction per sample; the backbone returns logits of shape {tuple(tensor.shape)}. "
            "Token-level outputs are not supported."
        )
    return tensor.reshape(batch, -1).float()


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode (dropout off, deterministic base predictions), then restore the mode of
    every submodule as it was (a wrapper left in train mode must not switch its eval-mode backbone)."""
    modes = {submodule: submodule.training for module in modules for submodule in module.modules()}
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for submodule, mode in modes.items():
            submodule.training = mode


class _RowEvaluator:
    """Computes every requested row for one batch and feeds the accumulators."""

    def __init__(
        self,
        model: OCDWrapper,
        rows: list[str],
        seeds: Sequence[int],
        num_samples: int,
        neighbours: NearestNeighbourDeltas | None,
        alternative_model: OCDWrapper | None,
        num_inference_steps: int | None,
        overfit_settings: dict[str, Any],
    ) -> None:
        self.model = model
        self.task = model.config.task
        self.rows = rows
        self.num_samples = num_samples
        self.neighbours = neighbours
        self.alternative = alternative_model
        self.num_inference_steps = num_inference_steps
        self.overfit_settings = overfit_settings
        self.global_rho = math.exp(model.config.log_rho_mean)
        classes = model.config.output_dim
        self.accumulators = {r: [MetricAccumulator(self.task, classes) for _ in (seeds if r in STOCHASTIC_ROWS else [0])] for r in rows}
        device = model.device
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.alternative_generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def predict(self, cond: Conditioning, deltas: torch.Tensor, inputs: dict[str, Any], draws: bool = False) -> torch.Tensor:
        """Outputs with one delta per input, ``(batch, out, in)`` (or factors ``(batch, out)``) ->
        ``(batch, outputs)``; with ``draws``, ``k`` per input, ``(batch, k, ...)`` -> ``(batch, k, outputs)``.
        Uses the wrapper's head fast path (no second backbone pass) where it applies."""
        with torch.no_grad():
            outputs = self.model.predict_with_deltas(cond, deltas if draws else deltas.unsqueeze(1), inputs).float()
        return outputs if draws else outputs[:, 0]

    def update(self, row: str, outputs: torch.Tensor, labels: torch.Tensor, base: torch.Tensor, cosine: torch.Tensor | None, run: int = 0) -> None:
        self.accumulators[row][run].update(outputs, labels, None if row == "base" else base, cosine)

    def overfit(self, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        return overfit_deltas(self.model.backbone, self.model.target_layer, inputs, labels, task=self.task, **self.overfit_settings).deltas

    def __call__(self, inputs: dict[str, Any], labels: torch.Tensor) -> None:
        batch = labels.shape[0]
        cond = self.model.conditioning(**inputs)
        base = _output_rows(cond.outputs, batch, self.task)
        self.update("base", base, labels, base, None)
        oracle = self.overfit(inputs, labels) if "oracle" in self.rows else None

        def cosine(deltas: torch.Tensor, factors: bool = False) -> torch.Tensor | None:
            """Cosine with the oracle of full deltas, or of left factors ``(batch, [k,] out)`` expanded to ``u vᵀ``."""
            if oracle is None:
                return None
            if factors:
                deltas = expand_factors(deltas, cond.raw_input, self.model.config.factor_rule)
            return delta_cosine(deltas, oracle)

        if oracle is not None:
            self.update("oracle", self.predict(cond, oracle, inputs), labels, base, None)
        if "label_free" in self.rows:
            per_label = self.model.label_deltas(cond, inputs, self.overfit_settings)
            label_free = torch.einsum("bc,bcoi->boi", base.softmax(-1).to(per_label.dtype), per_label)
            self.update("label_free", self.predict(cond, label_free, inputs), labels, base, cosine(label_free))
        if self.neighbours is not None:
            neighbour_deltas = self.neighbours(cond)[0].to(self.model.target_layer.weight.dtype)
            self.update("nearest_neighbour", self.predict(cond, neighbour_deltas, inputs), labels, base, cosine(neighbour_deltas))
        for run in range(len(self.generators)):
            self.stochastic_rows(run, cond, inputs, labels, base, cosine)

    def stochastic_rows(self, run: int, cond: Conditioning, inputs: dict[str, Any], labels: torch.Tensor, base: torch.Tensor, cosine: Callable) -> None:
        """The rows that sample from a hypernetwork, with the ``run``-th seed's generator.

        One set of draws serves ``ocd_1`` (the first draw), the ensemble, the mean network and
        ``no_scale`` (the first draw's direction at the global scale): the rows are paired. A
        factorised hypernetwork's draws stay left factors; only the oracle cosines expand them.
        """
        batch = labels.shape[0]
        if any(r in self.rows for r in ("ocd_1", "ocd_ens", "ocd_mean", "no_scale")):
            draws = self.num_samples if any(r in self.rows for r in ("ocd_ens", "ocd_mean")) else 1
            if self.model.config.generator == "label":
                deltas = self.model.generate_deltas(cond, draws, self.generators[run], inputs=inputs)
            else:
                unit = self.model.generate_deltas(cond, draws, self.generators[run], self.num_inference_steps, rho=1.0, inputs=inputs)
                hypernetwork = self.model.hypernetwork
                with torch.no_grad(), self.model.hypernetwork_eval():
                    rho = hypernetwork.predict_rho(hypernetwork.embed_condition(hypernetwork.condition_values(cond)))
                deltas = unit * rho.view(-1, *([1] * (unit.dim() - 1))).to(unit.dtype)
            factors = deltas.dim() == 3
            if "ocd_1" in self.rows:
                self.update("ocd_1", self.predict(cond, deltas[:, 0], inputs), labels, base, cosine(deltas[:, 0], factors), run)
            if "ocd_ens" in self.rows:
                ensemble = self.model.ensemble(self.predict(cond, deltas, inputs, draws=True))
                self.update("ocd_ens", ensemble, labels, base, cosine(deltas, factors), run)
            if "ocd_mean" in self.rows:
                mean = deltas.mean(1)
                self.update("ocd_mean", self.predict(cond, mean, inputs), labels, base, cosine(mean, factors), run)
            if "no_scale" in self.rows:
                fixed = unit[:, 0] * self.global_rho
                self.update("no_scale", self.predict(cond, fixed, inputs), labels, base, cosine(fixed, factors), run)
        if "alternative_layer" in self.rows:
            alternative = self.alternative
            deltas = alternative.generate_deltas(alternative.conditioning(**inputs), 1, self.alternative_generators[run], self.num_inference_steps)
            with torch.no_grad():
                outputs = _output_rows(alternative.forward_with_deltas(deltas[:, 0], **inputs), batch, self.task)
            self.update("alternative_layer", outputs, labels, base, None, run)

    def results(self) -> dict[str, list[dict[str, float]]]:
        return {row: [acc.compute() for acc in accumulators] for row, accumulators in self.accumulators.items()}


def evaluate_ocd(
    model: OCDWrapper,
    data: Iterable[Any] | Dataset,
    *,
    delta_dataset: Dataset | str | os.PathLike | tuple[Dataset, Mapping[str, Any]] | None = None,
    alternative_model: OCDWrapper | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    num_samples: int = 5,
    rows: Sequence[str] | None = None,
    collate_fn: Callable[[list[dict]], Any] | None = None,
    batch_size: int = 32,
    label_column: str = "label",
    num_inference_steps: int | None = None,
    oracle_overrides: Mapping[str, Any] | None = None,
    neighbour_chunk_size: int = 4096,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ResultsTable:
    """Evaluate ``model`` on a held-out split: base, OCD, ensemble, mean network, ablations and bounds.

    Args:
        model: the trained ``OCDWrapper``.
        data: a list / DataLoader of ``(inputs_dict, labels)`` batches (or dicts holding ``labels``),
            or a ``datasets.Dataset`` (batched here, with ``collate_fn`` if given).
        delta_dataset: the harvested training deltas; enables ``nearest_neighbour``. A delta dataset
            directory, a ``(dataset, harvest metadata)`` pair, or a ``datasets.Dataset`` alone (its
            deltas stored as factors then expand with the factor rule of the model's own harvest,
            ``model.config.harvest_config``).
        alternative_model: a trained ``OCDWrapper`` on another layer; enables ``alternative_layer``.
        seeds: sampling seeds; the stochastic rows are run once per seed, the others once.
        num_samples: draws of the ensemble and mean-network rows.
        rows: the rows to compute (default: all that the inputs allow).
        oracle_overrides: overfitting settings replacing the harvest's for ``oracle`` and ``label_free``.
        neighbour_chunk_size: training rows per distance block of the nearest-neighbour search.
        output_dir: if given, ``results.json``, ``results.md`` and ``results.png`` are written there.

    Returns:
        A :class:`ResultsTable`: accuracy, balanced accuracy and cross-entropy (classification) or MSE
        (regression) per row; for every row but ``base`` the flip rate vs base and the flips that fix or
        break a prediction (classification); and, when ``oracle`` is computed, the mean cosine between the
        row's deltas and the oracle deltas.
    """
    task = model.config.task
    if not seeds:
        raise ValueError("seeds must hold at least one sampling seed, e.g. seeds=(0, 1, 2).")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    has_deltas, has_alternative = delta_dataset is not None, alternative_model is not None
    generator = model.config.generator
    rows = _check_rows(
        rows or available_rows(task, has_deltas, has_alternative, generator), task, has_deltas, has_alternative, num_samples, generator
    )
    if has_alternative and alternative_model.config.task != task:
        raise ValueError(f"The alternative model's task is {alternative_model.config.task!r}, the model's is {task!r}.")
    neighbours = None
    if "nearest_neighbour" in rows:
        if isinstance(delta_dataset, Dataset):
            deltas, delta_metadata = delta_dataset, {"harvest_config": model.config.harvest_config or {}}
        else:
            deltas, delta_metadata = resolve_deltas(delta_dataset)
        neighbours = NearestNeighbourDeltas(deltas, model.config.condition_components, neighbour_chunk_size, progress, delta_metadata)
        if neighbours.delta_shape != model.config.weight_shape:
            raise ValueError(
                f"The delta dataset holds deltas of shape {neighbours.delta_shape}, the model's target layer "
                f"{model.target_name!r} has {model.config.weight_shape}: pass the deltas harvested for this layer."
            )
    settings = oracle_settings(model, oracle_overrides)
    evaluator = _RowEvaluator(model, rows, seeds, num_samples, neighbours, alternative_model, num_inference_steps, settings)
    label_counts = torch.zeros(model.config.output_dim, dtype=torch.long)
    num_examples = 0
    modules = [model] + ([alternative_model] if has_alternative else [])
    batches = iterate_batches(data, model.backbone, collate_fn, batch_size, label_column)
    total = len(batches) if hasattr(batches, "__len__") else None
    with eval_mode(*modules):
        for batch in tqdm(batches, total=total, desc="evaluating OCD", unit="batch", disable=not progress):
            inputs, labels = split_batch(batch)
            labels = _check_labels(labels, task, model.config.output_dim).to(model.device)
            evaluator(to_device(inputs, model.device), labels)
            num_examples += labels.shape[0]
            if task == "classification":
                label_counts += torch.bincount(labels.view(-1).cpu(), minlength=model.config.output_dim)
    if num_examples == 0:
        raise ValueError("The evaluation data yielded no batch.")
    metadata: dict[str, Any] = {
        "task": task,
        "num_examples": num_examples,
        "seeds": list(seeds),
        "num_samples": num_samples,
        "num_inference_steps": num_inference_steps or model.config.num_inference_steps,
        "base_model_name_or_path": model.config.base_model_name_or_path,
        "target_module": model.target_name,
        "alternative_target_module": alternative_model.target_name if has_alternative else None,
        "overfit_settings": settings,
        "global_rho": evaluator.global_rho,
    }
    if task == "classification":
        metadata["majority_accuracy"] = float(label_counts.max()) / num_examples
    table = _build_table(evaluator.results(), metadata, num_samples, alternative_model)
    if output_dir is not None:
        table.save(output_dir)
    return table


def _build_table(results: dict[str, list[dict[str, float]]], metadata: dict[str, Any], num_samples: int, alternative: OCDWrapper | None) -> ResultsTable:
    rows = []
    for row, runs in results.items():
        description = ROW_DESCRIPTIONS[row].format(k=num_samples, layer=alternative.target_name if alternative is not None else "")
        values = {metric: [run[metric] for run in runs] for metric in runs[0]}
        rows.append(ResultRow(row_name(row, num_samples), ROW_KINDS[row], description, values))
    return ResultsTable(rows, metadata, runs_label="seeds")


# ----- entry points for the command line ----------------------------------------------------------


def evaluate_from_paths(
    model_path: str,
    eval_dataset_path: str,
    output_dir: str,
    *,
    split: str | None = None,
    delta_dataset_path: str | None = None,
    alternative_model_path: str | None = None,
    label_column: str = "label",
    batch_size: int = 32,
    seeds: Sequence[int] = (0, 1, 2),
    num_samples: int = 5,
    rows: Sequence[str] | None = None,
    max_examples: int | None = None,
    progress: bool = True,
) -> ResultsTable:
    """Load a saved hypernetwork (and its backbone), a preprocessed dataset saved with
    ``Dataset.save_to_disk`` and optionally the harvested deltas and a second hypernetwork sharing
    the backbone; evaluate and write the results to ``output_dir``."""
    from datasets import DatasetDict, load_from_disk

    model = OCDWrapper.from_pretrained(model_path)
    alternative = OCDWrapper.from_pretrained(alternative_model_path, backbone=model.backbone) if alternative_model_path else None
    data = load_from_disk(eval_dataset_path)
    if isinstance(data, DatasetDict):
        if split not in data:
            raise ValueError(f"{eval_dataset_path} holds the splits {list(data)}; pass split= (e.g. 'test').")
        data = data[split]
    if max_examples is not None:
        data = data.select(range(min(max_examples, len(data))))
    return evaluate_ocd(
        model, data, delta_dataset=delta_dataset_path or None, alternative_model=alternative, seeds=seeds,
        num_samples=num_samples, rows=rows, batch_size=batch_size, label_column=label_column, output_dir=output_dir,
        progress=progress,
    )


def aggregate_from_paths(result_paths: Sequence[str], output_dir: str | None = None) -> ResultsTable:
    """Aggregate ``results.json`` files of independently trained models (mean ± sd over models)."""
    table = aggregate_results([ResultsTable.from_json(Path(path)) for path in result_paths])
    if output_dir is not None:
        table.save(output_dir)
    return table
