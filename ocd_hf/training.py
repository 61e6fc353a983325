"""Train the OCD hypernetwork on a delta dataset with Accelerate: the denoiser (epsilon-prediction
MSE on normalised, zero-padded deltas) and the scale net jointly, with gradient accumulation,
clipping, EMA, a validation split, checkpoints that resume exactly, and DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from datasets import Dataset
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .configuration_ocd import BACKBONE_FIELDS, OCDConfig
from .deltas import delta_storage, resolve_deltas, stored_factor_rule
from .factorised import RULE_FOR_OPTIMIZER, expand_factors, factorise_deltas
from .hypernetwork import OCDHypernetwork, delta_scale
from .modeling_ocd import OCDWrapper
from .target import find_target_linear

logger = get_logger(__name__)

HISTORY_NAME = "training_history.json"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
EMA_WEIGHTS_NAME = "ema.safetensors"
SCALE_LOSSES = ("log_mse", "db")

REQUIRED_BACKBONE_FIELDS = ("target_module", "in_features", "out_features", "output_dim")
# The OCDConfig fields a training run may choose; the rest come from the harvest or from the data.
TRAINABLE_CONFIG_FIELDS = (
    "delta_mode",
    "generator",
    "label_combination",
    "factor_rule",
    "denoiser_config",
    "factor_denoiser_config",
    "scheduler_config",
    "num_inference_steps",
    "condition_hidden_dim",
    "condition_components",
    "delta_normalization",
)
# Condition component name -> dataset column and the config field holding its size.
CONDITION_COLUMNS = {
    "input": ("layer_input", "in_features"),
    "activation": ("layer_output", "out_features"),
    "output": ("model_output", "output_dim"),
}
# Below this spread of log ρ (0.1 % relative) the scale is treated as a constant: standardising by a
# tinier std would make the scale net fit floating-point noise (with Adam, ρ is nearly constant).
MIN_LOG_RHO_STD = 1e-3
DB_EPSILON = 1e-8
# Mean relative residual ‖Δ − u vᵀ‖/‖Δ‖ above which factorised training is refused: the deltas are not rank-1.
MAX_FACTOR_RESIDUAL = 0.05
# Matrix entries per batch of the one-pass delta scan (64 MB of float32): 28 deltas of a 384×1536 layer.
SCAN_BATCH_ELEMENTS = 2**24


# ----- inputs: the delta dataset, its metadata and the config --------------------------------------


def stores_factors(dataset: Dataset) -> bool:
    """Whether ``dataset`` holds left factors (``delta_factor``, factorised storage) rather than full deltas."""
    return "delta_factor" in dataset.column_names


def choose_delta_mode(metadata: Mapping[str, Any], dataset: Dataset, max_samples: int = 256) -> str:
    """``"factorised"`` where the harvested deltas are rank-1 with the right factor their optimizer
    implies, else ``"full"``. Measured, never assumed: factorised storage carries the residual of
    every delta (``factor_residual``); full storage is factorised here on up to ``max_samples`` deltas."""
    if len(dataset) == 0:
        return "full"
    if stores_factors(dataset):
        residual = torch.as_tensor(dataset.select_columns(["factor_residual"]).with_format("numpy")[:]["factor_residual"])
    else:
        optimizer = str((metadata.get("harvest_config") or {}).get("optimizer", "")).lower()
        if metadata.get("per_token") or optimizer not in RULE_FOR_OPTIMIZER:
            return "full"
        rows = dataset.select(range(min(max_samples, len(dataset)))).with_format("torch")[:]
        _, residual = factorise_deltas(rows["delta"].float(), rows["layer_input"].float(), RULE_FOR_OPTIMIZER[optimizer])
    return "factorised" if float(residual.mean()) <= MAX_FACTOR_RESIDUAL else "full"


def build_config(
    metadata: Mapping[str, Any], config_overrides: Mapping[str, Any] | None = None, dataset: Dataset | None = None
) -> OCDConfig:
    """The :class:`OCDConfig` of a hypernetwork for deltas harvested as ``metadata`` describes, plus ``config_overrides``.

    ``delta_mode`` ``"auto"`` (the default) picks factorised deltas where they are exact
    (:func:`choose_delta_mode` on ``dataset``) and full deltas otherwise. For deltas stored as factors
    the factor rule is the storage's (both modes need it: full mode expands ``u vᵀ``).
    """
    missing = [key for key in REQUIRED_BACKBONE_FIELDS if metadata.get(key) is None]
    if missing:
        raise ValueError(
            f"The harvest metadata lacks {missing}; it must describe the backbone and target layer the deltas were "
            "harvested from (write it with ocd_hf.deltas, or build it with OCDConfig.from_backbone(...).to_dict())."
        )
    overrides = dict(config_overrides or {})
    if overrides.get("delta_mode", "auto") == "auto":
        overrides["delta_mode"] = choose_delta_mode(metadata, dataset) if dataset is not None else "full"
    refused = sorted(set(overrides) - set(TRAINABLE_CONFIG_FIELDS))
    if refused:
        raise ValueError(
            f"config_overrides may only set {list(TRAINABLE_CONFIG_FIELDS)}, got {refused}: the backbone fields come "
            "from the harvest metadata and log_rho_mean/log_rho_std are measured on the training deltas."
        )
    fields = {key: metadata[key] for key in BACKBONE_FIELDS if key in metadata}
    harvest_config = dict(metadata.get("harvest_config") or {})
    optimizer = str(harvest_config.get("optimizer", "")).lower()
    if delta_storage(metadata) == "factorised":
        rule = stored_factor_rule(metadata)
        if overrides.get("factor_rule", rule) != rule:
            raise ValueError(
                f"The deltas are stored as left factors for factor_rule {rule!r} (Δ = u vᵀ); factor_rule="
                f"{overrides['factor_rule']!r} cannot be trained on them. Drop the factor_rule override, or harvest "
                "with delta_storage='full'."
            )
        overrides["factor_rule"] = rule
    elif overrides.get("delta_mode") == "factorised" and "factor_rule" not in overrides and optimizer in RULE_FOR_OPTIMIZER:
        overrides["factor_rule"] = RULE_FOR_OPTIMIZER[optimizer]
    return OCDConfig(**fields, harvest_config=harvest_config, **overrides)


def training_columns(config: OCDConfig, factors_stored: bool = False) -> list[str]:
    """The dataset columns training reads: the stored delta (or factor), the conditioning, and what
    converting between the two needs (the layer input; the factorisation residual of stored factors).
    A ``"label"`` generator reads the labels and the conditioning only."""
    conditioning = [CONDITION_COLUMNS[c][0] for c in config.condition_components]
    if config.generator == "label":
        return ["label", *conditioning]
    if factors_stored:
        columns = ["delta_factor", "factor_residual"] if config.delta_mode == "factorised" else ["delta_factor", "layer_input"]
    else:
        columns = ["delta", "layer_input"] if config.delta_mode == "factorised" else ["delta"]
    return list(dict.fromkeys(columns + conditioning))


def select_training_columns(dataset: Dataset, columns: list[str]) -> Dataset:
    """Only ``columns``, as torch tensors; a custom transform (e.g. ``load_deltas``' bfloat16 decoding) is kept."""
    selected = dataset.select_columns(columns)
    return selected if selected.format["type"] == "custom" else selected.with_format("torch")


def check_deltas(dataset: Dataset, config: OCDConfig, backbone: nn.Module) -> None:
    """Refuse an empty dataset, missing columns, and deltas or conditioning whose shapes don't match the layer."""
    if len(dataset) == 0:
        raise ValueError("The delta dataset is empty: harvest deltas first (ocd_hf.harvest) and train on a non-empty dataset.")
    factors_stored = stores_factors(dataset)
    needed = training_columns(config, factors_stored)
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The delta dataset lacks the column(s) {missing} (it has {dataset.column_names}). A delta dataset holds "
            "'delta' (or 'delta_factor' and 'factor_residual') and the conditioning columns 'layer_input', "
            "'layer_output', 'model_output'; load it with ocd_hf.deltas.load_deltas."
        )
    first = select_training_columns(dataset, needed)[0]
    stored, expected, name = (
        ("delta_factor", (config.out_features,), "delta factors") if factors_stored else ("delta", config.weight_shape, "deltas")
    )
    if stored in first and tuple(first[stored].shape) != expected:
        raise ValueError(
            f"The {name} have shape {tuple(first[stored].shape)} but the harvest metadata describes layer "
            f"{config.target_module!r} with weight shape {config.weight_shape}: the dataset and its metadata don't belong together."
        )
    for column, size_field in CONDITION_COLUMNS.values():
        size = getattr(config, size_field)
        if column in first and first[column].shape != (size,):
            raise ValueError(
                f"Column {column!r} holds vectors of shape {tuple(first[column].shape)}, expected ({size},) "
                f"({size_field} of the harvest metadata)."
            )
    name, layer = find_target_linear(backbone, config.target_module)
    if (layer.out_features, layer.in_features) != config.weight_shape:
        raise ValueError(
            f"The deltas were harvested from a layer of weight shape {config.weight_shape}, but the backbone's "
            f"{name!r} has shape ({layer.out_features}, {layer.in_features}). Train with the backbone the deltas were "
            f"harvested from ({config.base_model_name_or_path!r})."
        )


def split_deltas(dataset: Dataset, validation_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Carve a seeded random validation split off the deltas (``None`` when ``validation_fraction`` is 0).

    Rows are selected in memory (``Dataset.train_test_split`` would write index cache files into
    the delta dataset's directory).
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    if validation_fraction == 0.0:
        return dataset, None
    num_validation = math.ceil(validation_fraction * len(dataset))
    if num_validation >= len(dataset):
        raise ValueError(
            f"validation_fraction={validation_fraction} of {len(dataset)} delta(s) leaves none to train on; "
            "harvest more or lower validation_fraction (0 disables validation)."
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    validation, train = order[:num_validation].sort().values, order[num_validation:].sort().values
    return dataset.select(train.tolist(), keep_in_memory=True), dataset.select(validation.tolist(), keep_in_memory=True)


def delta_targets(batch: Mapping[str, torch.Tensor], config: OCDConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The raw deltas a batch teaches, ``(batch, out, in)`` (full mode) or left factors ``(batch, out)``
    (factorised mode), from either storage; and in factorised mode the relative residual of each
    factorisation ``(batch,)`` (``None`` in full mode).

    Stored factors are read directly in factorised mode and expanded to ``u vᵀ`` in full mode (that
    costs a ``batch × out × in`` tensor, as reading full deltas does); stored full deltas are
    factorised here in factorised mode.
    """
    factorised = config.delta_mode == "factorised"
    if "delta_factor" in batch:
        factors = batch["delta_factor"].float()
        if factorised:
            return factors, batch["factor_residual"].float()
        return expand_factors(factors, batch["layer_input"].float(), config.factor_rule), None
    deltas = batch["delta"].float()
    if factorised:
        return factorise_deltas(deltas, batch["layer_input"].float(), config.factor_rule)
    return deltas, None


def denoiser_targets(hypernetwork: OCDHypernetwork, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the denoiser learns to generate for a batch of raw deltas, and their scale ``ρ`` ``(batch,)``.

    Full mode: ``Δ/ρ`` zero-padded to the UNet's size. Factorised mode: ``u/ρ`` for the left factor
    ``u`` of ``Δ ≈ u vᵀ`` (``v`` from the layer input by ``config.factor_rule``), ``ρ`` being ``u``'s scale.
    """
    config = hypernetwork.config
    deltas, _ = delta_targets(batch, config)
    rho = delta_scale(deltas, config.delta_normalization)
    normalised = deltas / rho.view(-1, *([1] * (deltas.dim() - 1)))
    return hypernetwork.to_denoiser_space(normalised), rho


@torch.no_grad()
def scan_deltas(
    dataset: Dataset, config: OCDConfig, batch_size: int | None = None, progress: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One pass over ``dataset`` (torch-formatted): every delta's ``log ρ`` and the conditioning columns.

    Refuses deltas whose ``ρ`` is zero or not finite, and, in factorised mode, deltas that are not rank-1.
    ``batch_size`` defaults to as many rows as hold about :data:`SCAN_BATCH_ELEMENTS` matrix entries
    (at most 256), so that large layers' deltas do not all sit in memory at once.
    """
    if batch_size is None:
        batch_size = max(1, min(256, SCAN_BATCH_ELEMENTS // math.prod(config.weight_shape)))
    columns = {component: CONDITION_COLUMNS[component][0] for component in config.condition_components}
    log_rho, residuals, values = [], [], {component: [] for component in columns}
    batches = dataset.iter(batch_size=batch_size)
    for batch in tqdm(batches, total=math.ceil(len(dataset) / batch_size), desc="Scanning deltas", disable=not progress):
        for component, column in columns.items():
            values[component].append(batch[column].float())
        if config.generator == "label":
            check_labels(batch["label"], config.output_dim)
            continue
        deltas, residual = delta_targets(batch, config)
        if residual is not None:
            residuals.append(residual)
        log_rho.append(delta_scale(deltas, config.delta_normalization).double().log())
    log_rho = torch.cat(log_rho) if log_rho else torch.zeros(0, dtype=torch.float64)
    bad = int((~torch.isfinite(log_rho)).sum())
    if bad:
        raise ValueError(
            f"{bad} of {len(dataset)} deltas have a zero or non-finite scale ρ ({config.delta_normalization}): they cannot be "
            "normalised. Drop them, e.g. dataset.filter(lambda row: row['rho'] > 0)."
        )
    if residuals and float(torch.cat(residuals).mean()) > MAX_FACTOR_RESIDUAL:
        raise ValueError(
            f"The deltas are not rank-1 with factor_rule={config.factor_rule!r} (mean relative residual "
            f"{float(torch.cat(residuals).mean()):.3f} > {MAX_FACTOR_RESIDUAL}): a factorised hypernetwork cannot "
            "represent them. Use delta_mode='full', or the factor_rule matching the harvest optimizer (Adam: 'sign', SGD: 'input')."
        )
    return log_rho, {component: torch.cat(chunks) for component, chunks in values.items()}


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Refuse labels outside ``[0, num_classes)`` (a ``"label"`` generator learns a distribution over them)."""
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"The delta dataset holds labels in [{int(labels.min())}, {int(labels.max())}] but the backbone has "
            f"{num_classes} classes: a 'label' generator needs class indices in [0, {num_classes})."
        )


def set_log_rho_statistics(config: OCDConfig, log_rho: torch.Tensor) -> None:
    """Store the mean and (floored) std of the training deltas' ``log ρ`` in ``config``."""
    config.log_rho_mean = float(log_rho.mean())
    spread = float(log_rho.std(unbiased=False)) if log_rho.numel() > 1 else 0.0
    config.log_rho_std = max(spread, MIN_LOG_RHO_STD)


# ----- the training objective ----------------------------------------------------------------------


class HypernetworkLoss(nn.Module):
    """Per-sample generator and scale losses of the hypernetwork: the module Accelerate prepares (DDP wraps).

    The generator loss is the denoising loss below (``generator="diffusion"``), the MSE of the
    predicted normalised delta (``"regression"``), or the cross-entropy of ``q(y | I(x))`` against the
    harvested label (``"label"``, whose scale loss is zero: it has no scale net). It is logged as
    ``denoise_loss`` / ``val_denoise_loss`` whatever the generator.

    For a batch of raw deltas it draws noise and uniform timesteps from ``generator``, noises the
    denoiser targets with the diffusion scheduler's ``add_noise`` and returns the epsilon-prediction
    MSE and the scale loss, both ``(batch,)``. The denoiser and the scale net share the condition
    embedding and are trained jointly.

    In full mode the MSE covers the whole padded canvas, padding included: the pad is always zero
    in the data, and training on it teaches the UNet to keep it at zero while sampling, so the
    border of the real matrix sees the same surroundings when sampling as in training (masked out,
    the pad would be free to drift into values that the convolutions carry into the matrix).
    """

    def __init__(self, hypernetwork: OCDHypernetwork, scale_loss: str = "log_mse") -> None:
        super().__init__()
        if scale_loss not in SCALE_LOSSES:
            raise ValueError(f"scale_loss must be one of {SCALE_LOSSES}, got {scale_loss!r}.")
        self.hypernetwork = hypernetwork
        self.scale_loss = scale_loss
        self.scheduler = hypernetwork.make_scheduler()

    def forward(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.hypernetwork.config
        embedding = self.hypernetwork.embed_condition({c: batch[CONDITION_COLUMNS[c][0]].float() for c in config.condition_components})
        if config.generator == "label":
            logits = self.hypernetwork.label_logits(embedding).float()
            loss = F.cross_entropy(logits, batch["label"].long(), reduction="none")
            return loss, torch.zeros_like(loss)
        clean, rho = denoiser_targets(self.hypernetwork, batch)
        if config.generator == "regression":
            generator_loss = (self.hypernetwork.regress(embedding).float() - clean).pow(2).flatten(1).mean(1)
        else:
            noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
            timesteps = torch.randint(
                0, self.scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator, device=generator.device
            ).to(clean.device)
            noisy = self.scheduler.add_noise(clean, noise, timesteps)
            noise_pred = self.hypernetwork.denoise(noisy, timesteps, embedding)
            generator_loss = (noise_pred.float() - noise).pow(2).flatten(1).mean(1)
        standardised = self.hypernetwork.scale_net(embedding).squeeze(-1).float()
        if self.scale_loss == "log_mse":
            scale = (standardised - (rho.log() - config.log_rho_mean) / config.log_rho_std).pow(2)
        else:
            rho_pred = torch.exp(config.log_rho_mean + config.log_rho_std * standardised)
            scale = 10.0 * torch.log10((rho_pred - rho).pow(2) / rho.pow(2) + DB_EPSILON)
        return generator_loss, scale


# ----- settings and loop state ---------------------------------------------------------------------


@dataclass
class TrainingArguments:
    """Hyperparameters of :func:`train_hypernetwork` (see its docstring), validated on creation."""

    num_steps: int | None = None
    num_epochs: int | None = None
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    gradient_accumulation_steps: int | None = None
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = 0.9999
    ema_power: float = 0.75
    scale_loss: str = "log_mse"
    scale_loss_weight: float = 1.0
    validation_fraction: float = 0.1
    logging_steps: int = 10
    validation_steps: int | None = None
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.scale_loss not in SCALE_LOSSES:
            raise ValueError(f"scale_loss must be one of {SCALE_LOSSES}, got {self.scale_loss!r}.")
        if self.num_steps is not None and self.num_epochs is not None:
            raise ValueError("Pass num_steps or num_epochs, not both.")
        positive = ("num_steps", "num_epochs", "batch_size", "gradient_accumulation_steps", "logging_steps", "validation_steps",
                    "checkpointing_steps", "checkpoints_total_limit")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}.")


@dataclass
class TrainingState:
    """What a checkpoint stores besides Accelerate's state: the step, the history, the open logging window."""

    global_step: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    window_denoise: float = 0.0
    window_scale: float = 0.0
    window_batches: int = 0


# ----- checkpoints -----------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints written under ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | os.PathLike | None) -> Path | None:
    """The checkpoint directory to resume from: ``"latest"`` (``None`` if there is none yet) or an explicit path."""
    if resume_from_checkpoint is None:
        return None
    if str(resume_from_checkpoint) == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_NAME).is_file():
        raise ValueError(
            f"resume_from_checkpoint={str(path)!r} is not a checkpoint written by train_hypernetwork (no {TRAINING_STATE_NAME}); "
            f"pass 'latest' or a directory like {Path(output_dir) / CHECKPOINTS_DIR / (CHECKPOINT_PREFIX + '100')}."
        )
    return path


# ----- the training loop -----------------------------------------------------------------------------


def make_loader(dataset: Dataset, batch_size: int, seed: int | None) -> DataLoader:
    """A DataLoader over a torch-formatted dataset; shuffled with a per-epoch seed (``seed + epoch``) if ``seed`` is given."""
    sampler = SeedableRandomSampler(dataset, data_seed=seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


class HypernetworkTrainer:
    """The Accelerate training loop of one hypernetwork: AdamW, LR schedule, gradient accumulation and
    clipping, EMA, periodic logging and validation, and checkpoints that resume exactly.

    Exact resumption: Accelerate's checkpoint restores the weights, optimizer, LR schedule and RNGs;
    the trainer adds the loop state (JSON), the EMA weights and each process's noise generator
    (safetensors), and skips the batches of the current epoch already seen (the data order is
    ``seed + epoch``).
    """

    def __init__(
        self,
        hypernetwork: OCDHypernetwork,
        train_set: Dataset,
        validation_set: Dataset | None,
        args: TrainingArguments,
        accelerator: Accelerator,
        output_dir: str | os.PathLike,
    ) -> None:
        self.hypernetwork = hypernetwork
        self.args = args
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.accumulation = accelerator.gradient_accumulation_steps
        batches_per_epoch = math.ceil(len(train_set) / (args.batch_size * accelerator.num_processes))
        steps_per_epoch = math.ceil(batches_per_epoch / self.accumulation)
        self.total_steps = args.num_steps if args.num_steps is not None else steps_per_epoch * (args.num_epochs or 10)
        optimizer = torch.optim.AdamW(hypernetwork.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        # Accelerate steps a prepared scheduler once per process per optimizer step.
        schedule = get_scheduler(
            args.lr_scheduler,
            optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.total_steps * accelerator.num_processes,
        )
        loaders = [make_loader(train_set, args.batch_size, args.seed)]
        if validation_set is not None:
            loaders.append(make_loader(validation_set, args.batch_size, None))
        prepared = accelerator.prepare(HypernetworkLoss(hypernetwork, args.scale_loss), optimizer, schedule, *loaders)
        self.loss, self.optimizer, self.schedule, self.train_loader = prepared[:4]
        self.validation_loader = prepared[4] if validation_set is not None else None
        self.steps_per_epoch = math.ceil(len(self.train_loader) / self.accumulation)
        self.parameters = list(hypernetwork.parameters())
        self.ema = None
        if args.ema_decay is not None:
            self.ema = EMAModel(self.parameters, decay=args.ema_decay, use_ema_warmup=True, power=args.ema_power)
        self.generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)
        self.state = TrainingState()

    def train(self, resume_from_checkpoint: str | os.PathLike | None = None) -> TrainingState:
        """Run (or resume) training to ``total_steps``; the hypernetwork ends with the EMA weights, in eval mode."""
        checkpoint = resolve_checkpoint(self.output_dir, resume_from_checkpoint)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            logger.info(f"Resumed from {checkpoint} at step {self.state.global_step}", main_process_only=True)
        elif resume_from_checkpoint is not None:
            logger.info(f"No checkpoint under {self.output_dir}; training from scratch.", main_process_only=True)
        show = self.args.progress and self.accelerator.is_local_main_process
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc="Training", disable=not show)
        self.loss.train()
        epoch = self.state.global_step // self.steps_per_epoch
        while self.state.global_step < self.total_steps:
            for batch in self.epoch_batches(epoch):
                self.training_step(batch)
                if self.accelerator.sync_gradients:
                    self.after_optimizer_step(bar)
                    if self.state.global_step >= self.total_steps:
                        break
            epoch += 1
        bar.close()
        self.accelerator.wait_for_everyone()
        if self.ema is not None:
            self.ema.copy_to(self.parameters)
        self.hypernetwork.eval()
        return self.state

    def epoch_batches(self, epoch: int) -> DataLoader:
        """The batches of ``epoch`` not yet trained on (all of them, except in the epoch a run resumes in)."""
        self.train_loader.set_epoch(epoch)
        seen = (self.state.global_step - epoch * self.steps_per_epoch) * self.accumulation
        return self.accelerator.skip_first_batches(self.train_loader, seen) if seen else self.train_loader

    def training_step(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Forward and backward one batch; the optimizer steps when the accumulation window closes."""
        with self.accelerator.accumulate(self.loss):
            denoise, scale = self.loss(batch, self.generator)
            self.accelerator.backward(denoise.mean() + self.args.scale_loss_weight * scale.mean())
            if self.accelerator.sync_gradients and self.args.max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(self.loss.parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad()
        self.state.window_denoise += float(denoise.detach().mean())
        self.state.window_scale += float(scale.detach().mean())
        self.state.window_batches += 1

    def after_optimizer_step(self, bar: tqdm) -> None:
        """Count the step, update the EMA, and log, validate and checkpoint when due."""
        state, args = self.state, self.args
        state.global_step += 1
        bar.update(1)
        if self.ema is not None:
            self.ema.step(self.parameters)
        finished = state.global_step >= self.total_steps
        entry: dict[str, Any] = {}
        if state.global_step % args.logging_steps == 0 or finished:
            entry.update(self.close_window())
        if self.validation_loader is not None and (state.global_step % (args.validation_steps or args.logging_steps) == 0 or finished):
            entry.update(self.validate())
        if entry:
            entry = {"step": state.global_step, "epoch": round(state.global_step / self.steps_per_epoch, 4), **entry}
            state.log_history.append(entry)
            self.accelerator.log(entry, step=state.global_step)
            bar.set_postfix({key: f"{value:.4g}" for key, value in entry.items() if key.endswith("loss")})
        if args.checkpointing_steps is not None and state.global_step % args.checkpointing_steps == 0:
            self.save_checkpoint()

    def close_window(self) -> dict[str, float]:
        """Mean training losses over the batches since the last log (all processes), then reset."""
        state = self.state
        sums = torch.tensor([state.window_denoise, state.window_scale], device=self.accelerator.device)
        sums = self.accelerator.reduce(sums, "mean") / state.window_batches
        state.window_denoise, state.window_scale, state.window_batches = 0.0, 0.0, 0
        return {"denoise_loss": float(sums[0]), "scale_loss": float(sums[1]), "learning_rate": self.schedule.get_last_lr()[0]}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation losses of the EMA weights (those that are saved), with noise drawn from a fixed seed
        so that values compare across steps."""
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
        generator = torch.Generator(device=self.accelerator.device).manual_seed(self.args.seed + self.accelerator.process_index)
        self.loss.eval()
        denoise, scale = [], []
        for batch in self.validation_loader:
            batch_denoise, batch_scale = self.loss(batch, generator)
            denoise.append(self.accelerator.gather_for_metrics(batch_denoise))
            scale.append(self.accelerator.gather_for_metrics(batch_scale))
        self.loss.train()
        if self.ema is not None:
            self.ema.restore(self.parameters)
        return {"val_denoise_loss": float(torch.cat(denoise).mean()), "val_scale_loss": float(torch.cat(scale).mean())}

    def save_checkpoint(self) -> Path:
        """``accelerator.save_state`` to ``checkpoints/checkpoint-<step>`` plus the loop state, the EMA weights
        and each process's noise generator; keeps at most ``checkpoints_total_limit`` checkpoints."""
        accelerator, limit = self.accelerator, self.args.checkpoints_total_limit
        if accelerator.is_main_process and limit is not None:
            existing = list_checkpoints(self.output_dir)
            for old in existing[: max(0, len(existing) - limit + 1)]:
                shutil.rmtree(old)
        path = self.output_dir / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        accelerator.wait_for_everyone()
        accelerator.save_state(str(path))
        save_file({"state": self.generator.get_state()}, str(path / f"noise_generator_{accelerator.process_index}.safetensors"))
        if accelerator.is_main_process:
            ema_state = {}
            if self.ema is not None:
                shadow = {str(i): p.detach().cpu().contiguous() for i, p in enumerate(self.ema.shadow_params)}
                save_file(shadow, str(path / EMA_WEIGHTS_NAME))
                ema_state = {key: value for key, value in self.ema.state_dict().items() if key != "shadow_params"}
            (path / TRAINING_STATE_NAME).write_text(json.dumps({**asdict(self.state), "ema": ema_state}, indent=2))
        accelerator.wait_for_everyone()
        logger.info(f"Saved checkpoint {path}", main_process_only=True)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Inverse of :meth:`save_checkpoint`."""
        accelerator = self.accelerator
        generator_file = path / f"noise_generator_{accelerator.process_index}.safetensors"
        if not generator_file.is_file():
            raise ValueError(
                f"Checkpoint {path} has no noise generator for process {accelerator.process_index}: it was written by fewer "
                "processes. Resume with the number of processes that wrote it."
            )
        if self.ema is not None and not (path / EMA_WEIGHTS_NAME).is_file():
            raise ValueError(f"Checkpoint {path} holds no EMA weights but ema_decay is set; resume with ema_decay=None.")
        accelerator.load_state(str(path))
        saved = json.loads((path / TRAINING_STATE_NAME).read_text())
        ema_state = saved.pop("ema")
        self.state = TrainingState(**saved)
        self.generator.set_state(load_file(str(generator_file))["state"])
        if self.ema is not None:
            shadow = load_file(str(path / EMA_WEIGHTS_NAME))
            self.ema.load_state_dict({**ema_state, "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
            self.ema.to(accelerator.device)

    def history(self, num_train: int, num_validation: int) -> dict[str, Any]:
        """The JSON written to ``training_history.json``."""
        return {
            "global_step": self.state.global_step,
            "num_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "num_train_deltas": num_train,
            "num_validation_deltas": num_validation,
            "num_processes": self.accelerator.num_processes,
            "total_batch_size": self.args.batch_size * self.accelerator.num_processes * self.accumulation,
            "settings": {**asdict(self.args), "gradient_accumulation_steps": self.accumulation},
            "log_history": self.state.log_history,
        }


def train_hypernetwork(
    deltas: str | os.PathLike | tuple[Dataset, Mapping[str, Any]],
    backbone: nn.Module,
    output_dir: str | os.PathLike,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    num_steps: int | None = None,
    num_epochs: int | None = None,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 0,
    gradient_accumulation_steps: int | None = None,
    max_grad_norm: float | None = 1.0,
    ema_decay: float | None = 0.9999,
    ema_power: float = 0.75,
    scale_loss: str = "log_mse",
    scale_loss_weight: float = 1.0,
    validation_fraction: float = 0.1,
    logging_steps: int = 10,
    validation_steps: int | None = None,
    checkpointing_steps: int | None = None,
    checkpoints_total_limit: int | None = None,
    resume_from_checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> OCDWrapper:
    """Train an OCD hypernetwork for ``backbone`` on harvested deltas; save it to ``output_dir`` and return it.

    Args:
        deltas: a delta dataset directory (read with :func:`ocd_hf.deltas.load_deltas`) or a
            ``(datasets.Dataset, harvest metadata)`` pair, in full or factorised storage. Factorised
            storage trains a factorised hypernetwork directly on the stored factors; a full-mode
            hypernetwork on it expands each batch to ``u vᵀ`` (a ``batch × out × in`` tensor per batch).
        backbone: the model the deltas were harvested from (its target layer is checked, never trained).
        output_dir: receives ``config.json`` + ``model.safetensors`` (via ``save_pretrained``),
            ``training_history.json`` and ``checkpoints/checkpoint-<step>``.
        config_overrides: any of ``delta_mode``, ``generator``, ``label_combination``, ``factor_rule``, ``denoiser_config``,
            ``scheduler_config``, ``num_inference_steps``, ``condition_hidden_dim``,
            ``condition_components``, ``delta_normalization``. With ``delta_mode="factorised"``
            the factor rule defaults to the harvest optimizer's (Adam: ``"sign"``, SGD: ``"input"``).
        num_steps / num_epochs: length of training in optimizer steps or in passes over the
            training split (give at most one; default 10 epochs).
        batch_size: deltas per process and per forward; an optimizer step sees
            ``batch_size × processes × gradient_accumulation_steps`` deltas.
        learning_rate / weight_decay: AdamW (the paper: Adam, lr 1e-4).
        lr_scheduler / lr_warmup_steps: a ``diffusers.optimization.get_scheduler`` schedule.
        gradient_accumulation_steps: batches per optimizer step (default: the accelerator's, else 1).
        max_grad_norm: gradient clipping (``None`` disables it).
        ema_decay: upper bound of the EMA decay (``None`` disables EMA). The decay warms up as
            ``1 − (1 + step)^−ema_power``: the official constant 0.9999 averages over ~10 000 steps and
            would leave an EMA still dominated by the random initialisation in any CPU-sized run,
            whereas the warm-up averages over the last ~``step^ema_power`` steps (32 at step 100,
            180 at step 1 000), so the EMA is useful at every run length. The power 3/4 is
            diffusers' recommendation for runs shorter than a few hundred thousand steps.
        scale_loss: ``"log_mse"`` (default): MSE on the standardised ``log ρ`` the scale net predicts.
            ``"db"``: the paper's ``10·log10((ρ̂−ρ)²/ρ² + 1e-8)``, unbounded below and with a gradient
            ∝ 1/|ρ̂−ρ| that explodes once ρ̂ is close, which happens at once when ρ is nearly constant
            (Adam deltas: every element moves by ±lr); the log MSE is smooth and well scaled there.
        scale_loss_weight: weight of the scale loss added to the denoising loss.
        validation_fraction: share of the deltas held out; their denoising and scale losses are
            logged (with the EMA weights, i.e. the weights that are saved).
        logging_steps: log the mean training losses every so many optimizer steps.
        validation_steps: validate every so many steps (default: at every logging step) and at the end.
        checkpointing_steps: ``accelerator.save_state`` every so many steps (``None``: never).
        checkpoints_total_limit: keep at most this many checkpoints.
        resume_from_checkpoint: ``"latest"`` (the newest under ``output_dir``; starts afresh if none)
            or a checkpoint directory. The step count, data order, noise, optimizer, LR schedule and
            EMA continue exactly where they stopped.
        seed: seeds the initialisation, the data order, the noise and the validation split.
        accelerator: an ``Accelerator`` to use (default: a new one).
        progress: show progress bars (main process only).

    Returns:
        The trained :class:`OCDWrapper` (EMA weights in its hypernetwork), in eval mode.
    """
    args = TrainingArguments(
        num_steps=num_steps, num_epochs=num_epochs, batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
        lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps, gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=max_grad_norm, ema_decay=ema_decay, ema_power=ema_power, scale_loss=scale_loss,
        scale_loss_weight=scale_loss_weight, validation_fraction=validation_fraction, logging_steps=logging_steps,
        validation_steps=validation_steps, checkpointing_steps=checkpointing_steps,
        checkpoints_total_limit=checkpoints_total_limit, seed=seed, progress=progress,
    )
    dataset, metadata = resolve_deltas(deltas)
    config = build_config(metadata, config_overrides, dataset)
    check_deltas(dataset, config, backbone)
    dataset = select_training_columns(dataset, training_columns(config, stores_factors(dataset)))
    created_accelerator = accelerator is None
    if accelerator is None:
        accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps or 1)
    elif gradient_accumulation_steps is not None and gradient_accumulation_steps != accelerator.gradient_accumulation_steps:
        raise ValueError(
            f"gradient_accumulation_steps={gradient_accumulation_steps} differs from the accelerator's "
            f"({accelerator.gradient_accumulation_steps}); set it on the Accelerator or leave it unset."
        )
    show_progress = progress and accelerator.is_local_main_process

    train_set, validation_set = split_deltas(dataset, validation_fraction, seed)
    log_rho, condition_values = scan_deltas(train_set, config, progress=show_progress)
    if validation_set is not None:
        scan_deltas(validation_set, config, progress=show_progress)
    if config.generator != "label":
        set_log_rho_statistics(config, log_rho)
    set_seed(seed)
    wrapper = OCDWrapper(config, backbone)
    for component, encoder in wrapper.hypernetwork.encoders.items():
        encoder.set_statistics(condition_values[component].to(encoder.mean.device))

    trainer = HypernetworkTrainer(wrapper.hypernetwork, train_set, validation_set, args, accelerator, output_dir)
    num_validation = 0 if validation_set is None else len(validation_set)
    logger.info(
        f"Training on {len(train_set)} deltas ({num_validation} held out) for {trainer.total_steps} steps of "
        f"{batch_size * accelerator.num_processes * trainer.accumulation} deltas, delta_mode {config.delta_mode!r}",
        main_process_only=True,
    )
    trainer.train(resume_from_checkpoint)
    wrapper.eval()
    if accelerator.is_main_process:
        wrapper.save_pretrained(output_dir)
        history = trainer.history(len(train_set), num_validation)
        (Path(output_dir) / HISTORY_NAME).write_text(json.dumps(history, indent=2))
        logger.info(f"Saved the hypernetwork and {HISTORY_NAME} to {output_dir}", main_process_only=True)
    accelerator.wait_for_everyone()
    if created_accelerator:
        accelerator.end_training()
    return wrapper
