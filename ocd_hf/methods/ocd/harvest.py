"""Harvest: for every sample of a dataset, the weight delta of one Linear layer fine-tuned on that
sample alone, with the conditioning ``I(x)``, written shard by shard into a resumable delta dataset.

The math is :func:`ocd_hf.finetune.overfit_deltas` (a whole batch of independent single-sample
fine-tunings at once). A layer that sees one vector per sample has rank-1 deltas ``u vᵀ`` whose
right factor ``v`` follows from its input (:mod:`ocd_hf.factorised`); the harvest measures this on
every sample and can then store ``u`` alone (``delta_storage``).

Under ``accelerate launch`` every process harvests every ``num_processes``-th shard and the main
process validates the whole dataset at the end, so the result does not depend on the number of
processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from accelerate import PartialState
from datasets import ClassLabel, Dataset, load_dataset, load_from_disk
from datasets.exceptions import DatasetNotFoundError
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer

from ...backbones import load_pretrained_backbone
from ...checks import is_saved_dataset, only_local
from ...data import DEFAULT_SPLIT, fixed_shape_numpy, select_split
from ...factorised import RULE_FOR_OPTIMIZER, factorise_deltas, right_factor
from ...finetune import CHUNK_ELEMENTS, DEFAULT_LR, DEFAULT_OPTIMIZER, DEFAULT_STEPS, OPTIMIZERS, LossFn, OverfitResult, overfit_deltas
from ...harvest import harvest_shards
from ...logging import get_logger
from ...target import Conditioning, backbone_task, describe_backbone, find_target_linear, model_output_tensor, pool_tokens
from ...weight_datasets import dataset_sha256, harvest_lock, tensors_sha256
from .deltas import (
    DELTA_COLUMNS,
    DELTA_STORAGES,
    HARVEST_METADATA_NAME,
    check_delta_dtype,
    delta_features,
    finalize_delta_dataset,
    load_deltas,
    load_harvest_metadata,
    prepare_output_dir,
    round_to_storage,
)
from .model_card import write_delta_dataset_card

logger = get_logger(__name__)

if TYPE_CHECKING:
    from accelerate import Accelerator

CollateFn = Callable[[Mapping[str, Any]], Mapping[str, Any]]
FitFoldFn = Callable[[int, list[int]], nn.Module]
LABEL_INPUT_NAMES = ("labels", "label")
TASK_LOSS_NAMES = {"classification": "cross_entropy", "regression": "squared_error"}
STORAGE_CHOICES = ("auto", *DELTA_STORAGES)
# Largest relative residual ‖Δ − u vᵀ‖/‖Δ‖ accepted for factorised storage. Measured (Adam, lr 5e-4,
# 3 steps): heads of random-weight models reach 1.4e-2 (SetFit-like 384 -> 2, 4000 samples) and 1.6e-2
# (DeiT head, 2000 samples) where a tiny |x_j| puts a gradient entry near Adam's eps; SGD stays below
# 1e-6. Deltas that are not rank-1 with the rule (per-token layers, the wrong rule) are at 0.3-1.
DEFAULT_FACTOR_TOLERANCE = 5e-2
# "auto" factorises only if the first batch stays below this share of the tolerance: the residuals
# have a long tail (above), and a later sample beyond the tolerance would stop the harvest midway.
AUTO_MARGIN = 0.1
MAX_LISTED_SAMPLES = 10
# harvest_deltas' batch size when none is given (default_batch_size): about this many delta entries per batch, within
# the path's range of rows. Measured on one CPU thread: the closed form (a layer that sees one vector per sample) gets
# cheaper per sample with the batch until its (batch, out, in) deltas outgrow ~16 MB (LeNet-5 fc2 84 x 120 flat from
# 256 to 768 samples and 1.5x slower at 1024, where every batch pays page faults for fresh memory; a 2 x 384 head 2x
# faster at 1024-2048 than at 256). Per-token layers hold four such tensors on the optimizer path (a small Bert's
# 256 x 64 layer: 64-128 samples 1.5-2x faster than 32); their floor of 32 keeps large layers at the former default.
AUTO_BATCH_ELEMENTS = {"one_vector": 2**22, "per_token": 2**21}
AUTO_BATCH_RANGE = {"one_vector": (32, 2048), "per_token": (32, 128)}
PROBE_ROWS = 8  # rows that describe the backbone before the batch size is chosen
# The default before batch sizes followed the path: what a harvest.json without a recorded batch size was made with.
FORMER_DEFAULT_BATCH_SIZE = 32
IGNORE_INDEX = -100  # transformers' label to ignore in a loss: a harvest fine-tunes on every label, so it is refused
CHECK_BATCH_SIZE = 1024


# rank1_energy forms the Gram matrix of a delta (min² · max multiply-adds) only when its smaller side is at most this;
# above, power iteration by products with the delta itself (2 · out · in multiply-adds per iteration; nearly rank-1
# deltas converge in 2-3) is cheaper. Measured on CPU: LeNet-5 fc2's 84 x 120 deltas 2.5x faster than the Gram,
# a 2 x 384 head's 2x slower.
GRAM_SIDE = 32
# Power iterations on the delta itself before a matrix still unconverged takes the Gram path.
DIRECT_ITERATIONS = 8


def rank1_energy(deltas: torch.Tensor, iterations: int = 50, tolerance: float = 1e-5) -> torch.Tensor:
    """``σ₁² / Σσᵢ²`` of every matrix of a ``(batch, out, in)`` tensor, batched.

    1 means exactly rank-1. An all-zero delta counts as rank-1 (energy 1). ``σ₁²`` is the largest
    eigenvalue of ``Ĝ = D̂ᵀD̂`` for the unit-norm delta ``D̂``, by float32 power iteration from its
    largest row until the eigenpair residual ``‖Ĝv − λv‖`` is at most ``tolerance`` (harvested deltas are
    nearly rank-1, so a few iterations do; ~5x faster than a float64 eigensolver). Deltas whose smaller side
    exceeds :data:`GRAM_SIDE` iterate on products with ``D̂`` itself, in cache-sized chunks, for up to
    :data:`DIRECT_ITERATIONS`; the others, and those still unconverged, go through :func:`gram_rank1_energy`
    (in chunks too).
    """
    deltas = deltas.float()
    if deltas.dim() != 3:
        return gram_rank1_energy(deltas, iterations, tolerance)
    energy = deltas.new_empty(deltas.shape[0])
    chunk = max(1, CHUNK_ELEMENTS // math.prod(deltas.shape[1:]))  # the temporaries of a chunk stay in cache
    for start in range(0, deltas.shape[0], chunk):
        part = deltas[start : start + chunk]
        if min(deltas.shape[1:]) <= GRAM_SIDE:
            energy[start : start + chunk] = gram_rank1_energy(part, iterations, tolerance)
            continue
        found, unconverged = direct_rank1_energy(part, DIRECT_ITERATIONS, tolerance)
        if unconverged.any():
            found[unconverged] = gram_rank1_energy(part[unconverged], iterations, tolerance)
        energy[start : start + chunk] = found
    return energy


def direct_rank1_energy(deltas: torch.Tensor, iterations: int, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rank1_energy` of ``(batch, out, in)`` deltas by power iteration on ``v ↦ D̂ᵀ(D̂ v)``, and which
    matrices have not converged within ``iterations`` (their energy is then only an estimate)."""
    tiny = torch.finfo(torch.float32).tiny
    total = torch.linalg.vector_norm(deltas, dim=(1, 2)).pow(2)
    unit = deltas * (1 / total.sqrt().clamp_min(tiny))[:, None, None]
    # Products as broadcasting multiply-and-sum: on CPU 4x faster than a batched matrix-vector bmm.
    vector = unit[torch.arange(unit.shape[0]), torch.linalg.vector_norm(unit, dim=2).argmax(1)]
    for _ in range(iterations):
        vector = vector / vector.norm(dim=1, keepdim=True).clamp_min(tiny)
        image = (unit * (unit * vector.unsqueeze(1)).sum(2, keepdim=True)).sum(1)
        top = (vector * image).sum(1)
        unconverged = (image - top.unsqueeze(1) * vector).norm(dim=1) > tolerance
        if not unconverged.any():
            break
        vector = image
    return torch.where(total > 0, top.clamp(0, 1), torch.ones_like(top)), unconverged & (total > 0)


def gram_rank1_energy(deltas: torch.Tensor, iterations: int = 50, tolerance: float = 1e-5) -> torch.Tensor:
    """:func:`rank1_energy` of ``(..., out, in)`` deltas through the float32 Gram matrix on their smaller side, by
    power iteration from its largest column; a matrix whose eigenpair residual is still above ``tolerance`` after
    ``iterations`` gets float64 ``eigvalsh`` instead (``svdvals`` if that does not converge)."""
    total = deltas.pow(2).sum((-2, -1))
    unit = deltas / total.sqrt().clamp_min(torch.finfo(torch.float32).tiny)[..., None, None]
    transposed = unit.transpose(-1, -2)
    gram = unit @ transposed if unit.shape[-2] <= unit.shape[-1] else transposed @ unit
    start = gram.diagonal(dim1=-2, dim2=-1).argmax(-1)
    vector = torch.take_along_dim(gram, start[..., None, None], dim=-1)
    for _ in range(iterations):
        vector = vector / vector.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        image = gram @ vector
        top = (vector * image).sum((-2, -1))
        unconverged = (image - top[..., None, None] * vector).norm(dim=(-2, -1)) > tolerance
        if not unconverged.any():
            break
        vector = image
    if unconverged.any():
        hard = gram[unconverged].double()
        try:
            top[unconverged] = torch.linalg.eigvalsh(hard)[..., -1].float()
        except torch.linalg.LinAlgError:
            top[unconverged] = torch.linalg.svdvals(unit[unconverged].double())[..., 0].pow(2).float()
    return torch.where(total > 0, top.clamp(0, 1), torch.ones_like(top))


def factor_rule_for(optimizer: str, per_token: bool, target_module: str) -> str:
    """The right-factor rule of ``optimizer``'s deltas for factorised storage; refuses layers and
    optimizers whose deltas are not ``u vᵀ`` with a known ``v``."""
    if per_token:
        raise ValueError(
            f"delta_storage='factorised' needs a layer that sees one vector per sample (a head or an MLP layer); "
            f"{target_module!r} is applied to every token (its input has a token dimension), so its deltas are not "
            "rank-1. Use delta_storage='full' (or 'auto', which picks it)."
        )
    if optimizer not in RULE_FOR_OPTIMIZER:
        raise ValueError(
            f"delta_storage='factorised' needs an optimizer whose rank-1 deltas have a known right factor "
            f"({sorted(RULE_FOR_OPTIMIZER)}); {optimizer!r} has none. Use delta_storage='full'."
        )
    return RULE_FOR_OPTIMIZER[optimizer]


def default_batch_size(per_token: bool, layer: nn.Linear) -> tuple[int, str]:
    """The batch size ``harvest_deltas`` uses when none is given, and why (see :data:`AUTO_BATCH_ELEMENTS`)."""
    kind = "per_token" if per_token else "one_vector"
    (low, high), elements = AUTO_BATCH_RANGE[kind], AUTO_BATCH_ELEMENTS[kind]
    size = min(max(elements // (layer.out_features * layer.in_features), low), high)
    what = "per-token layer" if per_token else "one vector per sample"
    return size, f"{what}: about {elements} delta entries per batch, within {low}-{high} rows"


def resumed_batch_size(output_dir: str | os.PathLike) -> tuple[int, str] | None:
    """The batch size of the harvest ``output_dir`` holds, which a resumed harvest without ``batch_size`` keeps (its
    first batch is part of its identity), and why; ``None`` when there is no harvest to resume."""
    if not (Path(output_dir) / HARVEST_METADATA_NAME).is_file():
        return None
    recorded = load_harvest_metadata(output_dir).get("batch_size")
    if recorded is None:
        return FORMER_DEFAULT_BATCH_SIZE, "resumed a harvest that recorded no batch size: the former default"
    return recorded["batch_size"], "resumed: the batch size the harvest started with"


def refuse_other_batch_size(output_dir: str | os.PathLike, batch_size: int, first_batch_sha256: str) -> None:
    """Refuse to resume the harvest in ``output_dir`` with a ``batch_size`` that changes its first batch (part of a
    harvest's identity), naming the batch size it was made with and the fix."""
    if not (Path(output_dir) / HARVEST_METADATA_NAME).is_file():
        return
    existing = load_harvest_metadata(output_dir)
    record = existing.get("batch_size")
    recorded = record["batch_size"] if record else FORMER_DEFAULT_BATCH_SIZE
    if recorded == batch_size or existing.get("source", {}).get("first_batch_sha256") == first_batch_sha256:
        return  # the same batch size, or the same first rows (a dataset smaller than both batches): it can continue
    made_with = f"batch_size={recorded}" + ("" if record else " (it recorded none: the default before batch sizes followed the path)")
    raise ValueError(
        f"{str(output_dir)!r} holds a harvest made with {made_with}, and this call passes batch_size={batch_size} "
        f"(--batch-size): a harvest's first batch is part of its identity (source.first_batch_sha256), so it cannot "
        f"continue with another batch size. Pass batch_size={recorded}, or batch_size=None (omit --batch-size) to keep "
        "the recorded one, or harvest into a new output_dir."
    )


def _listed(ids: torch.Tensor, values: torch.Tensor) -> str:
    pairs = [f"{int(i)}: {float(v):.3g}" for i, v in zip(ids[:MAX_LISTED_SAMPLES], values[:MAX_LISTED_SAMPLES])]
    more = f" and {ids.numel() - MAX_LISTED_SAMPLES} more" if ids.numel() > MAX_LISTED_SAMPLES else ""
    return "{" + ", ".join(pairs) + "}" + more


def check_factor_residuals(ids: torch.Tensor, residuals: torch.Tensor, tolerance: float, rule: str, strict: bool = True) -> None:
    """Refuse factorised storage of samples whose delta is not ``u vᵀ`` within ``tolerance``, naming them;
    with ``strict=False`` (storage chosen by ``"auto"``) warn instead: the harvest, already committed to
    factorised shards, completes, and each sample's residual stays in ``factor_residual``."""
    bad = residuals > tolerance
    if bad.any() and not strict:
        logger.warning(
            f"{int(bad.sum())} sample(s) exceed factor_tolerance={tolerance:g} with factor_rule {rule!r} (sample id: residual "
            f"{_listed(ids[bad], residuals[bad])}); stored as factors all the same (delta_storage='auto' chose factorised "
            "storage on the first batch). Their residuals are in the 'factor_residual' column; harvest with "
            "delta_storage='full' for exact deltas."
        )
    elif bad.any():
        raise ValueError(
            f"delta_storage='factorised' would lose part of the deltas of {int(bad.sum())} sample(s): their relative "
            f"residual ‖Δ − u vᵀ‖/‖Δ‖ with factor_rule {rule!r} exceeds factor_tolerance={tolerance:g} "
            f"(sample id: residual {_listed(ids[bad], residuals[bad])}). Their deltas are not rank-1 with that right "
            "factor. Harvest with delta_storage='full' (in a new output_dir), or pass a larger factor_tolerance if "
            "that loss is acceptable."
        )


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


@dataclass
class OverfitBatch:
    """A batch overfitted by :func:`overfit_batch`, before its columns are chosen (see :func:`batch_columns`): the
    result, the conditioning, the columns every storage has, and the optimizer and steps it ran with."""

    result: OverfitResult
    conditioning: Conditioning
    columns: dict[str, torch.Tensor]
    optimizer: str
    steps: int
    factorisations: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def factorised(self, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`~ocd_hf.factorised.factorise_deltas` of the deltas with the layer's input, computed once per rule
        (``"auto"`` measures the first batch, whose columns are then written from the same batch)."""
        if rule not in self.factorisations:
            self.factorisations[rule] = factorise_deltas(self.result.deltas, self.conditioning.raw_input, rule)
        return self.factorisations[rule]


def overfit_batch(
    backbone: nn.Module,
    layer: nn.Linear,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    ids: torch.Tensor,
    *,
    task: str,
    optimizer: str = DEFAULT_OPTIMIZER,
    lr: float = DEFAULT_LR,
    steps: int = DEFAULT_STEPS,
    loss_fn: LossFn | None = None,
    store_trajectory: bool = False,
    split_prefix: bool = True,
) -> OverfitBatch:
    """The work of :func:`harvest_batch` that does not depend on the storage: the overfitting and ``I(x)``."""
    with record_first_forward(backbone, layer) as first:
        result = overfit_deltas(
            backbone, layer, inputs, labels, task=task, optimizer=optimizer, lr=lr, steps=steps, loss_fn=loss_fn,
            return_trajectory=store_trajectory, split_prefix=split_prefix,
        )
    cond = first.conditioning(inputs.get("attention_mask"))
    columns = {
        "id": ids,
        "label": labels,
        "layer_input": cond.layer_input.float(),
        "layer_output": cond.layer_output.float(),
        "model_output": cond.model_output.float(),
        "loss_before": result.loss_before.float(),
        "loss_after": result.loss_after.float(),
    }
    return OverfitBatch(result, cond, columns, optimizer, steps)


def harvest_batch(
    backbone: nn.Module,
    layer: nn.Linear,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    ids: torch.Tensor,
    *,
    task: str,
    optimizer: str = DEFAULT_OPTIMIZER,
    lr: float = DEFAULT_LR,
    steps: int = DEFAULT_STEPS,
    loss_fn: LossFn | None = None,
    store_trajectory: bool = False,
    dtype: str = "float32",
    delta_storage: str = "full",
    factor_tolerance: float | None = DEFAULT_FACTOR_TOLERANCE,
    strict_tolerance: bool = True,
    split_prefix: bool = True,
    measure_factor_residual: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Delta-dataset columns for one batch, and the ids of the samples skipped as non-finite.

    ``I(x)`` is taken from the un-finetuned backbone (which must be in eval mode) during the first
    forward pass of :func:`~ocd_hf.finetune.overfit_deltas`, its unmodified base pass, so it costs no
    extra forward. A sample with any non-finite value (delta, trajectory, conditioning or loss) is left out.

    ``delta_storage="full"`` stores ``delta``; ``rho`` and ``rank1_energy`` describe it as stored
    (after rounding to ``dtype``). ``"factorised"`` stores the least-squares left factor
    ``delta_factor`` of ``Δ ≈ u vᵀ`` (``v`` from the layer input by the optimizer's rule, see
    :data:`~ocd_hf.factorised.RULE_FOR_OPTIMIZER`) and ``factor_residual``, the relative residual
    ``‖Δ − u vᵀ‖/‖Δ‖`` measured on the real delta (the largest over the delta and every trajectory
    step); ``rho`` is the RMS of the stored ``u vᵀ``. Raises ``ValueError`` if a residual exceeds
    ``factor_tolerance`` (``None``: no check), or only warns with ``strict_tolerance=False``.
    ``split_prefix=False`` re-runs the whole backbone at every step (see :func:`~ocd_hf.finetune.overfit_deltas`).
    ``measure_factor_residual=True`` adds ``factor_residual`` to full storage's columns too (measured on the stored
    delta, as :func:`~ocd_hf.methods.ocd.deltas.decide_delta_mode` would; not a stored column) where the layer and
    optimizer have a factor rule.
    """
    overfitted = overfit_batch(
        backbone, layer, inputs, labels, ids, task=task, optimizer=optimizer, lr=lr, steps=steps, loss_fn=loss_fn,
        store_trajectory=store_trajectory, split_prefix=split_prefix,
    )
    return batch_columns(overfitted, dtype=dtype, delta_storage=delta_storage, factor_tolerance=factor_tolerance,
                         strict_tolerance=strict_tolerance, measure_factor_residual=measure_factor_residual)


def batch_columns(
    overfitted: OverfitBatch,
    *,
    dtype: str = "float32",
    delta_storage: str = "full",
    factor_tolerance: float | None = DEFAULT_FACTOR_TOLERANCE,
    strict_tolerance: bool = True,
    measure_factor_residual: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`harvest_batch`'s columns and skipped ids of an overfitted batch, in ``delta_storage`` (one overfitted
    batch can give both storages: ``"auto"`` decides on the factorised columns, then keeps the batch)."""
    result, cond, optimizer, steps = overfitted.result, overfitted.conditioning, overfitted.optimizer, overfitted.steps
    columns, ids = dict(overfitted.columns), overfitted.columns["id"]
    store_trajectory = result.trajectory is not None
    rule = None
    if delta_storage == "full":
        columns["delta"] = round_to_storage(result.deltas, dtype)
        if store_trajectory:
            columns["trajectory"] = round_to_storage(result.trajectory, dtype)
    else:
        rule = factor_rule_for(optimizer, cond.per_token, "the target layer")
        factors, residual = overfitted.factorised(rule)
        columns["delta_factor"] = round_to_storage(factors, dtype)
        if store_trajectory:
            flat = result.trajectory.flatten(0, 1)
            step_factors, step_residual = factorise_deltas(flat, cond.raw_input.repeat_interleave(steps, dim=0), rule)
            columns["trajectory_factor"] = round_to_storage(step_factors.view(-1, steps, flat.shape[1]), dtype)
            residual = torch.maximum(residual, step_residual.view(-1, steps).amax(1))
        columns["factor_residual"] = residual.float()
    if delta_storage == "full" and measure_factor_residual and not cond.per_token and optimizer in RULE_FOR_OPTIMIZER:
        # What decide_delta_mode measures on every stored delta, taken while the batch is in memory: the stored deltas
        # and layer inputs are the overfitted ones when stored as float32 from a (batch, in) input ("auto"'s first batch
        # then reuses its measurement).
        rule = RULE_FOR_OPTIMIZER[optimizer]
        as_computed = dtype == "float32" and cond.raw_input.dim() == 2 and all(
            tensor.dtype == torch.float32 for tensor in (result.deltas, cond.raw_input))
        columns["factor_residual"] = (overfitted.factorised(rule) if as_computed
                                      else factorise_deltas(columns["delta"], columns["layer_input"], rule))[1].float()
    columns = {name: value.detach().cpu() for name, value in columns.items()}
    finite = torch.ones(ids.shape[0], dtype=torch.bool)
    for value in columns.values():
        if value.is_floating_point():
            # A row's min and max are finite iff all of it is (both propagate NaN): two reductions and no temporary,
            # where isfinite(...).all(1) makes and reduces a boolean tensor (20x slower on a batch of deltas).
            rows = value.reshape(value.shape[0], -1)
            finite &= torch.isfinite(rows.amin(1)) & torch.isfinite(rows.amax(1))
    if not finite.all():
        columns = {name: value[finite] for name, value in columns.items()}
    if delta_storage == "full":
        columns["rho"] = torch.linalg.vector_norm(columns["delta"], dim=(1, 2)) / math.sqrt(math.prod(columns["delta"].shape[1:]))
        columns["rank1_energy"] = rank1_energy(columns["delta"])
    else:
        if factor_tolerance is not None:
            check_factor_residuals(columns["id"], columns["factor_residual"], factor_tolerance, rule, strict_tolerance)
        factors, right = columns["delta_factor"], right_factor(columns["layer_input"], rule)
        columns["rho"] = factors.norm(dim=1) * right.norm(dim=1) / math.sqrt(factors.shape[1] * right.shape[1])  # RMS of u vᵀ
    return columns, ids[~finite]


class SampleReader:
    """Turns rows ``[start, end)`` of a ``datasets.Dataset`` into ``(backbone inputs, labels)``.

    With ``collate_fn``, it receives the batch dict ``dataset[start:end]`` (in the dataset's
    current format, e.g. lists of strings for a text column) and returns the backbone's inputs.
    Without it, the columns ``input_columns`` (default: the dataset columns that are arguments of
    ``backbone.forward``, such as ``input_ids``/``attention_mask`` or ``pixel_values``) are stacked
    as tensors. A ``labels``/label entry in the collated inputs is dropped.

    Labels are checked before any work (see :meth:`_read_labels`). String labels are mapped to class
    indices by ``label_names`` (else by the backbone's named ``config.id2label``), and names outside those
    are refused; without known names they are mapped in sorted order, or refused with the hint
    ``missing_label_names`` when that is given (an evaluation must use the names its model was trained with).
    ``purpose`` (``"harvest"``, ``"evaluate"``) words the errors.
    """

    def __init__(
        self,
        dataset: Dataset,
        backbone: nn.Module,
        task: str,
        label_column: str = "label",
        input_columns: list[str] | None = None,
        collate_fn: CollateFn | None = None,
        label_names: Sequence[str] | None = None,
        missing_label_names: str | None = None,
        purpose: str = "harvest",
    ) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"dataset must be a datasets.Dataset (map-style, so a harvest can resume), got {type(dataset).__name__}. "
                "Convert with datasets.Dataset.from_dict / from_generator, or materialise an IterableDataset first."
            )
        if len(dataset) == 0:
            raise ValueError(f"dataset is empty: there is nothing to {purpose}.")
        if label_column not in dataset.column_names:
            raise ValueError(
                f"label_column {label_column!r} is not a column of the dataset (columns: {dataset.column_names}). "
                "Pass label_column= with the column holding the labels."
            )
        self.dataset = dataset
        self.label_column = label_column
        self.collate_fn = collate_fn
        self.purpose = purpose
        self.label_names: list[str] | None = None
        config = getattr(backbone, "config", None)
        if label_names is not None:
            self.class_names, self.class_names_source = list(label_names), "label_names="
        else:
            self.class_names, self.class_names_source = class_names(backbone), "the backbone's config.id2label"
        self.missing_label_names = missing_label_names
        self.labels = self._read_labels(task, getattr(config, "num_labels", None) if task == "classification" else None)
        try:
            embeddings = backbone.get_input_embeddings()
        except (AttributeError, NotImplementedError):  # no token embedding (images, tabular data)
            embeddings = None
        self.vocab_size = getattr(embeddings, "num_embeddings", None)
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.input_columns = None if collate_fn is not None else self._input_columns(backbone, input_columns)
        self.device = next(backbone.parameters()).device
        if self.input_columns is not None:
            # Fixed-shape nested lists straight from Arrow (fixed_shape_numpy), else the numpy formatter (3x faster than
            # torch's on nested lists).
            self.arrow = dataset.select_columns(self.input_columns).with_format("arrow")
            self.formatted = dataset.with_format("numpy", columns=self.input_columns)
            for start in range(0, len(dataset), CHECK_BATCH_SIZE):  # every row before any work (with collate_fn: per batch)
                self.check_inputs(self._stacked(start, min(start + CHECK_BATCH_SIZE, len(dataset))), start)

    def _read_labels(self, task: str, num_classes: int | None) -> torch.Tensor:
        # Read through Arrow: the numpy formatter of some datasets releases returns object arrays for float columns with NaN.
        column = self.dataset.select_columns([self.label_column]).with_format("arrow")[:][self.label_column]
        labels = column.to_numpy(zero_copy_only=False)
        if labels.dtype == object and len(labels) and isinstance(labels[0], np.ndarray):
            labels = np.stack(labels)  # one list per row: refused below
        if labels.ndim != 1:
            raise ValueError(
                f"label_column {self.label_column!r} must hold one scalar label per row, got shape {labels.shape}."
            )
        feature = self.dataset.features[self.label_column]
        if isinstance(feature, ClassLabel):
            self.label_names = list(feature.names)
        if task != "classification":
            if not np.issubdtype(labels.dtype, np.number):
                raise ValueError(f"Regression labels in {self.label_column!r} must be numbers, got dtype {labels.dtype}.")
            return torch.from_numpy(labels.astype(np.float32))  # a non-finite label gives a non-finite delta: skipped and counted
        if labels.dtype.kind in "OUS":  # class names, as the recipes accept
            labels = self._class_ids(labels)
        elif labels.dtype.kind == "f":
            self._refuse_rows(labels != np.round(labels), labels, "fractional class labels",
                              "class labels must be integers (for regression, configure the backbone with num_labels=1)")
        elif not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"The backbone is a classifier but label_column {self.label_column!r} has dtype {labels.dtype}; "
                "class labels must be integers or class names (for regression, configure the backbone with num_labels=1)."
            )
        labels = labels.astype(np.int64)
        self._refuse_rows(labels == IGNORE_INDEX, labels, f"the label {IGNORE_INDEX} (the Hugging Face ignore index)",
                          f"drop them first: dataset.filter(lambda row: row[{self.label_column!r}] != {IGNORE_INDEX}); "
                          f"a {self.purpose} uses every row's label, it cannot ignore one")
        if num_classes is not None:
            if self.label_names is not None and len(self.label_names) > num_classes:
                raise ValueError(
                    f"label_column {self.label_column!r} has {len(self.label_names)} classes {self.label_names[:10]}, but the "
                    f"backbone predicts {num_classes}: use a backbone with num_labels={len(self.label_names)}."
                )
            self._refuse_rows((labels < 0) | (labels >= num_classes), labels, f"labels outside [0, {num_classes})",
                              f"the backbone predicts {num_classes} classes (config.num_labels); fix or drop these rows")
        return torch.from_numpy(labels)

    def _class_ids(self, labels: np.ndarray) -> np.ndarray:
        """Class indices of string labels: by the known class names (``label_names=``, else the backbone's named
        ``id2label``), refusing names outside them; else, unless ``missing_label_names`` says how to get the names,
        in sorted order. The names used are kept in :attr:`label_names`."""
        if any(not isinstance(value, str) for value in labels):
            raise ValueError(f"label_column {self.label_column!r} mixes strings with other values; use one kind of label.")
        found = sorted(set(labels.tolist()))
        if self.class_names is None and self.missing_label_names is not None:
            raise ValueError(
                f"label_column {self.label_column!r} holds class names ({found[:10]}) but no class names are known to "
                f"map them to the model's class indices: {self.missing_label_names}."
            )
        self.label_names = found if self.class_names is None else self.class_names
        index = {name: position for position, name in enumerate(self.label_names)}
        unknown = [name for name in found if name not in index]
        if unknown:
            raise ValueError(
                f"label_column {self.label_column!r} has labels {unknown[:10]} that are not among the class names "
                f"{self.label_names[:20]} ({self.class_names_source}): map them to those names (or to class indices) first."
            )
        return np.asarray([index[name] for name in labels.tolist()], dtype=np.int64)

    def _refuse_rows(self, bad: np.ndarray, values: np.ndarray, what: str, fix: str) -> None:
        """``ValueError`` naming the first rows (index in the dataset) where ``bad`` holds, and their labels."""
        if not bad.any():
            return
        rows = np.flatnonzero(bad)
        listed = ", ".join(f"{int(row)}: {values[row].item()!r}" for row in rows[:MAX_LISTED_SAMPLES])
        more = f" and {rows.size - MAX_LISTED_SAMPLES} more" if rows.size > MAX_LISTED_SAMPLES else ""
        raise ValueError(
            f"label_column {self.label_column!r} has {what} in {rows.size} row(s) (row: label {{{listed}}}{more}): {fix}."
        )

    def check_inputs(self, inputs: Mapping[str, Any], start: int) -> None:
        """Refuse backbone inputs of rows ``start, start+1, …`` that cannot be harvested: non-finite values,
        token ids outside the vocabulary, sequences longer than the model's positions (each naming the rows)."""
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if value.is_floating_point():
                bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(1)
                self._refuse_input(name, bad, start, "NaN or infinite values", "fix or drop these rows")
            if name == "input_ids" and value.dim() >= 2:
                if self.vocab_size is not None:
                    bad = ((value < 0) | (value >= self.vocab_size)).any(1)
                    self._refuse_input(name, bad, start, f"token ids outside the vocabulary [0, {self.vocab_size})",
                                       "tokenize with the backbone's own tokenizer")
                if self.max_positions is not None and value.shape[1] > self.max_positions:
                    raise ValueError(
                        f"input_ids of rows {start}..{start + value.shape[0] - 1} are {value.shape[1]} tokens long, but the backbone "
                        f"has max_position_embeddings={self.max_positions}: truncate when tokenizing (truncation=True, "
                        f"max_length={self.max_positions}, or ocd-hf harvest --max-length)."
                    )

    def _refuse_input(self, name: str, bad: torch.Tensor, start: int, what: str, fix: str) -> None:
        if bool(bad.any()):
            rows = (torch.nonzero(bad).flatten() + start).tolist()
            more = f" and {len(rows) - MAX_LISTED_SAMPLES} more" if len(rows) > MAX_LISTED_SAMPLES else ""
            raise ValueError(f"Input {name!r} has {what} in rows {rows[:MAX_LISTED_SAMPLES]}{more}: {fix}.")

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

    def inputs_sha256(self) -> str:
        """Content hash of the dataset columns the inputs are made from (with ``collate_fn``: every column but the label)."""
        columns = self.input_columns or [name for name in self.dataset.column_names if name != self.label_column]
        return dataset_sha256(self.dataset, columns)

    def __len__(self) -> int:
        return len(self.dataset)

    def _stacked(self, start: int, end: int) -> dict[str, torch.Tensor]:
        table = self.arrow[start:end]
        batch = {name: fixed_shape_numpy(table.column(name)) for name in self.input_columns}
        if any(value is None for value in batch.values()):
            batch = self.formatted[start:end]
        ragged = [name for name, value in batch.items() if not (isinstance(value, np.ndarray) and value.dtype.kind in "biuf")]
        if ragged:
            raise ValueError(
                f"Columns {ragged} have rows of different lengths or non-numeric values and cannot be stacked. "
                "Pad them when preprocessing (e.g. tokenizer(..., padding='max_length')) or pass "
                "collate_fn=transformers.DataCollatorWithPadding(tokenizer)."
            )
        return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in batch.items()}

    def batches(self, batch_size: int) -> "ReaderBatches":
        """The ``(inputs, labels)`` batches of every row in order, ``batch_size`` rows each (an evaluation's data)."""
        return ReaderBatches(self, batch_size)

    def __call__(self, start: int, end: int) -> tuple[dict[str, Any], torch.Tensor]:
        if self.collate_fn is not None:
            inputs = dict(self.collate_fn(self.dataset[start:end]))
            self.check_inputs(inputs, start)
        else:
            inputs = self._stacked(start, end)
        inputs = {
            name: value.to(self.device) if isinstance(value, torch.Tensor) else value
            for name, value in inputs.items()
            if name not in (self.label_column, *LABEL_INPUT_NAMES)
        }
        return inputs, self.labels[start:end]


class ReaderBatches:
    """The batches of a :class:`SampleReader`, with a length (for a progress bar)."""

    def __init__(self, reader: SampleReader, batch_size: int) -> None:
        self.reader, self.batch_size = reader, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.reader) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        for start in range(0, len(self.reader), self.batch_size):
            yield self.reader(start, min(start + self.batch_size, len(self.reader)))


def class_names(model: nn.Module) -> list[str] | None:
    """``config.id2label`` of ``model`` in index order when it names its classes (not transformers' default
    ``LABEL_i``), else ``None``."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = {int(index): str(name) for index, name in id2label.items()}
    if sorted(names) != list(range(len(names))) or all(name == f"LABEL_{index}" for index, name in names.items()):
        return None
    return [names[index] for index in range(len(names))]


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
    batch_size: int | None = None,
    optimizer: str = DEFAULT_OPTIMIZER,
    lr: float = DEFAULT_LR,
    steps: int = DEFAULT_STEPS,
    loss: LossFn | None = None,
    store_trajectory: bool = False,
    dtype: str = "float32",
    delta_storage: str = "auto",
    factor_tolerance: float = DEFAULT_FACTOR_TOLERANCE,
    shard_size: int = 1024,
    cross_fit: int | None = None,
    fit_fold: FitFoldFn | None = None,
    accelerator: "Accelerator | PartialState | None" = None,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Fine-tune ``target_module`` of ``backbone`` on every sample of ``dataset`` alone; store the deltas.

    For each row ``s = (x, y)``: ``Δ_s = θ_s − θ`` after ``steps`` steps of ``optimizer`` (defaults:
    the official OCD settings, Adam, lr 5e-4, 3 steps) on the layer's weight only, plus ``I(x)``
    from the un-finetuned model. Rows are written to ``output_dir`` shard by shard (``shard_size``
    rows each, memory bounded by one batch); see :mod:`ocd_hf.methods.ocd.deltas` and :mod:`ocd_hf.weight_datasets` for the layout and columns.

    Calling again with the same arguments after an interruption resumes from the last complete
    shard; a directory made with another backbone, layer or settings is refused. Samples with
    non-finite values, and samples whose delta is all zeros (the model already fits them: nothing to learn,
    and no scale to normalise by), are skipped with a warning and listed in the metadata
    (``skipped_ids_by_reason``: ``non_finite``, ``zero_delta``).
    Under ``accelerate launch`` each process harvests every ``num_processes``-th shard; pass the
    ``Accelerator`` (or ``PartialState``) in use, or one is created. The backbone is moved to its
    device and run in eval mode.

    Args:
        batch_size: samples fine-tuned at once; default by path (:func:`default_batch_size`, recorded in the
            metadata as ``batch_size``): about 4M delta entries per batch within 32-2048 rows for a layer that sees one
            vector per sample (LeNet-5 fc2: 416, a 2 x 384 head: 2048), 2M within 32-128 rows for a per-token layer.
            The deltas do not depend on it; a resumed harvest keeps the batch size it started with.
        loss: per-sample loss ``(model output, labels) -> (batch,)``; default the task loss
            (cross-entropy for classification, squared error for a backbone with ``num_labels=1``).
        dtype: ``"float32"`` (exact deltas) or ``"bfloat16"`` (half the size, stored bit-exactly).
        delta_storage: ``"full"`` stores each ``(out, in)`` delta; ``"factorised"`` stores its left
            factor ``u`` (``out`` numbers) of ``Δ = u vᵀ``, ``v`` following from the layer input by
            the optimizer's rule (Adam: ``sign(x)``, SGD: ``x``), and the residual of that
            factorisation measured on every sample; it is refused for a per-token layer and for any
            sample whose residual exceeds ``factor_tolerance``. ``"auto"`` picks ``"factorised"``
            when the layer sees one vector per sample and the first batch's residuals are all within
            a tenth of ``factor_tolerance`` (the residuals have a long tail; a later sample beyond the
            tolerance is then stored with a warning, not refused), else ``"full"``; the
            decision is recorded in the metadata (``storage_decision``) and the card. A resumed
            ``"auto"`` harvest keeps its storage.
        factor_tolerance: the largest relative residual ``‖Δ − u vᵀ‖/‖Δ‖`` factorised storage accepts.
        cross_fit: ``K >= 2`` harvests out of fold, like stacking: row ``i`` of ``dataset`` belongs to
            fold ``i % K``, and its delta and conditioning come from the model ``fit_fold(k, rows)``
            returns for its fold — a model trained without those rows — instead of ``backbone``. The
            deltas then carry the errors the model makes on data it has not seen, rather than "sharpen
            what you already predict". ``backbone`` (trained on everything) is still the model the
            hypernetwork is trained for and applied to; its layer is what the metadata describes.
        fit_fold: ``(fold index, row indices of dataset in that fold) -> model`` of the same
            architecture trained without those rows (needed with ``cross_fit``). Called at most once
            per fold and process, only for folds with rows left to harvest; make it deterministic
            (seeded) so that a resumed harvest rebuilds the same fold models.
        base_model_name_or_path / base_model_revision: recorded in the metadata and card; default
            the backbone's ``config._name_or_path`` / ``config._commit_hash``.

    Returns:
        The delta dataset, loaded with :func:`ocd_hf.load_deltas`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}.")
    check_delta_dtype(dtype)
    if delta_storage not in STORAGE_CHOICES:
        raise ValueError(f"delta_storage must be one of {STORAGE_CHOICES}, got {delta_storage!r}.")
    if not (isinstance(factor_tolerance, (int, float)) and 0 <= factor_tolerance < math.inf):
        raise ValueError(f"factor_tolerance must be a finite number >= 0, got {factor_tolerance!r}.")
    for name, value in (("batch_size", 1 if batch_size is None else batch_size), ("shard_size", shard_size), ("steps", steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    check_cross_fit(cross_fit, fit_fold, len(dataset) if isinstance(dataset, Dataset) else None)
    state = accelerator if accelerator is not None else PartialState()
    output_dir = Path(output_dir)
    name, layer = find_target_linear(backbone, target_module)
    backbone.to(state.device)
    was_training = backbone.training
    backbone.eval()
    with harvest_lock(output_dir, enabled=state.is_main_process):  # before any work: writable, not in use
        try:
            reader = SampleReader(
                dataset, backbone, task=backbone_task(backbone), label_column=label_column, input_columns=input_columns,
                collate_fn=collate_fn,
            )
            first_inputs, first_labels = reader(0, min(batch_size or PROBE_ROWS, len(reader)))
            try:
                description = describe_backbone(backbone, name, example_inputs=first_inputs)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(
                    f"{type(backbone).__name__} failed on the first batch, built from inputs {sorted(first_inputs)}: {error}. "
                    "Pass input_columns= with the model's input columns, or collate_fn= to build its inputs."
                ) from error
            batch_choice = {"batch_size": batch_size, "reason": "requested"}
            if batch_size is None:
                batch_size, reason = resumed_batch_size(output_dir) or default_batch_size(description["per_token"], layer)
                batch_choice = {"batch_size": batch_size, "reason": reason}
                first_inputs, first_labels = reader(0, min(batch_size, len(reader)))
            settings = {"task": description["task"], "optimizer": optimizer, "lr": lr, "steps": steps, "loss_fn": loss}
            storage, decision, trial = choose_delta_storage(
                delta_storage, backbone, layer, first_inputs, first_labels, name, output_dir, description["per_token"],
                factor_tolerance, dtype=dtype, **settings,
            )
            factor_settings = {}
            if storage == "factorised":
                factor_settings = {
                    "factor_rule": RULE_FOR_OPTIMIZER[optimizer], "factor_tolerance": factor_tolerance,
                    "factor_tolerance_strict": delta_storage == "factorised",  # "auto" warns: it cannot switch storage midway
                }
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
                    "delta_storage": storage,
                    **factor_settings,
                    "cross_fit": cross_fit,
                },
                "storage_decision": decision,
                "batch_size": batch_choice,
                "source": {
                    "num_rows": len(reader), "label_column": label_column, "labels_sha256": reader.labels_sha256,
                    # The inputs too (resuming with other inputs and the same labels would mix two datasets), and the
                    # first batch as the backbone sees it (another collate_fn, tokenizer or max_length).
                    "inputs_sha256": reader.inputs_sha256(), "first_batch_sha256": tensors_sha256(first_inputs),
                    # Class names of a ClassLabel column, or of string labels mapped to indices in this (sorted) order.
                    "label_names": reader.label_names,
                },
                "num_shards": math.ceil(len(reader) / shard_size),
            }
            refuse_other_batch_size(output_dir, batch_size, metadata["source"]["first_batch_sha256"])
            prepare_output_dir(output_dir, metadata, is_main_process=state.is_main_process)
            state.wait_for_everyone()
            models = FoldModels(backbone, layer, name, len(reader), cross_fit, fit_fold, state.device)
            # The batch "auto" overfitted to choose the storage is rows [0, batch_size) as the harvest would overfit them.
            first_batch = trial if cross_fit is None and not store_trajectory else None
            _harvest_shards(models, reader, output_dir, metadata, state, batch_size, loss, progress, first_batch)
        finally:
            backbone.train(was_training)
        state.wait_for_everyone()
        if state.is_main_process:
            final = finalize_delta_dataset(output_dir, metadata)
            write_delta_dataset_card(output_dir, final)
        state.wait_for_everyone()
    return load_deltas(output_dir)


def choose_delta_storage(
    requested: str,
    backbone: nn.Module,
    layer: nn.Linear,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    target_module: str,
    output_dir: str | os.PathLike,
    per_token: bool,
    factor_tolerance: float,
    dtype: str = "float32",
    **overfit_settings: Any,
) -> tuple[str, dict[str, Any], OverfitBatch | None]:
    """The storage of a harvest (``"full"`` or ``"factorised"``), a record of how it was chosen, and the first
    batch overfitted (without trajectory) when ``"auto"`` overfitted it to decide (else ``None``), for either storage.

    ``"factorised"`` is checked (per-token layers and optimizers without a factor rule are refused);
    ``"auto"`` keeps the storage of a harvest it resumes in ``output_dir``, else overfits the first
    batch (``inputs``, ``labels``) and factorises when the layer sees one vector per sample and every
    residual is within ``AUTO_MARGIN × factor_tolerance`` (a margin for the samples not yet seen).
    """
    optimizer = overfit_settings["optimizer"]
    if requested != "auto":
        if requested == "factorised":
            factor_rule_for(optimizer, per_token, target_module)
        return requested, {"requested": requested, "reason": "requested"}, None
    existing = Path(output_dir) / HARVEST_METADATA_NAME
    if existing.is_file():
        previous = load_harvest_metadata(output_dir)
        if "storage_decision" in previous:
            return previous["harvest_config"]["delta_storage"], previous["storage_decision"], None
    decision: dict[str, Any] = {"requested": "auto"}
    if per_token:
        return "full", {**decision, "reason": "the layer is applied to every token, so its deltas are not rank-1"}, None
    if optimizer not in RULE_FOR_OPTIMIZER:
        return "full", {**decision, "reason": f"optimizer {optimizer!r} has no right-factor rule"}, None
    trial = overfit_batch(backbone, layer, inputs, labels, torch.arange(labels.shape[0]), **overfit_settings)
    residuals = batch_columns(trial, delta_storage="factorised", factor_tolerance=None, dtype=dtype)[0]["factor_residual"]
    if residuals.numel() == 0:
        return "full", {**decision, "reason": "no finite delta in the first batch to measure the rank on"}, trial
    worst, threshold = float(residuals.max()), AUTO_MARGIN * factor_tolerance
    decision.update({"first_batch_size": int(residuals.numel()), "first_batch_max_residual": worst, "threshold": threshold})
    rule = RULE_FOR_OPTIMIZER[optimizer]
    measured = f"the first batch's largest relative residual ‖Δ − u vᵀ‖/‖Δ‖ is {worst:.2e}"
    if worst <= threshold:
        reason = f"rank-1 with factor_rule {rule!r}: {measured} <= {threshold:g} ({AUTO_MARGIN:g} × factor_tolerance)"
        return "factorised", {**decision, "reason": reason}, trial
    reason = f"not rank-1 with factor_rule {rule!r}: {measured} > {threshold:g} ({AUTO_MARGIN:g} × factor_tolerance)"
    return "full", {**decision, "reason": reason}, trial


def check_cross_fit(cross_fit: int | None, fit_fold: "FitFoldFn | None", num_rows: int | None) -> None:
    """Refuse a cross-fitting request that cannot work, naming the fix."""
    if cross_fit is None:
        if fit_fold is not None:
            raise ValueError("fit_fold= is only used with cross_fit=K (K >= 2 folds); pass cross_fit= or drop fit_fold=.")
        return
    if not isinstance(cross_fit, int) or isinstance(cross_fit, bool) or cross_fit < 2:
        raise ValueError(f"cross_fit must be an integer >= 2 (the number of folds), got {cross_fit!r}.")
    if num_rows is not None and cross_fit > num_rows:
        raise ValueError(f"cross_fit={cross_fit} folds need at least as many rows, but the dataset has {num_rows}.")
    if not callable(fit_fold):
        raise ValueError(
            "cross_fit=K needs fit_fold=(fold index, held-out row indices) -> a model of the same architecture trained "
            "without those rows."
        )


class FoldModels:
    """Which model harvests each row: ``backbone``, or with ``cross_fit=K`` the model of the row's fold
    (row ``i`` is in fold ``i % K``), built on first use by ``fit_fold`` and checked against the base."""

    def __init__(
        self,
        backbone: nn.Module,
        layer: nn.Linear,
        target_module: str,
        num_rows: int,
        cross_fit: int | None,
        fit_fold: "FitFoldFn | None",
        device: torch.device,
    ) -> None:
        self.backbone, self.layer, self.target_module = backbone, layer, target_module
        self.num_rows, self.cross_fit, self.fit_fold, self.device = num_rows, cross_fit, fit_fold, device
        self.fold_models: dict[int, tuple[nn.Module, nn.Linear]] = {}

    def fold_model(self, fold: int) -> tuple[nn.Module, nn.Linear]:
        if fold not in self.fold_models:
            model = self.fit_fold(fold, list(range(fold, self.num_rows, self.cross_fit)))
            if not isinstance(model, nn.Module):
                raise TypeError(f"fit_fold({fold}, ...) must return the fold's model (an nn.Module), got {type(model).__name__}.")
            _, layer = find_target_linear(model, self.target_module)
            if layer.weight.shape != self.layer.weight.shape:
                raise ValueError(
                    f"fit_fold({fold}, ...) returned a model whose {self.target_module!r} has weight shape "
                    f"{tuple(layer.weight.shape)}, the base model's has {tuple(self.layer.weight.shape)}: it must be the same architecture."
                )
            model.to(self.device).eval()
            self.fold_models[fold] = (model, layer)
        return self.fold_models[fold]

    def groups(self, ids: torch.Tensor) -> Iterator[tuple[nn.Module, nn.Linear, torch.Tensor]]:
        """``(model, its target layer, positions in ids)`` for every model that harvests some of ``ids``."""
        if self.cross_fit is None:
            yield self.backbone, self.layer, torch.arange(ids.shape[0])
            return
        folds = ids % self.cross_fit
        for fold in folds.unique().tolist():
            yield (*self.fold_model(fold), torch.nonzero(folds == fold).flatten())


def select_rows(inputs: Mapping[str, Any], rows: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """The ``rows`` of every batched tensor input (all of them when ``rows`` is the whole batch)."""
    if rows.shape[0] == batch_size:
        return dict(inputs)
    selected = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            selected[name] = value[rows.to(value.device)]
        elif isinstance(value, torch.Tensor) or not hasattr(value, "__len__"):
            selected[name] = value
        else:
            raise TypeError(
                f"Cross-fitting splits each batch by fold, but input {name!r} is a {type(value).__name__}; return tensors "
                "from collate_fn."
            )
    return selected


def merge_parts(parts: list[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One batch's columns from the parts harvested by different fold models, in id order."""
    if len(parts) == 1:
        return parts[0]
    columns = {name: torch.cat([part[0][name] for part in parts]) for name in parts[0][0]}
    order = torch.argsort(columns["id"])
    return {name: value[order] for name, value in columns.items()}, torch.cat([part[1] for part in parts])


def _harvest_shards(
    models: "FoldModels",
    reader: SampleReader,
    output_dir: Path,
    metadata: Mapping[str, Any],
    state: Any,
    batch_size: int,
    loss: LossFn | None,
    progress: bool,
    first_batch: OverfitBatch | None = None,
) -> None:
    """Harvest this process's missing shards, one atomic shard file at a time; ``first_batch`` is rows
    ``[0, batch_size)`` overfitted, when already at hand."""
    settings = metadata["harvest_config"]
    features = delta_features(
        in_features=metadata["in_features"],
        out_features=metadata["out_features"],
        output_dim=metadata["output_dim"],
        task=metadata["task"],
        dtype=settings["dtype"],
        trajectory_steps=settings["steps"] if settings["store_trajectory"] else None,
        storage=settings["delta_storage"],
    )

    def harvest_rows(start: int, end: int) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        if first_batch is not None and start == 0 and end == min(batch_size, len(reader)):
            return checked(*batch_columns(
                first_batch, dtype=settings["dtype"], delta_storage=settings["delta_storage"],
                factor_tolerance=settings.get("factor_tolerance"), strict_tolerance=settings.get("factor_tolerance_strict", True),
                measure_factor_residual=True,
            ))
        inputs, labels = reader(start, end)
        ids = torch.arange(start, end)
        parts = [
            harvest_batch(
                model, layer, select_rows(inputs, rows, end - start), labels[rows], ids[rows], task=metadata["task"],
                optimizer=settings["optimizer"], lr=settings["lr"], steps=settings["steps"], loss_fn=loss,
                store_trajectory=settings["store_trajectory"], dtype=settings["dtype"],
                delta_storage=settings["delta_storage"], factor_tolerance=settings.get("factor_tolerance"),
                strict_tolerance=settings.get("factor_tolerance_strict", True), measure_factor_residual=True,
            )
            for model, layer, rows in models.groups(ids)
        ]
        return checked(*merge_parts(parts))

    def checked(columns: dict[str, torch.Tensor], skipped: torch.Tensor) -> dict[str, torch.Tensor]:
        if skipped.numel():
            logger.warning(
                f"Skipped {skipped.numel()} sample(s) with non-finite deltas or conditioning: ids "
                f"{skipped.tolist()}. They are listed in harvest.json (skipped_ids_by_reason.non_finite)."
            )
        # The one place all-zero deltas are decided: a sample the model already fits exactly (zero loss gradient) has
        # nothing to learn from and no scale to normalise by (training refuses ρ = 0), so it is skipped and counted.
        zero = columns["rho"] == 0
        zero_ids = columns["id"][zero].tolist()
        if zero_ids:
            logger.warning(
                f"Skipped {len(zero_ids)} sample(s) whose delta is all zeros (fitted to zero loss already): ids "
                f"{zero_ids}. They are listed in harvest.json (skipped_ids_by_reason.zero_delta)."
            )
            columns = {name: value[~zero] for name, value in columns.items()}
        return columns, {"non_finite": skipped.tolist(), "zero_delta": zero_ids}

    harvest_shards(
        output_dir, metadata, features, harvest_rows, state=state, batch_size=batch_size, weight_columns=DELTA_COLUMNS,
        summed_columns=("factor_residual",), progress=progress, description=f"Harvesting {metadata['target_module']}",
    )


def load_source_dataset(
    name_or_path: str, config_name: str | None = None, split: str | None = None, default: str | None = DEFAULT_SPLIT
) -> Dataset:
    """One split of a dataset: a ``save_to_disk`` directory (``Dataset`` or ``DatasetDict``), else ``load_dataset``.

    ``split=None``: the ``default`` split (``None`` for an evaluation), or the only one, or the single dataset of
    the directory; a ``split`` the dataset does not have is a ``ValueError`` naming those it has
    (:func:`ocd_hf.data.select_split`).
    """
    path = Path(name_or_path).expanduser()
    empty = ValueError(f"dataset={name_or_path!r} holds an empty dataset (0 rows); there is nothing to read. Pass a dataset with rows.")
    if is_saved_dataset(path):
        try:
            loaded = load_from_disk(str(path))
        except IndexError as error:  # recent datasets write no data file for 0 rows, and load_from_disk fails on that
            raise empty from error
        if isinstance(loaded, Dataset) and loaded.num_rows == 0:  # datasets 4.0 writes and reads one back
            raise empty
    elif only_local(name_or_path) and not path.exists():
        raise FileNotFoundError(
            f"dataset={name_or_path!r}: no such directory. Pass a directory written by save_to_disk, a directory of data "
            "files, or a Hub dataset id ('namespace/name')."
        )
    else:
        try:
            loaded = load_dataset(name_or_path, config_name, split=split)
        except (DatasetNotFoundError, ConnectionError) as error:
            if path.exists():
                raise
            raise FileNotFoundError(
                f"dataset={name_or_path!r} is not a local directory, and the Hub could not provide it "
                f"({type(error).__name__}: {error}). Pass a directory written by save_to_disk, or a Hub dataset id."
            ) from error
    return select_split(loaded, split, name_or_path, default=default)


def source_collate_fn(
    dataset: Dataset,
    model_name_or_path: str,
    *,
    revision: str | None = None,
    text_column: str | None = None,
    image_column: str | None = None,
    max_length: int = 128,
) -> CollateFn | None:
    """How ``ocd-hf harvest`` and ``ocd-hf evaluate`` turn raw rows into backbone inputs: ``text_column``
    tokenized with the tokenizer saved with ``model_name_or_path`` (padded per batch, truncated to
    ``max_length`` tokens), or ``image_column`` through its image processor; ``None`` (neither given) means
    the dataset's columns are already the inputs. The column is checked before the tokenizer is loaded."""
    if text_column is not None and image_column is not None:
        raise ValueError("Pass text_column or image_column (--text-column / --image-column), not both.")
    column = text_column if text_column is not None else image_column
    if column is None:
        return None
    if column not in dataset.column_names:
        option = "text_column (--text-column)" if text_column is not None else "image_column (--image-column)"
        raise ValueError(f"{option} {column!r} is not a column of the dataset (columns: {dataset.column_names}).")
    if text_column is not None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length (--max-length) must be a positive number of tokens, got {max_length!r}.")
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, revision=revision)

        def collate_text(batch: Mapping[str, Any]) -> Mapping[str, Any]:
            return tokenizer(batch[text_column], padding=True, truncation=True, max_length=max_length, return_tensors="pt")

        return collate_text
    processor = AutoImageProcessor.from_pretrained(model_name_or_path, revision=revision)

    def collate_images(batch: Mapping[str, Any]) -> Mapping[str, Any]:
        return processor(batch[image_column], return_tensors="pt")

    return collate_images


def harvest_from_pretrained(
    model_name_or_path: str,
    dataset_name_or_path: str,
    target_module: str,
    output_dir: str | os.PathLike,
    *,
    model_revision: str | None = None,
    model_class: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    max_length: int = 128,
    max_samples: int | None = None,
    batch_size: int | None = None,
    optimizer: str = DEFAULT_OPTIMIZER,
    lr: float = DEFAULT_LR,
    steps: int = DEFAULT_STEPS,
    dtype: str = "float32",
    delta_storage: str = "auto",
    factor_tolerance: float = DEFAULT_FACTOR_TOLERANCE,
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
    dataset = load_source_dataset(dataset_name_or_path, dataset_config, split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    collate_fn = source_collate_fn(
        dataset, model_name_or_path, revision=model_revision, text_column=text_column, image_column=image_column,
        max_length=max_length,
    )
    backbone = load_pretrained_backbone(model_name_or_path, model_class, revision=model_revision)
    return harvest_deltas(
        backbone, dataset, target_module, output_dir, label_column=label_column, collate_fn=collate_fn,
        batch_size=batch_size, optimizer=optimizer, lr=lr, steps=steps, store_trajectory=store_trajectory, dtype=dtype,
        delta_storage=delta_storage, factor_tolerance=factor_tolerance, shard_size=shard_size,
        base_model_name_or_path=model_name_or_path, base_model_revision=model_revision, progress=progress,
    )
