"""Task-head harvest, shared by the task-conditioned generators (Mc-Di's weight preparation, Alg. 1; D2NWG's
zoo of heads): fit one classification head per task with Adam from a Gaussian
initialisation, keep ``k`` local targets evenly spaced along each trajectory, and harvest them into a
sharded, resumable weight dataset.

A head is ``(N, d+1)``: the ``(N, d)`` weight of ``nn.Linear(d, N)`` with its bias as the last column.
Heads of ``B`` tasks are stacked ``(B, N, d+1)`` and fitted together: the loss is the *sum* of the
tasks' cross-entropies, so the gradient of task ``b``'s slice is exactly its own gradient, and one
element-wise Adam over the stack equals one Adam per task (the same argument as
:mod:`ocd_hf.finetune`). Early stopping is per task: a stopped task's head is frozen (its slice is
restored after every later step) while the others go on.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from datasets import Array2D, Array3D, Dataset, Features, List, Value
from huggingface_hub import DatasetCard
from torch.nn import functional as F

from .cards import render_dataset_card, write_card
from .episodes import EpisodeSampler, TaskDistribution
from .harvest import harvest_shards
from .weight_datasets import (
    DATA_FILES_PATTERN,
    SPLIT,
    check_storage_dtype,
    dataset_sha256,
    finalize_weight_dataset,
    harvest_lock,
    load_harvest_metadata,
    load_weight_dataset,
    prepare_output_dir,
    write_metadata,
)

FORMAT_VERSION = 1
HEAD_COLUMNS = ("theta0", "targets")
FIT_ON = ("support", "pool")
STOPPING_CRITERIA = ("patience", "generalisation_loss")
TARGET_SPACINGS = ("even", "last")
# Metadata that must agree for a harvest to continue in an existing directory.
TASK_HEADS_CARD_TEMPLATE = "task_heads_dataset_card.md"
DATASET_TAGS = ("task-heads", "weight-generation", "few-shot")
IDENTITY_KEYS = ("format_version", "n_way", "k_shot", "embedding_dim", "encoder", "harvest_config", "source", "num_shards")


@dataclass(frozen=True)
class EarlyStopping:
    """Per-task early stopping on a held-out part of the items a head is fitted on (Prechelt, 1998).

    Per class, ``max(1, floor(holdout_fraction · n_c))`` of its items (the last ones) are held out of the
    fit. After every step the held-out cross-entropy ``E_va`` is measured; from ``min_steps`` on, the
    task stops when it has not improved on its best ``E_opt`` by more than ``min_delta`` for ``patience``
    steps (``criterion="patience"``), or when Prechelt's generalisation loss ``GL = 100 (E_va/E_opt − 1)``
    exceeds ``gl_alpha`` percent (``"generalisation_loss"``). ``M`` is then the step of ``E_opt``: the
    head early stopping keeps.
    """

    holdout_fraction: float = 0.2
    criterion: str = "patience"
    patience: int = 20
    min_delta: float = 0.0
    gl_alpha: float = 5.0
    min_steps: int = 10

    def __post_init__(self) -> None:
        if self.criterion not in STOPPING_CRITERIA:
            raise ValueError(f"EarlyStopping.criterion must be one of {STOPPING_CRITERIA}, got {self.criterion!r}.")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"EarlyStopping.holdout_fraction must be in (0, 1), got {self.holdout_fraction}.")
        if self.patience < 1 or self.min_steps < 1 or self.min_delta < 0 or self.gl_alpha <= 0:
            raise ValueError(
                f"EarlyStopping needs patience >= 1, min_steps >= 1, min_delta >= 0 and gl_alpha > 0; got {self}."
            )


@dataclass
class HeadFit:
    """The result of :func:`fit_task_heads` for ``B`` tasks.

    Attributes:
        theta0: ``(B, N, d+1)`` the Gaussian initialisations.
        targets: ``(B, k, N, d+1)`` the local targets ``θ_{iM/k}`` (integer division), ``i = 1..k`` (``target_spacing="last"``:
            the last ``k`` steps' heads ``θ_{M−k+i}``, D2NWG's zoo of last checkpoints); the last is ``θ_M``.
        num_steps: ``(B,)`` ``M`` per task.
        stopped_at: ``(B,)`` the step each task's head stopped changing (``steps`` if it never stopped).
        losses: ``(B, k+1)`` cross-entropy on the fitted items at ``θ_0`` and at every target.
        heldout_losses: ``(B, k+1)`` the same on the held-out items (early stopping only, else ``None``).
        trajectory: ``(B, steps+1, N, d+1)`` every step's heads (``return_trajectory=True`` only).
    """

    theta0: torch.Tensor
    targets: torch.Tensor
    num_steps: torch.Tensor
    stopped_at: torch.Tensor
    losses: torch.Tensor
    heldout_losses: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None


def head_logits(heads: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, n, N)`` of heads ``(B, N, d+1)`` on items ``(B, n, d)``."""
    # Computed as W xᵀ (B, N, n), then transposed (a view): autograd then forms the weight gradient as (B, N, n) @ (B, n, d),
    # d output columns, instead of (B, d, n) @ (B, n, N); 2x faster per step on pool-sized tasks on a CPU (bench/fewshot.py).
    return torch.baddbmm(heads[:, :, -1:], heads[:, :, :-1], items.transpose(1, 2)).transpose(1, 2)


def task_losses(heads: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-task mean cross-entropy ``(B,)`` over the items whose ``weights`` (``(B, n)``, 0/1) are set."""
    per_item = F.cross_entropy(head_logits(heads, items).transpose(1, 2), labels, reduction="none")
    return (per_item * weights).sum(1) / weights.sum(1)


def holdout_mask(labels: torch.Tensor, num_classes: int, fraction: float) -> torch.Tensor:
    """``(B, n)`` True for the last ``max(1, floor(fraction · n_c))`` items of each class of each task."""
    one_hot = F.one_hot(labels, num_classes)
    counts = one_hot.sum(1)  # (B, N)
    held = (counts.double() * fraction).floor().long().clamp_(min=1)
    if bool((counts - held < 1).any()):
        raise ValueError(
            f"Early stopping holds out {fraction:.0%} (at least one item) of every class, but some classes have only "
            f"{int(counts.min())} item(s) to fit on: nothing would be left. Fit on more items (fit_on='pool', or more "
            "shots) or pass early_stopping=None."
        )
    rank = (one_hot.cumsum(1) * one_hot).sum(2) - 1  # position of each item within its class
    own_count, own_held = counts.gather(1, labels), held.gather(1, labels)
    return rank >= own_count - own_held


def target_steps(num_steps: torch.Tensor, num_targets: int, spacing: str = "even") -> torch.Tensor:
    """The steps ``(B, k+1)`` whose heads a fit keeps, ``0`` first then the ``k`` targets: ``iM/k`` (``"even"``) or the
    last ``k`` steps ``M−k+i`` (``"last"``, clamped at 0), for ``M = num_steps`` ``(B,)``."""
    if spacing not in TARGET_SPACINGS:
        raise ValueError(f"target_spacing must be one of {TARGET_SPACINGS}, got {spacing!r}.")
    if spacing == "even":
        return torch.stack([num_steps * i // num_targets for i in range(num_targets + 1)], 1)
    last = torch.stack([(num_steps - num_targets + i).clamp(min=0) for i in range(1, num_targets + 1)], 1)
    return torch.cat([torch.zeros_like(num_steps).unsqueeze(1), last], 1)


def check_task_batch(items: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if items.dim() != 3 or labels.shape != items.shape[:2]:
        raise ValueError(f"Expected items (B, n, d) and labels (B, n); got {tuple(items.shape)} and {tuple(labels.shape)}.")
    if labels.dtype not in (torch.int32, torch.int64) or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be integer class indices in [0, {num_classes}); got {labels.dtype} in "
                         f"[{int(labels.min())}, {int(labels.max())}].")


def fit_task_heads(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int,
    lr: float = 0.005,
    init_std: float = 0.01,
    num_targets: int = 3,
    target_spacing: str = "even",
    early_stopping: EarlyStopping | None = None,
    sam_rho: float | None = None,
    noise_std: float = 0.0,
    theta0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> HeadFit:
    """Fit ``B`` tasks' heads at once (Mc-Di's Alg. 1) and keep ``num_targets`` local targets per task.

    Args:
        support: ``(B, n, d)`` the items each head is fitted on (a task's support set, or a larger pool).
        support_labels: ``(B, n)`` their labels in ``0..num_classes-1``.
        steps: the number of Adam steps (the largest ``M``; early stopping may stop a task sooner).
        lr: Adam's learning rate (the paper's 0.005).
        init_std: ``θ_0 ~ N(0, init_std²)`` for weights and biases (unless ``theta0`` is given).
        target_spacing: ``"even"`` (Mc-Di's local targets ``θ_{iM/k}``) or ``"last"`` (the last ``k`` steps' heads).
        early_stopping: per-task stopping (:class:`EarlyStopping`), or ``None``: every task runs ``steps``.
        sam_rho: SAM's radius ``ρ``: each step's gradient is taken at ``θ + ρ g/‖g‖``, ``‖g‖`` the task's own norm.
        noise_std: augmentation: Gaussian noise of this std added to the items afresh at every step.
        theta0: ``(B, N, d+1)`` initial heads (default: drawn from ``generator``).
        generator: draws ``θ_0`` and the augmentation noise.
        return_trajectory: also return every step's heads ``(B, steps+1, N, d+1)``.

    With early stopping (or ``return_trajectory``) the trajectory is kept in memory while fitting
    (``(steps+1)·B·N·(d+1)`` floats: 74 MB for 32 tasks of 5-way d = 384 heads over 300 steps), since ``M``
    is known only once a task stops; without, only the ``k+1`` states that are returned.
    """
    check_task_batch(support, support_labels, num_classes)
    target_steps(torch.tensor([steps]), num_targets, target_spacing)  # refuses an unknown spacing before fitting
    if steps < num_targets or num_targets < 1:
        raise ValueError(f"steps ({steps}) must be >= num_targets ({num_targets}) >= 1: each local target is a distinct step.")
    if early_stopping is not None and early_stopping.min_steps < num_targets:
        raise ValueError(f"EarlyStopping.min_steps ({early_stopping.min_steps}) must be >= num_targets ({num_targets}).")
    batch, _, dim = support.shape
    items, labels = support.detach(), support_labels.long()
    shape = (batch, num_classes, dim + 1)
    if theta0 is None:
        theta0 = torch.randn(shape, generator=generator, dtype=items.dtype, device=items.device) * init_std
    elif theta0.shape != shape:
        raise ValueError(f"theta0 must have shape {shape}, got {tuple(theta0.shape)}.")
    held = holdout_mask(labels, num_classes, early_stopping.holdout_fraction) if early_stopping else torch.zeros_like(labels, dtype=torch.bool)
    fit_weights, held_weights = (~held).to(items.dtype), held.to(items.dtype)

    heads = theta0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([heads], lr=lr)
    keep_all = early_stopping is not None or return_trajectory
    kept = list(range(steps + 1)) if keep_all else sorted(set(target_steps(torch.tensor([steps]), num_targets, target_spacing)[0].tolist()))
    slot = {step: position for position, step in enumerate(kept)}  # where each kept step's heads are stored
    trajectory = torch.empty(len(kept), *shape, dtype=items.dtype, device=items.device)
    trajectory[0] = theta0
    active = torch.ones(batch, dtype=torch.bool, device=items.device)
    stopped_at = torch.full((batch,), steps, dtype=torch.long, device=items.device)
    best_loss = torch.full((batch,), math.inf, dtype=items.dtype, device=items.device)
    best_step = torch.full((batch,), steps, dtype=torch.long, device=items.device)
    last_step = steps
    for step in range(1, steps + 1):
        inputs = items if noise_std == 0 else items + noise_std * torch.randn(items.shape, generator=generator, dtype=items.dtype,
                                                                               device=items.device)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(task_losses(heads, inputs, labels, fit_weights).sum(), heads)
            if sam_rho:
                norm = gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
                perturbed = heads + sam_rho * gradient / norm
                (gradient,) = torch.autograd.grad(task_losses(perturbed, inputs, labels, fit_weights).sum(), heads)
        previous = heads.detach().clone()
        heads.grad = gradient
        optimizer.step()
        with torch.no_grad():
            heads.copy_(torch.where(active.view(-1, 1, 1), heads, previous))
        if step in slot:
            trajectory[slot[step]] = heads.detach()
        if early_stopping is None:
            continue
        with torch.no_grad():
            loss = task_losses(heads, items, labels, held_weights)
        eligible = active & (step >= early_stopping.min_steps)
        improved = eligible & (loss < best_loss - early_stopping.min_delta)
        best_loss = torch.where(improved, loss, best_loss)
        best_step = torch.where(improved, step, best_step)
        if early_stopping.criterion == "patience":
            stop = eligible & (step - best_step >= early_stopping.patience)
        else:
            stop = eligible & (100 * (loss / best_loss - 1) > early_stopping.gl_alpha)
        stopped_at = torch.where(stop, step, stopped_at)
        active = active & ~stop
        if not bool(active.any()):
            last_step = step
            break
    if keep_all:
        trajectory[last_step + 1 :] = trajectory[last_step]
    num_steps = best_step if early_stopping else torch.full((batch,), steps, dtype=torch.long, device=items.device)
    index = target_steps(num_steps, num_targets, target_spacing)  # (B, k+1), θ_0 first
    slots = torch.full((steps + 1,), -1, dtype=torch.long, device=items.device)
    slots[kept] = torch.arange(len(kept), device=items.device)
    states = trajectory.transpose(0, 1)[torch.arange(batch, device=items.device).unsqueeze(1), slots[index]]  # (B, k+1, N, d+1)
    with torch.no_grad():  # one point at a time: no (k+1)-fold copy of the items
        losses = torch.stack([task_losses(states[:, i], items, labels, fit_weights) for i in range(num_targets + 1)], 1)
        heldout = torch.stack([task_losses(states[:, i], items, labels, held_weights) for i in range(num_targets + 1)], 1) if early_stopping else None
    return HeadFit(
        theta0=theta0.detach(), targets=states[:, 1:], num_steps=num_steps, stopped_at=stopped_at, losses=losses,
        heldout_losses=heldout, trajectory=trajectory.transpose(0, 1) if return_trajectory else None,
    )


# ----- the task source of a harvest ---------------------------------------------------------------


@dataclass
class TaskBatch:
    """Tasks ``start..end`` of a harvest: the support a generator is conditioned on, and what the head is fitted on."""

    support: torch.Tensor  # (B, N·K, d)
    support_labels: torch.Tensor  # (B, N·K)
    support_index: torch.Tensor  # (B, N, K) rows of the distribution's dataset
    classes: torch.Tensor  # (B, N) class ids of labels 0..N-1
    fit_items: torch.Tensor  # (B, n, d)
    fit_labels: torch.Tensor  # (B, n)


class EpisodeTasks:
    """The tasks of a harvest: seeded N-way K-shot episodes of a :class:`~ocd_hf.episodes.TaskDistribution`.

    With ``fit_on="support"`` a head is fitted on its episode's support set; with ``"pool"`` on the
    support plus ``pool_size`` more items of each of its classes (so the generator learns, from the
    support alone, the head that more data would give). Tasks ``start..end`` are drawn with a seed made
    of ``seed`` and ``start``, so a harvest that resumes with the same batch size draws the same tasks.
    """

    def __init__(
        self,
        distribution: TaskDistribution,
        n_way: int,
        k_shot: int,
        *,
        fit_on: str = "support",
        pool_size: int = 20,
        column: str = "embedding",
        seed: int = 0,
    ) -> None:
        if fit_on not in FIT_ON:
            raise ValueError(f"fit_on must be one of {FIT_ON}, got {fit_on!r}.")
        if fit_on == "pool" and pool_size < 1:
            raise ValueError(f"fit_on='pool' needs pool_size >= 1 extra items per class, got {pool_size}.")
        self.distribution, self.n_way, self.k_shot = distribution, n_way, k_shot
        self.fit_on, self.pool_size, self.column, self.seed = fit_on, pool_size if fit_on == "pool" else 0, column, seed
        self.features = distribution.features(column)
        if self.features.dim() != 2:
            raise ValueError(f"Column {column!r} must hold one embedding vector per item; it has shape {tuple(self.features.shape)}.")
        EpisodeSampler(distribution, n_way, k_shot, self.pool_size)  # validates the settings against the distribution now

    @property
    def embedding_dim(self) -> int:
        return self.features.shape[1]

    def describe(self) -> dict[str, Any]:
        """What identifies these tasks (recorded in the harvest metadata)."""
        dataset = self.distribution.dataset
        return {
            "distribution": self.distribution.name, "column": self.column,
            "inputs_sha256": dataset_sha256(dataset, [self.column, self.distribution.label_column]),
            "classes": self.distribution.classes.tolist(),
            "class_names": [self.distribution.class_names[int(c)] for c in self.distribution.classes],
            "fit_on": self.fit_on, "pool_size": self.pool_size, "seed": self.seed,
        }

    def __call__(self, start: int, end: int) -> TaskBatch:
        seed = int(np.random.SeedSequence([self.seed, start]).generate_state(1)[0])
        sampler = EpisodeSampler(self.distribution, self.n_way, self.k_shot, self.pool_size, seed=seed)
        episode = sampler.sample(end - start).with_features(self.features)
        labels = episode.support_labels
        if self.fit_on == "support":
            fit_items, fit_labels = episode.support, labels
        else:
            rows = torch.cat([episode.support_index, episode.query_index], 2)  # (B, N, K+P), grouped by label
            fit_items = self.features[rows.reshape(-1)].view(len(episode), -1, self.embedding_dim)
            fit_labels = torch.arange(self.n_way).repeat_interleave(rows.shape[2]).repeat(len(episode), 1)
        return TaskBatch(episode.support, labels, episode.support_index, episode.classes, fit_items, fit_labels)


# ----- the harvest ---------------------------------------------------------------------------------


def head_features(n_way: int, k_shot: int, embedding_dim: int, num_targets: int, dtype: str, heldout: bool) -> Features:
    """The schema of a head dataset (``theta0``/``targets`` as float32, or bfloat16 bit patterns as int16)."""
    values = "float32" if dtype == "float32" else "int16"
    columns: dict[str, Any] = {
        "id": Value("int64"),
        "classes": List(Value("int64"), length=n_way),
        "support_index": Array2D((n_way, k_shot), "int64"),
        "support": Array2D((n_way * k_shot, embedding_dim), "float32"),
        "support_labels": List(Value("int64"), length=n_way * k_shot),
        "theta0": Array2D((n_way, embedding_dim + 1), values),
        "targets": Array3D((num_targets, n_way, embedding_dim + 1), values),
        "steps": Value("int64"),
        "stopped_at": Value("int64"),
        "losses": List(Value("float32"), length=num_targets + 1),
    }
    if heldout:
        columns["heldout_losses"] = List(Value("float32"), length=num_targets + 1)
    return Features(columns)


def harvest_task_heads(
    source: TaskDistribution | EpisodeTasks,
    output_dir: str | os.PathLike,
    *,
    num_tasks: int,
    n_way: int = 5,
    k_shot: int = 1,
    fit_on: str = "support",
    pool_size: int = 20,
    column: str = "embedding",
    steps: int = 100,
    lr: float = 0.005,
    init_std: float = 0.01,
    num_targets: int = 3,
    target_spacing: str = "even",
    early_stopping: EarlyStopping | None = None,
    sam_rho: float | None = None,
    noise_std: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
    shard_size: int = 1024,
    dtype: str = "float32",
    encoder_id: str | None = None,
    encoder_revision: str | None = None,
    encoder_fingerprint: str | None = None,
    accelerator: Accelerator | PartialState | None = None,
    progress: bool = True,
) -> Dataset:
    """Fit the heads of ``num_tasks`` tasks (:func:`fit_task_heads`, ``batch_size`` at a time) and store them.

    ``source`` is a :class:`~ocd_hf.episodes.TaskDistribution` whose ``column`` holds embeddings (wrapped
    in :class:`EpisodeTasks` with ``n_way``, ``k_shot``, ``fit_on``, ``pool_size`` and ``seed``) or an
    :class:`EpisodeTasks`. Each row holds the task's ``classes``, ``support_index`` and ``support``
    embeddings/``support_labels`` (the generator's condition), ``theta0`` ``(N, d+1)``, ``targets``
    ``(k, N, d+1)`` (Mc-Di's local targets, or with ``target_spacing="last"`` the last ``k`` checkpoints: D2NWG's
    zoo), ``steps`` (``M``), ``stopped_at`` and ``losses`` (``heldout_losses`` with early stopping). The directory
    is a weight dataset (:mod:`ocd_hf.weight_datasets`): killed, the same call resumes from the last complete
    shard; a directory made with other settings is refused.
    ``encoder_*`` name the frozen encoder that made the embeddings (recorded, and copied into the
    generator's config so that it can refuse another encoder). Given an :class:`EpisodeTasks`, its own
    ``n_way``, ``k_shot``, ``fit_on``, ``pool_size``, ``column`` and ``seed`` apply. Every batch of
    ``batch_size`` tasks draws its episodes, ``θ_0`` and augmentation noise from seeds made of the seed
    and its first task: resuming needs the same ``batch_size`` (it is part of the recorded settings).
    """
    check_storage_dtype(dtype)
    target_steps(torch.tensor([steps]), num_targets, target_spacing)  # refuses an unknown spacing before anything is written
    for name, value in (("num_tasks", num_tasks), ("batch_size", batch_size), ("shard_size", shard_size), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if isinstance(source, TaskDistribution):
        source = EpisodeTasks(source, n_way, k_shot, fit_on=fit_on, pool_size=pool_size, column=column, seed=seed)
    elif not isinstance(source, EpisodeTasks):
        raise TypeError(f"source must be a TaskDistribution or EpisodeTasks, got {type(source).__name__}.")
    state = accelerator if accelerator is not None else PartialState()
    settings = {
        "steps": steps, "lr": lr, "init_std": init_std, "num_targets": num_targets, "sam_rho": sam_rho, "noise_std": noise_std,
        "early_stopping": asdict(early_stopping) if early_stopping else None, "optimizer": "adam", "batch_size": batch_size,
        "shard_size": shard_size, "dtype": dtype,
    }
    if target_spacing != "even":  # recorded only when not the default, so that harvests made before it existed still resume
        settings["target_spacing"] = target_spacing
    metadata = {
        "format_version": FORMAT_VERSION,
        "n_way": source.n_way,
        "k_shot": source.k_shot,
        "embedding_dim": source.embedding_dim,
        "encoder": {"id": encoder_id, "revision": encoder_revision, "fingerprint": encoder_fingerprint},
        "harvest_config": settings,
        "source": {**source.describe(), "num_rows": num_tasks},
        "num_shards": math.ceil(num_tasks / shard_size),
    }
    with harvest_lock(output_dir, enabled=state.is_main_process):  # before any work: writable, not in use
        features = head_features(source.n_way, source.k_shot, source.embedding_dim, num_targets, dtype, early_stopping is not None)
        prepare_output_dir(output_dir, metadata, IDENTITY_KEYS, is_main_process=state.is_main_process)
        state.wait_for_everyone()

        def harvest_rows(start: int, end: int) -> dict[str, torch.Tensor]:
            tasks = source(start, end)
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([source.seed, start, 1]).generate_state(1)[0]))
            fit = fit_task_heads(
                tasks.fit_items, tasks.fit_labels, source.n_way, steps=steps, lr=lr, init_std=init_std, num_targets=num_targets,
                target_spacing=target_spacing, early_stopping=early_stopping, sam_rho=sam_rho, noise_std=noise_std, generator=generator,
            )
            rows = {
                "id": torch.arange(start, end), "classes": tasks.classes, "support_index": tasks.support_index, "support": tasks.support,
                "support_labels": tasks.support_labels, "theta0": fit.theta0, "targets": fit.targets, "steps": fit.num_steps,
                "stopped_at": fit.stopped_at, "losses": fit.losses,
            }
            if fit.heldout_losses is not None:
                rows["heldout_losses"] = fit.heldout_losses
            return rows

        harvest_shards(
            output_dir, metadata, features, harvest_rows, state=state, batch_size=batch_size, weight_columns=HEAD_COLUMNS,
            progress=progress, description=f"Fitting {source.n_way}-way heads",
        )
        state.wait_for_everyone()
        if state.is_main_process:
            final, _ = finalize_weight_dataset(output_dir, metadata, statistics_columns=("steps", "stopped_at"))
            write_metadata(output_dir, final)
            write_card(task_heads_card(final), output_dir)
        state.wait_for_everyone()
    return load_task_heads(output_dir)


def task_heads_card(metadata: Mapping[str, Any]) -> DatasetCard:
    """The dataset card of a finished head harvest, from its ``harvest.json`` metadata."""
    return render_dataset_card(
        TASK_HEADS_CARD_TEMPLATE, pretty_name=f"{metadata['n_way']}-way {metadata['k_shot']}-shot task heads",
        num_samples=metadata["num_samples"], tags=DATASET_TAGS, data_files=DATA_FILES_PATTERN, split=SPLIT,
        context={**metadata, "split": SPLIT},
    )


def load_task_heads(path: str | os.PathLike, verify: bool = False) -> Dataset:
    """A complete head dataset (from :func:`harvest_task_heads`), memory-mapped, as torch tensors (heads decoded to float32).

    Shards are checked like :func:`ocd_hf.load_deltas`' (sizes, counts, ids; sha256 with ``verify=True``)."""
    load_head_metadata(path)
    return load_weight_dataset(path, HEAD_COLUMNS, verify=verify)


def load_head_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``harvest.json`` of a head dataset; ``ValueError`` if the directory holds another kind of weight dataset."""
    metadata = load_harvest_metadata(path)
    if "n_way" not in metadata or "embedding_dim" not in metadata:
        raise ValueError(f"{str(Path(path))!r} is a weight dataset but not a head dataset; make one with harvest_task_heads(...).")
    return metadata


def resolve_head_dataset(heads: str | os.PathLike | tuple[Dataset, Mapping[str, Any]]) -> tuple[Dataset, dict[str, Any]]:
    """A head dataset and its metadata from a directory or a ``(dataset, metadata)`` pair."""
    if isinstance(heads, (str, os.PathLike)):
        return load_task_heads(heads), load_head_metadata(heads)
    if isinstance(heads, (tuple, list)) and len(heads) == 2 and isinstance(heads[0], Dataset) and isinstance(heads[1], Mapping):
        return heads[0], dict(heads[1])
    raise TypeError(f"head_dataset must be a head dataset directory or a (datasets.Dataset, metadata) pair, got {type(heads).__name__}.")
