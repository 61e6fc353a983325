"""Train the OCD hypernetwork on a delta dataset with Accelerate: the denoiser (epsilon-prediction
MSE on normalised, zero-padded deltas) and the scale net jointly, with gradient accumulation,
clipping, EMA, a validation split, checkpoints that resume exactly, and DDP. In ``delta_mode="latent"``
a weight VAE is trained on the deltas' chunks first (its own run in ``output_dir/vae_stage``), then frozen,
and the denoiser learns its latents."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from datasets import Dataset
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ...atomic import write_json_atomically
from ...checks import check_writable_dir
from ...factorised import RULE_FOR_OPTIMIZER, expand_factors, factorise_deltas
from ...target import CONDITION_FIELDS, find_target_linear
from ...trainer import (
    CHECKPOINTS_DIR,
    HISTORY_NAME,
    TRAINING_STATE_NAME,
    GeneratorTrainer,
    GeneratorTrainingArguments,
    list_checkpoints,
    prepare_accelerator,
    split_rows,
    tracker_values,
    training_arguments,
)
from ...weight_vae import vae_losses
from .configuration import BACKBONE_FIELDS, OCDConfig
from .deltas import delta_storage, resolve_deltas, stored_factor_rule
from .hypernetwork import OCDHypernetwork, delta_scale
from .modeling import OCDWrapper
from .training_args import SCALE_LOSSES, OCDTrainingArguments

__all__ = ["CHECKPOINTS_DIR", "HISTORY_NAME", "TRAINING_STATE_NAME", "OCDTrainingArguments", "list_checkpoints", "train_hypernetwork"]

logger = get_logger(__name__)

REQUIRED_BACKBONE_FIELDS = ("target_module", "in_features", "out_features", "output_dim")
# The OCDConfig fields a training run may choose; the rest come from the harvest or from the data.
TRAINABLE_CONFIG_FIELDS = (
    "delta_mode",
    "generator_type",
    "label_combination",
    "factor_rule",
    "denoiser_config",
    "factor_denoiser_config",
    "vae_config",
    "latent_denoiser_config",
    "scheduler_class",
    "scheduler_config",
    "num_inference_steps",
    "condition_hidden_dim",
    "condition_components",
    "delta_normalization",
)
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
    implies, else ``"full"``: the harvest's own decision (``delta_mode_decision`` in ``harvest.json``, made
    once on every delta). For a harvest without one (older ocd-hf): measured here, factorised storage
    from every delta's ``factor_residual``, full storage on up to ``max_samples`` deltas."""
    decision = metadata.get("delta_mode_decision")
    if decision is not None:  # logged by the harvest; training logs the delta_mode it trains
        return decision["delta_mode"]
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
            "harvested from (write it with ocd_hf.harvest_deltas, or build it with OCDConfig.from_backbone(...).to_dict())."
        )
    overrides = dict(config_overrides or {})
    if "generator" in overrides:  # the name earlier releases used
        overrides["generator_type"] = overrides.pop("generator")
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
    return OCDConfig(**fields, harvest_config=harvest_config, **harvest_label_fields(metadata), **overrides)


def harvest_label_fields(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``id2label`` / ``label2id`` from the class names a classification harvest recorded (``source.label_names``:
    a ``ClassLabel``'s names, or the string labels it mapped), so the model knows what its classes are called and
    ``ocd-hf evaluate`` maps string labels as the harvest did; classes beyond the names keep ``LABEL_i``."""
    names = (metadata.get("source") or {}).get("label_names")
    output_dim = metadata.get("output_dim")
    if metadata.get("task") != "classification" or not names or not isinstance(output_dim, int) or len(names) > output_dim:
        return {}
    id2label = {index: (names[index] if index < len(names) else f"LABEL_{index}") for index in range(output_dim)}
    return {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}


def training_columns(config: OCDConfig, factors_stored: bool = False) -> list[str]:
    """The dataset columns training reads: the stored delta (or factor), the conditioning, and what
    converting between the two needs (the layer input; the factorisation residual of stored factors).
    A ``"label"`` generator reads the labels and the conditioning only."""
    conditioning = [CONDITION_FIELDS[c] for c in config.condition_components]
    if config.generator_type == "label":
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
            "'layer_output', 'model_output'; load it with ocd_hf.load_deltas."
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
    for component, size in config.condition_sizes.items():
        column = CONDITION_FIELDS[component]
        if column in first and first[column].shape != (size,):
            raise ValueError(
                f"Column {column!r} holds vectors of shape {tuple(first[column].shape)}, expected ({size},) "
                f"(the {component} size of the harvest metadata)."
            )
    name, layer = find_target_linear(backbone, config.target_module)
    if (layer.out_features, layer.in_features) != config.weight_shape:
        raise ValueError(
            f"The deltas were harvested from a layer of weight shape {config.weight_shape}, but the backbone's "
            f"{name!r} has shape ({layer.out_features}, {layer.in_features}). Train with the backbone the deltas were "
            f"harvested from ({config.base_model_name_or_path!r})."
        )


def split_deltas(dataset: Dataset, validation_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Carve a seeded random validation split off the deltas (``None`` when ``validation_fraction`` is 0)."""
    return split_rows(dataset, validation_fraction, seed, item_name="delta")


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
        batch_size = scan_batch_size(config)
    columns = {component: CONDITION_FIELDS[component] for component in config.condition_components}
    log_rho, residuals, values = [], [], {component: [] for component in columns}
    batches = dataset.iter(batch_size=batch_size)
    for batch in tqdm(batches, total=math.ceil(len(dataset) / batch_size), desc="Scanning deltas", disable=not progress, leave=False):
        for component, column in columns.items():
            values[component].append(batch[column].float())
        if config.generator_type == "label":
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


# The OCDConfig fields that only choose how to sample: they may change when a run resumes.
SAMPLING_FIELDS = ("scheduler_class", "num_inference_steps")


def resume_settings(config: OCDConfig) -> dict[str, Any]:
    """The config fields a resumed run must share with its checkpoint: those the run chose that decide what is trained,
    and the target layer."""
    names = [name for name in TRAINABLE_CONFIG_FIELDS if name not in SAMPLING_FIELDS] + ["target_module", "base_layer_fingerprint"]
    return {name: getattr(config, name) for name in names}


# The OCDConfig fields a tracker records next to the training settings, so that runs compare by them.
TRACKED_CONFIG_FIELDS = ("target_module", "delta_mode", "generator_type", "scheduler_class", "num_inference_steps", "condition_components")


def tracker_config(args: GeneratorTrainingArguments, config: OCDConfig | None = None) -> dict[str, Any]:
    """The training settings (and the main choices of ``config``) as trackers accept them (scalars and strings only)."""
    settings = dict(vars(args))
    if config is not None:
        settings.update({name: getattr(config, name) for name in TRACKED_CONFIG_FIELDS})
    return tracker_values(settings)


# ----- delta_mode="latent": the weight VAE ---------------------------------------------------------------

VAE_STAGE_DIR = "vae_stage"


def normalised_deltas(batch: Mapping[str, torch.Tensor], config: OCDConfig) -> torch.Tensor:
    """A batch's raw deltas divided by their scale ``ρ``: ``(batch, out, in)``."""
    deltas, _ = delta_targets(batch, config)
    rho = delta_scale(deltas, config.delta_normalization)
    return deltas / rho.view(-1, 1, 1)


def scan_batch_size(config: OCDConfig) -> int:
    """Rows per batch of a pass over the deltas: about :data:`SCAN_BATCH_ELEMENTS` matrix entries, at most 256."""
    return max(1, min(256, SCAN_BATCH_ELEMENTS // math.prod(config.weight_shape)))


@torch.no_grad()
def token_statistics(dataset: Dataset, config: OCDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean and std ``(num_chunks, chunk_size)`` of the normalised deltas' tokens; coordinates that never
    vary get std 1."""
    shape = (config.num_chunks, config.chunk_size)
    total, squares, count = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64), 0
    for batch in dataset.iter(batch_size=scan_batch_size(config)):
        tokens = normalised_deltas(batch, config).double().reshape(-1, *shape)
        total, squares, count = total + tokens.sum(0), squares + tokens.pow(2).sum(0), count + tokens.shape[0]
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), torch.where(std > 1e-8, std, torch.ones_like(std)).float()


@torch.no_grad()
def latent_std(dataset: Dataset, hypernetwork: OCDHypernetwork) -> float:
    """The std of the VAE posterior means of the training deltas (unscaled): ``1 / latent_scale``, LDM's ``scale_factor``."""
    total, squares, count = 0.0, 0.0, 0
    device = hypernetwork.token_mean.device
    for batch in dataset.iter(batch_size=scan_batch_size(hypernetwork.config)):
        latents = hypernetwork.vae.encode(hypernetwork.delta_tokens(normalised_deltas(batch, hypernetwork.config).to(device)))[0].double()
        total, squares, count = total + float(latents.sum()), squares + float(latents.pow(2).sum()), count + latents.numel()
    return max((squares / count - (total / count) ** 2) ** 0.5, 1e-8)


class VAELoss(nn.Module):
    """The weight VAE's losses (:func:`ocd_hf.weight_vae.vae_losses`, ``vae_config["vae_loss"]``) on the standardised
    tokens of a batch's normalised deltas: the first stage of ``delta_mode="latent"``."""

    def __init__(self, hypernetwork: OCDHypernetwork) -> None:
        super().__init__()
        self.hypernetwork = hypernetwork

    def forward(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        config = self.hypernetwork.config
        tokens = self.hypernetwork.delta_tokens(normalised_deltas(batch, config))
        return vae_losses(self.hypernetwork.vae, tokens, config.vae_config["vae_loss"], config.vae_config["kl_weight"], generator)


def train_weight_vae(
    hypernetwork: OCDHypernetwork, train_set: Dataset, validation_set: Dataset | None, args: OCDTrainingArguments,
    accelerator: Accelerator, output_dir: str | os.PathLike, resume_from_checkpoint: str | os.PathLike | None,
) -> dict[str, Any]:
    """Stage 1 of ``delta_mode="latent"``: standardise the tokens, train the VAE for ``args.vae_steps`` (its own
    checkpoints in ``output_dir/vae_stage``), freeze it and set ``config.latent_scale``; returns the stage's history."""
    mean, std = token_statistics(train_set, hypernetwork.config)
    hypernetwork.token_mean.copy_(mean)
    hypernetwork.token_std.copy_(std)
    fields = {name: getattr(args, name) for name in GeneratorTrainingArguments.__dataclass_fields__ if name != "num_epochs"}
    stage_args = replace(GeneratorTrainingArguments(**fields), num_steps=args.vae_steps, learning_rate=args.vae_learning_rate)
    stage_dir = Path(output_dir) / VAE_STAGE_DIR
    trainer = GeneratorTrainer(hypernetwork.vae, VAELoss(hypernetwork), train_set, validation_set, stage_args, accelerator, stage_dir)
    logger.info(f"Training the weight VAE on {len(train_set)} deltas for {trainer.total_steps} steps", main_process_only=True)
    trainer.train(resume_from_checkpoint)
    hypernetwork.vae.eval().requires_grad_(False)
    hypernetwork.config.latent_scale = 1.0 / latent_std(train_set, hypernetwork)
    return trainer.history(len(train_set), 0 if validation_set is None else len(validation_set), item_name="deltas")


# ----- the training objective ----------------------------------------------------------------------


class HypernetworkLoss(nn.Module):
    """Per-sample generator and scale losses of the hypernetwork: the module Accelerate prepares (DDP wraps).

    The generator loss is the denoising loss below (``generator="diffusion"``), the MSE of the
    predicted normalised delta (``"regression"``), or the cross-entropy of ``q(y | I(x))`` against the
    harvested label (``"label"``, whose scale loss is zero: it has no scale net). It is logged as
    ``denoise_loss`` / ``val_denoise_loss`` whatever the generator.

    For a batch of raw deltas it draws noise and uniform timesteps from ``generator``, noises the
    denoiser targets with DDPM's ``add_noise`` (the forward process every sampling scheduler
    assumes, :meth:`OCDHypernetwork.make_training_scheduler`) and returns the epsilon-prediction
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
        self.scheduler = hypernetwork.make_training_scheduler()

    def forward(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        config = self.hypernetwork.config
        embedding = self.hypernetwork.embed_condition({c: batch[CONDITION_FIELDS[c]].float() for c in config.condition_components})
        if config.generator_type == "label":
            logits = self.hypernetwork.label_logits(embedding).float()
            loss = F.cross_entropy(logits, batch["label"].long(), reduction="none")
            return {"denoise": loss, "scale": torch.zeros_like(loss)}
        clean, rho = denoiser_targets(self.hypernetwork, batch)
        if config.generator_type == "regression":
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
        return {"denoise": generator_loss, "scale": scale}


def train_hypernetwork(
    deltas: str | os.PathLike | tuple[Dataset, Mapping[str, Any]],
    backbone: nn.Module,
    output_dir: str | os.PathLike,
    args: OCDTrainingArguments | None = None,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    resume_from_checkpoint: str | os.PathLike | None = None,
    accelerator: Accelerator | None = None,
    **training_kwargs: Any,
) -> OCDWrapper:
    """Train an OCD hypernetwork for ``backbone`` on harvested deltas; save it to ``output_dir`` and return it.

    Args:
        deltas: a delta dataset directory (read with :func:`ocd_hf.load_deltas`) or a
            ``(datasets.Dataset, harvest metadata)`` pair, in full or factorised storage. Factorised
            storage trains a factorised hypernetwork directly on the stored factors; a full-mode
            hypernetwork on it expands each batch to ``u vᵀ`` (a ``batch × out × in`` tensor per batch).
        backbone: the model the deltas were harvested from (its target layer is checked, never trained).
        output_dir: receives ``config.json`` + ``model.safetensors`` (via ``save_pretrained``),
            ``training_history.json`` and ``checkpoints/checkpoint-<step>``.
        args: the training settings (:class:`OCDTrainingArguments`: steps, batch size, optimizer,
            EMA, validation, checkpoints, trackers, scale loss). Or pass its fields as keyword
            arguments (``num_steps=300, batch_size=16``); not both.
        config_overrides: any of ``delta_mode``, ``generator_type``, ``label_combination``, ``factor_rule``, ``denoiser_config``,
            ``scheduler_class`` (the sampler, e.g. ``"DPMSolverMultistepScheduler"``), ``scheduler_config``, ``num_inference_steps``, ``condition_hidden_dim``,
            ``condition_components``, ``delta_normalization``. With ``delta_mode="factorised"``
            the factor rule defaults to the harvest optimizer's (Adam: ``"sign"``, SGD: ``"input"``).
        resume_from_checkpoint: ``"latest"`` (the newest under ``output_dir``; starts afresh if none)
            or a checkpoint directory. The step count, data order, noise, optimizer, LR schedule and
            EMA continue exactly where they stopped.
        accelerator: an ``Accelerator`` to use (default: a new one, logging to ``args.report_to``).

    Returns:
        The trained :class:`OCDWrapper` (EMA weights in its hypernetwork), in eval mode.
    """
    args = training_arguments(OCDTrainingArguments, args, training_kwargs)
    check_writable_dir(output_dir)
    seed, progress = args.seed, args.progress
    dataset, metadata = resolve_deltas(deltas)
    config = build_config(metadata, config_overrides, dataset)
    check_deltas(dataset, config, backbone)
    dataset = select_training_columns(dataset, training_columns(config, stores_factors(dataset)))
    accelerator, created_accelerator = prepare_accelerator(accelerator, args, output_dir, tracker_config(args, config))
    show_progress = progress and accelerator.is_local_main_process
    train_set, validation_set = split_deltas(dataset, args.validation_fraction, seed)
    log_rho, condition_values = scan_deltas(train_set, config, progress=show_progress)
    if validation_set is not None:
        scan_deltas(validation_set, config, progress=show_progress)
    if config.generator_type != "label":
        set_log_rho_statistics(config, log_rho)
    set_seed(seed)
    wrapper = OCDWrapper(config, backbone)
    for component, encoder in wrapper.hypernetwork.encoders.items():
        encoder.set_statistics(condition_values[component].to(encoder.mean.device))

    vae_history = None
    if config.delta_mode == "latent":
        vae_history = train_weight_vae(wrapper.hypernetwork, train_set, validation_set, args, accelerator, output_dir, resume_from_checkpoint)
    loss_module = HypernetworkLoss(wrapper.hypernetwork, args.scale_loss)
    trainer = GeneratorTrainer(
        wrapper.hypernetwork, loss_module, train_set, validation_set, args, accelerator, output_dir,
        loss_weights={"scale": args.scale_loss_weight}, generator_settings=resume_settings(config),
    )
    num_validation = 0 if validation_set is None else len(validation_set)
    logger.info(
        f"Training on {len(train_set)} deltas ({num_validation} held out) for {trainer.total_steps} steps of "
        f"{args.batch_size * accelerator.num_processes * trainer.accumulation} deltas, delta_mode {config.delta_mode!r}",
        main_process_only=True,
    )
    trainer.train(resume_from_checkpoint)
    wrapper.eval()
    if accelerator.is_main_process:
        wrapper.save_pretrained(output_dir)
        history = trainer.history(len(train_set), num_validation, item_name="deltas")
        if vae_history is not None:
            history["vae_stage"] = vae_history
        write_json_atomically(Path(output_dir) / HISTORY_NAME, history)
        logger.info(f"Saved the hypernetwork and {HISTORY_NAME} to {output_dir}", main_process_only=True)
    accelerator.wait_for_everyone()
    if created_accelerator:
        accelerator.end_training()
    return wrapper
