"""Evaluate a trained OCD hypernetwork on a held-out split against the base model, ablations and bounds
(and, for ``delta_mode="latent"``, what its weight VAE keeps of the harvested deltas: :func:`evaluate_reconstruction`).

Rows (see :data:`ROW_DESCRIPTIONS`): ``base``; ``ocd_1``, ``ocd_ens{k}``, ``ocd_mean{k}``; the ablations
``no_scale``, ``nearest_neighbour`` and ``alternative_layer``; the bounds ``oracle`` (overfits on the
true test label) and ``label_free`` (``Σ_y p_base(y|x) Δ(x, y)``). Every row is computed batch by
batch with no loop over samples. Stochastic rows are repeated over sampling seeds, and
:func:`aggregate_results` combines the tables of independently trained models. Both return a
:class:`ResultsTable` that saves itself as JSON, a markdown table and a PNG plot.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from datasets import Dataset
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ...checks import check_class_labels, check_int, check_writable_dir
from ...data import column_tensor, iterate_batches, split_batch, to_device
from ...factorised import expand_factors
from ...finetune import overfit_deltas
from ...results import CALIBRATION_BINS, MetricAccumulator, ResultRow, ResultsTable, pool_reliability
from ...target import CONDITION_FIELDS, Conditioning, model_output_tensor
from .deltas import materialise_deltas, resolve_deltas
from .modeling import OCDWrapper

STOCHASTIC_ROWS = ("ocd_1", "ocd_ens", "ocd_mean", "no_scale", "alternative_layer")
GENERATED_KIND = "OCD"  # the kind of the rows OCD generates (what a card's model-index reports)
ROW_KINDS = {
    "base": "reference",
    "ocd_1": GENERATED_KIND,
    "ocd_ens": GENERATED_KIND,
    "ocd_mean": GENERATED_KIND,
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


def row_name(row: str, num_samples: int) -> str:
    """The displayed name of a row: ``ocd_ens`` / ``ocd_mean`` carry the ensemble size."""
    return f"{row}{num_samples}" if row in ("ocd_ens", "ocd_mean") else row


# ----- metrics ------------------------------------------------------------------------------------


def delta_cosine(deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine between deltas ``(batch, ..., out, in)`` and reference deltas ``(batch, out, in)``,
    averaged over any draw dimensions: ``(batch,)``."""
    flat = deltas.reshape(deltas.shape[0], -1, reference[0].numel()).float()
    return F.cosine_similarity(flat, reference.reshape(reference.shape[0], 1, -1).float(), dim=-1).mean(1)


# ----- nearest-neighbour ablation -----------------------------------------------------------------



class NearestNeighbourDeltas:
    """The harvested delta of the training sample nearest to a query in the conditioning space.

    Each feature of ``I(x)`` is standardised with the training statistics and each component is
    divided by the square root of its width, so the input, activation and output components
    weigh equally. Distances are computed for a query batch against ``chunk_size`` training rows
    at a time, so memory stays bounded by ``batch × chunk_size``.

    Deltas stored as left factors (``delta_factor``, see :mod:`ocd_hf.methods.ocd.deltas`) are expanded to
    ``u_n v_nᵀ`` (``v_n`` from the neighbour's own ``layer_input`` by ``metadata``'s factor rule)
    for the selected neighbours only.
    """

    def __init__(
        self,
        deltas: Dataset,
        components: Sequence[str] = tuple(CONDITION_FIELDS),
        chunk_size: int = 4096,
        progress: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.delta_columns = ["delta_factor", "layer_input"] if "delta_factor" in deltas.column_names else ["delta"]
        missing = [c for c in [*self.delta_columns, *(CONDITION_FIELDS[c] for c in components)] if c not in deltas.column_names]
        if missing:
            raise ValueError(
                f"The delta dataset lacks the columns {missing}; pass a dataset in the delta-dataset format "
                "(ocd_hf.load_deltas(path))."
            )
        if len(deltas) == 0:
            raise ValueError("The delta dataset is empty; the nearest-neighbour ablation needs harvested training deltas.")
        self.dataset = deltas
        self.metadata = dict(metadata or {})
        self.components = list(components)
        self.chunk_size = chunk_size
        starts = tqdm(range(0, len(deltas), chunk_size), desc="nearest-neighbour index", disable=not progress, leave=False)
        chunks = [{c: column_tensor(deltas, slice(start, start + chunk_size), CONDITION_FIELDS[c]) for c in self.components} for start in starts]
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
        values = cond.components()
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


# ----- evaluation ---------------------------------------------------------------------------------


def oracle_settings(model: OCDWrapper, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Overfitting settings of the harvest (``config.harvest_config``; defaults Adam, lr 5e-4, 3 steps)."""
    return {**model.overfit_settings(), **(overrides or {})}


def is_deterministic(model: OCDWrapper) -> bool:
    """Whether ``model`` generates the same delta at every draw: a regressor, or a label classifier combining the
    exact deltas by their expectation. Its ensemble and mean network equal one draw, and seeds change nothing."""
    config = model.config
    return config.generator_type == "regression" or (config.generator_type == "label" and config.label_combination == "expectation")


def available_rows(task: str, has_deltas: bool, has_alternative: bool, generator: str = "diffusion", deterministic: bool = False) -> list[str]:
    """Every row that the task, the generator and the given inputs allow, in table order (a deterministic generator's
    ensemble and mean network are left out: they equal ``ocd_1``)."""
    rows = ["base", "ocd_1"] + ([] if deterministic else ["ocd_ens", "ocd_mean"]) + ([] if generator == "label" else ["no_scale"])
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


def _check_labels(labels: torch.Tensor, task: str, num_classes: int, first_row: int = 0) -> torch.Tensor:
    """Class indices ``(batch,)`` for classification (refused with the row ids, counted over the evaluation data from
    ``first_row``, when not in ``[0, num_classes)``), float targets for regression."""
    if task == "regression":
        return labels.float()
    if labels.is_floating_point():
        raise ValueError(f"Classification labels must be integer class indices in [0, {num_classes}); got dtype {labels.dtype}.")
    return check_class_labels(labels, num_classes, ids=torch.arange(first_row, first_row + labels.numel()))


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
        calibration_bins: int = CALIBRATION_BINS,
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
        self.accumulators = {
            r: [MetricAccumulator(self.task, classes, calibration_bins) for _ in (seeds if r in STOCHASTIC_ROWS else [0])] for r in rows
        }
        device = model.device
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.alternative_generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.noise: list[torch.Tensor | None] = [None] * len(seeds)
        self.alternative_noise: list[torch.Tensor | None] = [None] * len(seeds)
        self.chunk_noise, self.chunk_alternative_noise = self.noise, self.alternative_noise

    def draws(self) -> int:
        """Deltas drawn per input and seed for the OCD rows (0 when none is requested)."""
        if not any(r in self.rows for r in ("ocd_1", "ocd_ens", "ocd_mean", "no_scale")):
            return 0
        return self.num_samples if any(r in self.rows for r in ("ocd_ens", "ocd_mean")) else 1

    def draw_noise(self, batch: int) -> None:
        """Draw the diffusion samplers' starting noise for a whole batch, from each seed's generator, before the batch is
        split into chunks: a chunk takes its rows' noise, so chunked and whole batches sample the same deltas."""

        def noise(model: OCDWrapper, draws: int, generator: torch.Generator) -> torch.Tensor | None:
            if model.config.generator_type != "diffusion" or draws == 0:
                return None
            parameter = next(model.hypernetwork.parameters())
            shape = (batch, draws, *model.hypernetwork.denoiser_sample_shape())
            return randn_tensor(shape, generator=generator, device=parameter.device, dtype=parameter.dtype)

        self.noise = [noise(self.model, self.draws(), generator) for generator in self.generators]
        if "alternative_layer" in self.rows:
            self.alternative_noise = [noise(self.alternative, 1, generator) for generator in self.alternative_generators]

    def chunk(self, start: int, end: int) -> "_RowEvaluator":
        """Restrict the drawn noise to rows ``[start, end)`` of the batch (see :meth:`draw_noise`)."""
        self.chunk_noise = [None if n is None else n[start:end] for n in self.noise]
        self.chunk_alternative_noise = [None if n is None else n[start:end] for n in self.alternative_noise]
        return self

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
        draws = self.draws()
        if draws:
            if self.model.config.generator_type == "label":
                deltas = self.model.generate_deltas(cond, draws, self.generators[run], inputs=inputs)
            else:
                unit = self.model.generate_deltas(
                    cond, draws, self.generators[run], self.num_inference_steps, rho=1.0, inputs=inputs, noise=self.chunk_noise[run]
                )
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
            deltas = alternative.generate_deltas(
                alternative.conditioning(**inputs), 1, self.alternative_generators[run], self.num_inference_steps,
                noise=self.chunk_alternative_noise[run],
            )
            with torch.no_grad():
                outputs = _output_rows(alternative.forward_with_deltas(deltas[:, 0], **inputs), batch, self.task)
            self.update("alternative_layer", outputs, labels, base, None, run)

    def results(self) -> dict[str, list[dict[str, float]]]:
        return {row: [acc.compute() for acc in accumulators] for row, accumulators in self.accumulators.items()}

    def reliability(self) -> dict[str, dict[str, list]]:
        """Each row's reliability diagram, its runs (sampling seeds) pooled; classification only."""
        return {row: pool_reliability([acc.reliability() for acc in accumulators]) for row, accumulators in self.accumulators.items()}


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
    calibration_bins: int = CALIBRATION_BINS,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    max_chunk_size: int | None = 256,
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
        seeds: sampling seeds; the stochastic rows are run once per seed, the others once. A deterministic generator
            (``"regression"``, or ``"label"`` with ``label_combination="expectation"``) is run with the first seed only,
            and its ensemble and mean-network rows are left out by default (they equal ``ocd_1``).
        num_samples: draws of the ensemble and mean-network rows.
        rows: the rows to compute (default: all that the inputs allow).
        oracle_overrides: overfitting settings replacing the harvest's for ``oracle`` and ``label_free``.
        neighbour_chunk_size: training rows per distance block of the nearest-neighbour search.
        calibration_bins: equal-width bins of the top-label confidence for the ECE and the reliability diagrams.
        output_dir: if given, ``results.json``, ``results.md`` and ``results.png`` are written there (checked
            writable before the evaluation starts).
        max_chunk_size: at most this many inputs go through the rows at once (a batch is split), so that memory
            does not grow with the batch size (``None``: whole batches). The samplers' starting noise is drawn for the
            whole batch first, so chunking does not change the results (a ``"label"`` generator with
            ``label_combination="sample"`` or a stochastic scheduler draws per chunk: same distribution, other draws).

    Returns:
        A :class:`ResultsTable`: accuracy, balanced accuracy, cross-entropy, expected calibration error
        (``ece``) and Brier score (``brier``) (classification) or MSE (regression) per row; for every row
        but ``base`` the flip rate vs base and the flips that fix or break a prediction (classification);
        and, when ``oracle`` is computed, the mean cosine between the row's deltas and the oracle deltas.
        For classification, ``metadata["reliability"]`` holds each
        row's reliability diagram (per-bin ``count``, mean ``confidence`` and ``accuracy``, the row's
        seeds pooled), drawn for ``base`` and the best OCD row in ``results.png``.
    """
    task = model.config.task
    if not seeds:
        raise ValueError("seeds must hold at least one sampling seed, e.g. seeds=(0, 1, 2).")
    for seed in seeds:
        check_int("seeds", seed, minimum=0, fix="sampling seeds are non-negative integers, e.g. seeds=(0, 1, 2)")
    check_int("num_samples", num_samples, minimum=1, fix="draws of the ensemble rows, e.g. num_samples=5")
    check_int("batch_size", batch_size, minimum=1, fix="inputs per batch of a datasets.Dataset, e.g. batch_size=32")
    check_int("num_inference_steps", num_inference_steps, minimum=1, optional=True,
              fix="sampler steps, e.g. 10, or None for config.num_inference_steps")
    check_int("max_chunk_size", max_chunk_size, minimum=1, optional=True, fix="inputs through the rows at once, or None for whole batches")
    check_int("calibration_bins", calibration_bins, minimum=1, fix="e.g. calibration_bins=15")
    if output_dir is not None:
        check_writable_dir(output_dir)
    has_deltas, has_alternative = delta_dataset is not None, alternative_model is not None
    generator = model.config.generator_type
    deterministic = is_deterministic(model) and (alternative_model is None or is_deterministic(alternative_model))
    seeds = list(seeds)[:1] if deterministic else list(seeds)
    rows = _check_rows(
        rows or available_rows(task, has_deltas, has_alternative, generator, is_deterministic(model)), task, has_deltas, has_alternative,
        num_samples, generator,
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
    evaluator = _RowEvaluator(model, rows, seeds, num_samples, neighbours, alternative_model, num_inference_steps, settings, calibration_bins)
    label_counts = torch.zeros(model.config.output_dim, dtype=torch.long)
    num_examples = 0
    modules = [model] + ([alternative_model] if has_alternative else [])
    batches = iterate_batches(data, model.backbone, collate_fn, batch_size, label_column)
    total = len(batches) if hasattr(batches, "__len__") else None
    with eval_mode(*modules):
        for batch in tqdm(batches, total=total, desc="evaluating OCD", unit="batch", disable=not progress):
            inputs, labels = split_batch(batch)
            labels = _check_labels(labels, task, model.config.output_dim, num_examples).to(model.device)
            inputs = to_device(inputs, model.device)
            size = labels.shape[0]
            evaluator.draw_noise(size)
            step = max_chunk_size or size
            for start in range(0, size, step):
                end = min(start + step, size)
                evaluator.chunk(start, end)(slice_batch(inputs, start, end, size), labels[start:end])
            num_examples += size
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
        "max_chunk_size": max_chunk_size,
        "base_model_name_or_path": model.config.base_model_name_or_path,
        "target_module": model.target_name,
        "alternative_target_module": alternative_model.target_name if has_alternative else None,
        "overfit_settings": settings,
        "global_rho": evaluator.global_rho,
        # What must be equal for aggregate_results to average this table with another model's (the backbone may differ).
        "configuration_keys": [
            "task", "num_examples", "seeds", "num_samples", "num_inference_steps", "target_module", "alternative_target_module",
            "overfit_settings",
        ],
    }
    if task == "classification":
        metadata["majority_accuracy"] = float(label_counts.max()) / num_examples
        metadata["calibration_bins"] = calibration_bins
        metadata["reliability"] = {row_name(row, num_samples): diagram for row, diagram in evaluator.reliability().items()}
    table = _build_table(evaluator.results(), metadata, num_samples, alternative_model)
    if output_dir is not None:
        table.save(output_dir)
    return table


def slice_batch(inputs: Mapping[str, Any], start: int, end: int, size: int) -> dict[str, Any]:
    """Rows ``[start, end)`` of every tensor input whose first dimension is the batch (``size``); other inputs as they are."""
    return {
        key: value[start:end] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size else value
        for key, value in inputs.items()
    }


def _build_table(results: dict[str, list[dict[str, float]]], metadata: dict[str, Any], num_samples: int, alternative: OCDWrapper | None) -> ResultsTable:
    rows = []
    for row, runs in results.items():
        description = ROW_DESCRIPTIONS[row].format(k=num_samples, layer=alternative.target_name if alternative is not None else "")
        values = {metric: [run[metric] for run in runs] for metric in runs[0]}
        rows.append(ResultRow(row_name(row, num_samples), ROW_KINDS[row], description, values))
    return ResultsTable(rows, {"title": "OCD evaluation", **metadata}, runs_label="seeds")


@torch.no_grad()
def evaluate_reconstruction(
    model: OCDWrapper,
    data: Dataset,
    delta_dataset: Dataset,
    collate_fn: Callable[[list[dict]], Any],
    batch_size: int = 32,
) -> dict[str, Any]:
    """How much of the harvested deltas a ``delta_mode="latent"`` model's VAE keeps, judged by what they do.

    For every row of ``delta_dataset`` (a delta dataset, or a split of it such as the validation rows training held
    out), its sample is row ``id`` of ``data`` (the harvested dataset; ``collate_fn`` turns rows into the backbone's
    inputs, as for :func:`evaluate_ocd`). Returns the accuracy and cross-entropy of the backbone alone (``base``), with
    each sample's own harvested delta (``harvested``) and with that delta through the VAE (``reconstructed``,
    :meth:`~ocd_hf.methods.ocd.hypernetwork.OCDHypernetwork.reconstruct_deltas`), and the mean cosine and relative
    error ``‖Δ̂ − Δ‖ / ‖Δ‖`` of the reconstructions (classification).
    """
    if model.config.delta_mode != "latent":
        raise ValueError(f"evaluate_reconstruction measures a weight VAE: the model's delta_mode is {model.config.delta_mode!r}, not 'latent'.")
    if model.config.task != "classification":
        raise ValueError("evaluate_reconstruction reports accuracy: it needs a classification backbone.")
    check_int("batch_size", batch_size, minimum=1, fix="samples per batch, e.g. batch_size=32")
    sums = {name: {"accuracy": 0.0, "cross_entropy": 0.0} for name in ("base", "harvested", "reconstructed")}
    cosine, error, count = 0.0, 0.0, 0
    rows = delta_dataset.with_format("torch") if delta_dataset.format["type"] != "custom" else delta_dataset
    with model.hypernetwork_eval():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            deltas = batch["delta"].float().to(model.device)
            inputs, labels = split_batch(collate_fn([data[int(index)] for index in batch["id"]]))
            inputs, labels = to_device(inputs, model.device), labels.to(model.device).long()
            reconstructed = model.hypernetwork.reconstruct_deltas(deltas)
            outputs = {
                "base": model_output_tensor(model.backbone(**inputs)),
                "harvested": model_output_tensor(model.forward_with_deltas(deltas, **inputs)),
                "reconstructed": model_output_tensor(model.forward_with_deltas(reconstructed, **inputs)),
            }
            for name, logits in outputs.items():
                sums[name]["accuracy"] += float((logits.argmax(-1) == labels).sum())
                sums[name]["cross_entropy"] += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            flat, target = reconstructed.flatten(1), deltas.flatten(1)
            cosine += float(F.cosine_similarity(flat, target, dim=1).sum())
            error += float(((flat - target).norm(dim=1) / target.norm(dim=1).clamp_min(1e-12)).sum())
            count += labels.shape[0]
    if count == 0:
        raise ValueError("delta_dataset holds no rows: pass the harvested deltas to measure.")
    result: dict[str, Any] = {name: {key: value / count for key, value in metrics.items()} for name, metrics in sums.items()}
    return {**result, "cosine": cosine / count, "relative_error": error / count, "num_examples": count}
