"""Results tables and metrics shared by every generator's evaluation.

A :class:`ResultsTable` holds rows (the method's, its ablations, baselines and bounds) with each
metric's values over runs (sampling seeds, models or training seeds); it renders as JSON, a markdown
table (``mean ± sd``, bounds marked †) and a PNG plot. :class:`MetricAccumulator` sums a row's
metrics batch by batch. Nothing here names a method: a row's ``kind`` says what it is.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

METRIC_FORMATS = {"flips_fixed": "{:.1f}", "flips_broken": "{:.1f}"}
DEFAULT_PLOT_METRICS = {"classification": ("accuracy", "cross_entropy"), "regression": ("mse",)}
BOUND_MARK = " †"
INTERVALS = ("sd", "ci95")
INTERVAL_NAMES = {"sd": "sd", "ci95": "95% CI"}
KIND_COLOURS = {"reference": "0.55", "baseline": "0.35", "ablation": "tab:orange", "bound": "tab:green"}
METHOD_COLOUR = "tab:blue"


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

    def ci95(self, metric: str) -> float:
        """Half-width of the normal-approximation 95% confidence interval of the mean; ``nan`` for a single run."""
        values = self.values[metric]
        return 1.959963984540054 * self.sd(metric) / math.sqrt(len(values)) if len(values) > 1 else float("nan")

    def spread(self, metric: str, interval: str) -> float:
        """The ``±`` the table shows: the sd over runs (``"sd"``) or the 95% CI of the mean (``"ci95"``)."""
        return self.ci95(metric) if interval == "ci95" else self.sd(metric)

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
    interval: str = "sd"

    def __post_init__(self) -> None:
        if self.interval not in INTERVALS:
            raise ValueError(f"interval must be one of {INTERVALS}, got {self.interval!r}.")

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
        return {"runs_label": self.runs_label, "interval": self.interval, "metadata": self.metadata, "rows": rows}

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
        return cls(rows, data.get("metadata", {}), data.get("runs_label", "seeds"), data.get("interval", "sd"))

    def to_markdown(self, metrics: Sequence[str] | None = None) -> str:
        """A markdown table with ``mean ± sd`` (or ``± 95% CI``) per metric, the number of runs, and the bounds marked."""
        metrics = list(metrics or self.metrics)
        header = ["row", "kind", f"n {self.runs_label}", *metrics]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            name = row.name + (BOUND_MARK if row.kind == "bound" else "")
            cells = [name, row.kind, str(row.num_runs)] + [_format_cell(row, m, self.interval) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- `{row.name}`: {row.description}" for row in self.rows]
        if any(row.kind == "bound" for row in self.rows):
            notes.append(f"- {BOUND_MARK.strip()} bounds are not deployable methods: they use test-time information (labels or overfitting).")
        notes.append(f"- ± is the {INTERVAL_NAMES[self.interval]} over {self.runs_label}.")
        if "majority_accuracy" in self.metadata:
            notes.append(f"- majority-class accuracy on this split: {self.metadata['majority_accuracy']:.4f}")
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"

    def plot(self, path: str | os.PathLike, metrics: Sequence[str] | None = None) -> Path:
        """Save a bar chart as PNG: one panel per metric, each row's difference from ``base`` (the
        effects are small next to the metric itself), error bars = sd over runs, bounds hatched."""
        from matplotlib.figure import Figure

        task = self.metadata.get("task", "classification")
        metrics = [m for m in (metrics or DEFAULT_PLOT_METRICS.get(task, ())) if m in self.metrics] or self.metrics[:2]
        figure = Figure(figsize=(4.5 * len(metrics), 0.45 * len(self.rows) + 1.5), layout="constrained")
        for index, metric in enumerate(metrics):
            axis = figure.add_subplot(1, len(metrics), index + 1)
            rows = [row for row in self.rows if metric in row.values]
            has_base = any(row.name == "base" for row in rows)
            reference = self["base"].mean(metric) if has_base else 0.0
            positions = np.arange(len(rows))
            spreads = [row.spread(metric, self.interval) for row in rows]
            errors = [0.0 if math.isnan(spread) else spread for spread in spreads]
            heights = [row.mean(metric) - reference for row in rows]
            bars = axis.barh(positions, heights, xerr=errors, color=[KIND_COLOURS.get(r.kind, METHOD_COLOUR) for r in rows])
            for bar, row in zip(bars, rows):
                if row.kind == "bound":
                    bar.set_hatch("//")
            axis.axvline(0.0, color="k", linewidth=0.8)
            axis.set_yticks(positions, [row.name + (BOUND_MARK if row.kind == "bound" else "") for row in rows])
            axis.invert_yaxis()
            axis.set_title(f"{metric} − base (base = {reference:.4g})" if has_base else metric)
        figure.suptitle(self.metadata.get("title", "Evaluation") + f" (mean ± {INTERVAL_NAMES[self.interval]} over {self.runs_label}; † bounds)")
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


def _format_cell(row: ResultRow, metric: str, interval: str = "sd") -> str:
    if metric not in row.values:
        return "—"
    fmt = METRIC_FORMATS.get(metric, "{:.4f}")
    mean, spread = row.mean(metric), row.spread(metric, interval)
    return fmt.format(mean) if math.isnan(spread) else f"{fmt.format(mean)} ± {fmt.format(spread)}"


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
