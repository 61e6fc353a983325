"""Results tables and metrics shared by every generator's evaluation.

A :class:`ResultsTable` holds rows (the method's, its ablations, baselines and bounds) with each
metric's values over runs (sampling seeds, models or training seeds); it renders as JSON, a markdown
table (``mean ± sd``, bounds marked †) and a PNG plot (with a reliability diagram for
classification). :class:`MetricAccumulator` sums a row's metrics batch by batch, calibration
(ECE, Brier score) included. Nothing here names a method: a row's ``kind`` says what it is.
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
CALIBRATION_BINS = 15
METRIC_NOTES = {
    "ece": "expected calibration error: Σ_b (n_b/N) |accuracy_b − confidence_b| over {bins} equal-width bins of the top-label confidence",
    "brier": "Brier score: mean over samples of Σ_c (p_c − 1[y = c])² (0 to 2)",
}


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
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            source = repr(str(path_or_text)) if text != str(path_or_text) else "The JSON text"
            raise ValueError(
                f"{source} is not a results table: it has no 'rows' list. Pass a results.json written by "
                "evaluate_ocd / ocd-hf evaluate (or aggregate)."
            )
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
        for metric, note in METRIC_NOTES.items():
            if metric in metrics:
                notes.append(f"- {metric}: " + note.format(bins=self.metadata.get("calibration_bins", CALIBRATION_BINS)))
        if "majority_accuracy" in self.metadata:
            notes.append(f"- majority-class accuracy on this split: {self.metadata['majority_accuracy']:.4f}")
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"

    def plot(self, path: str | os.PathLike, metrics: Sequence[str] | None = None) -> Path:
        """Save a bar chart as PNG: one panel per metric, each row's difference from ``base`` (the
        effects are small next to the metric itself), error bars = sd over runs, bounds hatched; and,
        when the metadata holds reliability diagrams (classification), a reliability panel for
        ``base`` and the best generated row (:meth:`best_generated_row`)."""
        from matplotlib.figure import Figure

        task = self.metadata.get("task", "classification")
        metrics = [m for m in (metrics or DEFAULT_PLOT_METRICS.get(task, ())) if m in self.metrics] or self.metrics[:2]
        reliability = self.reliability_rows()
        panels = len(metrics) + (1 if reliability else 0)
        figure = Figure(figsize=(4.5 * panels, max(0.45 * len(self.rows) + 1.5, 4.0 if reliability else 0.0)), layout="constrained")
        for index, metric in enumerate(metrics):
            axis = figure.add_subplot(1, panels, index + 1)
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
        if reliability:
            self._plot_reliability(figure.add_subplot(1, panels, panels), reliability)
        figure.suptitle(self.metadata.get("title", "Evaluation") + f" (mean ± {INTERVAL_NAMES[self.interval]} over {self.runs_label}; † bounds)")
        figure.savefig(path, dpi=110)
        return Path(path)

    def best_generated_row(self, metric: str = "accuracy") -> ResultRow | None:
        """The generated row (a kind that is not a reference, baseline, ablation or bound) with the best
        mean ``metric`` (ties: the lower cross-entropy), or ``None`` if there is none."""
        rows = [row for row in self.rows if row.kind not in KIND_COLOURS and metric in row.values]
        if not rows:
            return None
        cross_entropy = lambda row: row.mean("cross_entropy") if "cross_entropy" in row.values else 0.0  # noqa: E731
        return max(rows, key=lambda row: (row.mean(metric), -cross_entropy(row)))

    def reliability_rows(self) -> dict[str, dict[str, list]]:
        """The reliability diagrams the plot draws: ``base``'s and the best generated row's, where the
        metadata holds them (``metadata["reliability"]``, one per classification row)."""
        diagrams = self.metadata.get("reliability") or {}
        best = self.best_generated_row()
        names = ["base"] + ([best.name] if best is not None else [])
        return {name: diagrams[name] for name in names if name in diagrams}

    def _plot_reliability(self, axis: Any, diagrams: dict[str, dict[str, list]]) -> None:
        axis.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="0.6", linewidth=0.8, label="perfect calibration")
        for name, diagram in diagrams.items():
            row = self[name]
            points = [(c, a, n) for c, a, n in zip(diagram["confidence"], diagram["accuracy"], diagram["count"]) if n > 0]
            confidence, accuracy, count = (np.array(v, dtype=float) for v in zip(*points)) if points else ([], [], [])
            colour = KIND_COLOURS.get(row.kind, METHOD_COLOUR)
            ece = f", ECE {row.mean('ece'):.3f}" if "ece" in row.values else ""
            axis.plot(confidence, accuracy, marker="o", color=colour, label=f"{name}{ece}")
            if points:
                axis.scatter(confidence, accuracy, s=200 * count / count.sum(), color=colour, alpha=0.3)
        bins = len(next(iter(diagrams.values()))["count"])
        axis.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), xlabel="confidence (top label)", ylabel="accuracy",
                 title=f"reliability ({bins} bins; marker area ∝ samples)")
        axis.legend(loc="upper left", fontsize="small")

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


CONFIGURATION_KEYS = "configuration_keys"


def check_same_configuration(results: Sequence[ResultsTable]) -> None:
    """Refuse tables whose evaluation settings differ: the metadata keys each table lists under
    ``configuration_keys`` (what an evaluation declares must match for its numbers to be comparable) must
    hold equal values in every table; ``ValueError`` names each differing key and its values."""
    keys = sorted({key for table in results for key in table.metadata.get(CONFIGURATION_KEYS, ())})
    differing = []
    for key in keys:
        values = [table.metadata.get(key) for table in results]
        if any(value != values[0] for value in values[1:]):
            differing.append(f"{key}: {values}")
    if differing:
        raise ValueError(
            f"Cannot aggregate results of different configurations (values per table, in the order given): "
            f"{'; '.join(differing)}. Aggregate only runs evaluated with the same settings, or evaluate them again."
        )


def aggregate_results(results: Sequence[ResultsTable]) -> ResultsTable:
    """Combine the tables of independently trained models into one: each row's values become the
    per-model means, so the table shows ``mean ± sd`` over models. Tables of different configurations
    (:func:`check_same_configuration`) are refused."""
    if not results:
        raise ValueError("aggregate_results needs at least one ResultsTable.")
    tasks = {r.metadata.get("task") for r in results}
    if len(tasks) > 1:
        raise ValueError(f"Cannot aggregate results of different tasks: {sorted(map(str, tasks))}.")
    check_same_configuration(results)
    rows: dict[str, ResultRow] = {}
    for table in results:
        for row in table.rows:
            merged = rows.setdefault(row.name, ResultRow(row.name, row.kind, row.description))
            for metric in row.values:
                merged.values.setdefault(metric, []).append(row.mean(metric))
    metadata = {"task": tasks.pop(), "num_models": len(results), "models": [r.metadata for r in results]}
    diagrams: dict[str, list[dict[str, list]]] = {}
    for table in results:
        for name, diagram in (table.metadata.get("reliability") or {}).items():
            diagrams.setdefault(name, []).append(diagram)
    if diagrams:  # every model's predictions pooled, bin by bin
        metadata["calibration_bins"] = results[0].metadata.get("calibration_bins", CALIBRATION_BINS)
        metadata["reliability"] = {name: pool_reliability(parts) for name, parts in diagrams.items()}
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


def reliability_diagram(counts: torch.Tensor, confidence_sums: torch.Tensor, correct_sums: torch.Tensor) -> dict[str, list]:
    """A JSON-ready reliability diagram from per-bin sums: the ``count`` of samples in each equal-width
    bin of the top-label confidence (bin ``b`` holds ``[b/B, (b+1)/B)``, the last one includes 1), their
    mean ``confidence`` and their ``accuracy`` (``None`` for an empty bin)."""
    counts, confidence_sums, correct_sums = (torch.as_tensor(v, dtype=torch.float64).cpu() for v in (counts, confidence_sums, correct_sums))
    mean = lambda sums: [float(s / n) if n > 0 else None for s, n in zip(sums.tolist(), counts.tolist())]  # noqa: E731
    return {"count": [int(n) for n in counts.tolist()], "confidence": mean(confidence_sums), "accuracy": mean(correct_sums)}


def pool_reliability(diagrams: Sequence[dict[str, list]]) -> dict[str, list]:
    """One reliability diagram of all the samples of several (runs, models), bin by bin."""
    counts = torch.tensor([d["count"] for d in diagrams], dtype=torch.float64)
    sums = {key: torch.tensor([[v or 0.0 for v in d[key]] for d in diagrams], dtype=torch.float64) * counts for key in ("confidence", "accuracy")}
    return reliability_diagram(counts.sum(0), sums["confidence"].sum(0), sums["accuracy"].sum(0))


def expected_calibration_error(diagram: dict[str, list]) -> float:
    """``Σ_b (n_b / N) |accuracy_b − confidence_b|`` of a reliability diagram."""
    total = sum(diagram["count"])
    gaps = (n * abs(a - c) for n, a, c in zip(diagram["count"], diagram["accuracy"], diagram["confidence"]) if n > 0)
    return float(sum(gaps) / total) if total else float("nan")


class MetricAccumulator:
    """Running sums of one row's metrics over batches (no per-sample Python work).

    Classification: accuracy, balanced accuracy, cross-entropy and calibration — the expected
    calibration error over ``num_bins`` equal-width bins of the top-label confidence and the
    multi-class Brier score, both on ``softmax(outputs)`` (the probabilities the cross-entropy
    scores). Per-bin counts, confidence and correct sums are kept as tensors, so any split of the
    data into batches gives the same metrics.
    """

    def __init__(self, task: str, num_classes: int, num_bins: int = CALIBRATION_BINS) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
        self.task = task
        self.num_classes = num_classes
        self.num_bins = num_bins
        self.count = 0
        self.sums: dict[str, float] = {}
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long) if task == "classification" else None
        self.bins = {key: torch.zeros(num_bins, dtype=torch.float64) for key in ("count", "confidence", "correct")}

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
        correct = predictions == labels
        self._add("correct", correct.sum())
        log_probs = F.log_softmax(outputs, dim=-1)
        self._add("cross_entropy", F.nll_loss(log_probs, labels, reduction="sum"))
        probs = log_probs.double().exp()
        self._add("brier", (probs - F.one_hot(labels, probs.shape[-1]).to(probs.dtype)).pow(2).sum())
        confidence = probs.gather(-1, predictions.unsqueeze(-1)).squeeze(-1)
        index = (confidence * self.num_bins).long().clamp(0, self.num_bins - 1)
        for key, weights in (("count", None), ("confidence", confidence), ("correct", correct.double())):
            self.bins[key] += torch.bincount(index, weights=weights, minlength=self.num_bins).double().cpu()
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
            metrics["ece"] = float((self.bins["correct"] - self.bins["confidence"]).abs().sum()) / n
            metrics["brier"] = self.sums["brier"] / n
            if "flipped" in self.sums:
                metrics["flip_rate"] = self.sums["flipped"] / n
                metrics["flips_fixed"] = self.sums["flips_fixed"]
                metrics["flips_broken"] = self.sums["flips_broken"]
        if "delta_cosine" in self.sums:
            metrics["delta_cosine"] = self.sums["delta_cosine"] / n
        return metrics

    def reliability(self) -> dict[str, list]:
        """The reliability diagram of everything seen (:func:`reliability_diagram`); classification only."""
        if self.task != "classification":
            raise ValueError("A reliability diagram needs class probabilities: the task is regression.")
        return reliability_diagram(self.bins["count"], self.bins["confidence"], self.bins["correct"])
