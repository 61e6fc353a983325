"""Evaluate a trained OCD hypernetwork on a held-out split against the base model, ablations and bounds.

Rows (see :data:`ROW_DESCRIPTIONS`): ``base``; ``ocd_1``, ``ocd_ens{k}``, ``ocd_mean{k}``; the ablations
``no_scale``, ``nearest_neighbour`` and ``alternative_layer``; the bounds ``oracle`` (overfits on the
true test label) and ``label_free`` (``Σ_y p_base(y|x) Δ(x, y)``). Every row is computed batch by
batch with no loop over samples. Stochastic rows are repeated over sampling seeds, and
:func:`aggregate_results` combines the tables of independently trained models. Both return a
:class:`ResultsTable` that saves itself as JSON, a markdown table and a PNG plot.
"""

from __future__ import annotations

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

from .hypernetwork import delta_scale
from .modeling_ocd import OCDWrapper, repeat_batch
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
                "metrics": {m: {"mean": row.mean(m), "sd": _none_if_nan(row.sd(m)), "values": v} for m, v in row.values.items()},
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
            ResultRow(r["name"], r["kind"], r["description"], {m: [float(x) for x in v["values"]] for m, v in r["metrics"].items()})
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
            notes.append(f"-{BOUND_MARK.strip()} bounds are not deployable methods: they overfit at test time and `oracle` uses the test labels.")
        if "majority_accuracy" in self.metadata:
            notes.append(f"- majority-class accuracy on this split: {self.metadata['majority_accuracy']:.4f}")
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"

    def plot(self, path: str | os.PathLike, metrics: Sequence[str] | None = None) -> Path:
        """Save a bar chart (one panel per metric, error bars = sd over runs, bounds hatched) as PNG."""
        from matplotlib.figure import Figure

        task = self.metadata.get("task", "classification")
        metrics = [m for m in (metrics or DEFAULT_PLOT_METRICS.get(task, ())) if m in self.metrics] or self.metrics[:2]
        colours = {"reference": "0.55", "OCD": "tab:blue", "ablation": "tab:orange", "bound": "tab:green"}
        figure = Figure(figsize=(4.5 * len(metrics), 0.45 * len(self.rows) + 1.5), layout="constrained")
        for index, metric in enumerate(metrics):
            axis = figure.add_subplot(1, len(metrics), index + 1)
            rows = [row for row in self.rows if metric in row.values]
            positions = np.arange(len(rows))
            errors = [0.0 if math.isnan(row.sd(metric)) else row.sd(metric) for row in rows]
            bars = axis.barh(positions, [row.mean(metric) for row in rows], xerr=errors, color=[colours.get(r.kind, "0.3") for r in rows])
            for bar, row in zip(bars, rows):
                if row.kind == "bound":
                    bar.set_hatch("//")
            if any(row.name == "base" for row in rows):
                axis.axvline(self["base"].mean(metric), color="k", linestyle="--", linewidth=0.8)
            axis.set_yticks(positions, [row.name + (BOUND_MARK if row.kind == "bound" else "") for row in rows])
            axis.invert_yaxis()
            axis.set_title(metric)
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


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


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
    """

    def __init__(
        self, deltas: Dataset, components: Sequence[str] = ("input", "activation", "output"), chunk_size: int = 4096, progress: bool = False
    ) -> None:
        missing = [CONDITION_COLUMNS[c] for c in components if CONDITION_COLUMNS[c] not in deltas.column_names] + [
            c for c in ("delta",) if c not in deltas.column_names
        ]
        if missing:
            raise ValueError(
                f"The delta dataset lacks the columns {missing}; pass a dataset in the delta-dataset format "
                "(ocd_hf.deltas.load_deltas(path))."
            )
        if len(deltas) == 0:
            raise ValueError("The delta dataset is empty; the nearest-neighbour ablation needs harvested training deltas.")
        self.dataset = deltas
        self.components = list(components)
        self.chunk_size = chunk_size
        columns = [CONDITION_COLUMNS[c] for c in self.components]
        table = deltas.with_format("torch", columns=columns)
        chunks = [table[start : start + chunk_size] for start in tqdm(range(0, len(deltas), chunk_size), desc="nearest-neighbour index", disable=not progress)]
        self.features = {c: torch.cat([chunk[CONDITION_COLUMNS[c]].float() for chunk in chunks]) for c in self.components}
        self.mean = {c: f.mean(0) for c, f in self.features.items()}
        self.std = {c: f.std(0, unbiased=False).clamp_min(1e-6) for c, f in self.features.items()}
        self.features = torch.cat([self.standardise(c, f) for c, f in self.features.items()], dim=1)
        self.delta_shape = tuple(deltas.features["delta"].shape)

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
        deltas = self.dataset.with_format("torch", columns=["delta"])[index.tolist()]["delta"]
        return deltas.to(cond.layer_input.device), index, distance


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
    harvest = model.config.harvest_config or {}
    settings = {"optimizer": harvest.get("optimizer", "adam"), "lr": float(harvest.get("lr", 5e-4)), "steps": int(harvest.get("steps", 3))}
    return {**settings, **(overrides or {})}


def available_rows(task: str, has_deltas: bool, has_alternative: bool) -> list[str]:
    rows = ["base", "ocd_1", "ocd_ens", "ocd_mean", "no_scale"]
    rows += ["nearest_neighbour"] * has_deltas + ["alternative_layer"] * has_alternative + ["oracle"]
    return rows + ["label_free"] * (task == "classification")


def _check_rows(rows: Sequence[str], task: str, has_deltas: bool, has_alternative: bool, num_samples: int) -> list[str]:
    requested = [name[:-len(str(num_samples))] if name in (f"ocd_ens{num_samples}", f"ocd_mean{num_samples}") else name for name in rows]
    unknown = sorted(set(requested) - set(ROW_KINDS))
    if unknown:
        raise ValueError(f"Unknown rows {unknown}; choose from {[row_name(r, num_samples) for r in ROW_KINDS]}.")
    if "nearest_neighbour" in requested and not has_deltas:
        raise ValueError("The nearest_neighbour row needs the harvested training deltas: pass delta_dataset=.")
    if "alternative_layer" in requested and not has_alternative:
        raise ValueError("The alternative_layer row needs a second trained OCDWrapper: pass alternative_model=.")
    if "label_free" in requested and task != "classification":
        raise ValueError("The label_free bound is defined for classification only (it sums over labels).")
    return ["base", *[r for r in requested if r != "base"]]


def _output_rows(outputs: Any, batch: int, task: str) -> torch.Tensor:
    """The model output as ``(batch, classes)`` logits or ``(batch, dims)`` predictions."""
    tensor = model_output_tensor(outputs)
    if task == "classification" and tensor.dim() != 2:
        raise ValueError(
            f"evaluate_ocd scores one prediction per sample; the backbone returns logits of shape {tuple(tensor.shape)}. "
            "Token-level outputs are not supported."
        )
    return tensor.reshape(batch, -1).float()


def _combine_draws(draws: torch.Tensor, task: str) -> torch.Tensor:
    """Ensemble of ``(batch, k, ...)`` draws: log of the mean probabilities, or the mean prediction."""
    if task == "classification":
        return torch.logsumexp(torch.log_softmax(draws, -1), dim=1) - math.log(draws.shape[1])
    return draws.mean(1)


@contextmanagerless_eval := None  # placeholder removed below
