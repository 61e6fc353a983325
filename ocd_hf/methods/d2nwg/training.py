"""Train a D2NWG head generator on a zoo of heads in three stages (App. B), each on the shared
:class:`~ocd_hf.trainer.GeneratorTrainer` (AdamW, EMA, checkpoints that resume exactly):

1. ``vae`` — the weight VAE on the standardised tokens of every kept checkpoint (Eq. 1, ``paper`` or ``code`` loss;
   skipped with ``D2NWGConfig(use_vae=False)``, the paper's no-VAE ablation, whose "latents" are the standardised tokens);
2. ``alignment`` — the dataset encoder against the frozen VAE's latents (Eq. 2), one checkpoint per task per batch
   (``alignment_steps=0`` skips it);
3. ``diffusion`` — the latent denoiser on ``latent_scale ·`` VAE latents given the frozen encoder's code (Eq. 5), or
   with ``joint_encoder=True`` the encoder trained along (the paper's setting for its MLP encoder).

Each stage runs in ``output_dir/stages/<name>`` with its own Accelerator and checkpoints; a finished stage leaves
``component.safetensors`` and is skipped when the run is started again, an unfinished one resumes from its latest
checkpoint (``resume_from_checkpoint="latest"``).

The condition of every training item is its task's support grouped by class ``(N, K, d)``: the harvested one, or,
given the task distribution, ``K`` items per class re-drawn from the task's classes for every item (the authors'
"five image features per class", re-sampled).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn

from ...episodes import TaskDistribution
from ...modeling_utils import load_checked_state
from ...task_heads import resolve_head_dataset
from ...trainer import HISTORY_NAME, GeneratorTrainer, GeneratorTrainingArguments, prepare_accelerator, split_rows, training_arguments
from ...weight_vae import vae_losses
from .alignment import AlignmentHeads
from .configuration import D2NWGConfig
from .diffusion import diffusion_loss, make_scheduler
from .modeling import D2NWGHeadGenerator
from .modules import group_by_class

logger = get_logger(__name__)

TRAINING_COLUMNS = ["support", "support_labels", "targets", "classes"]
STAGES = ("vae", "alignment", "diffusion")
STAGES_DIR = "stages"
COMPONENT_NAME = "component.safetensors"
# D2NWGConfig fields that come from the zoo (or from training) and may not be overridden.
DATA_FIELDS = ("embedding_dim", "latent_scale", "encoder_id", "encoder_revision", "encoder_fingerprint", "harvest_config", "task_distribution")


@dataclass
class D2NWGTrainingArguments(GeneratorTrainingArguments):
    """The training loop's settings (``num_steps`` / ``num_epochs`` and ``learning_rate`` are the diffusion stage's)
    plus the steps and learning rates of the VAE and alignment stages."""

    vae_steps: int = field(default=1000, metadata={"help": "optimizer steps of the VAE stage"})
    vae_learning_rate: float = field(default=1e-3, metadata={"help": "the VAE's learning rate (the paper's 1e-3)"})
    alignment_steps: int = field(default=500, metadata={
        "help": "optimizer steps of the alignment stage (0 skips it: with joint_encoder, the paper's no-alignment ablation)"})
    alignment_learning_rate: float = field(default=1e-3, metadata={
        "help": "the dataset encoder's learning rate in the alignment stage (the paper: 1e-4 over far more steps)"})
    joint_encoder: bool = field(default=False, metadata={
        "help": "train the dataset encoder with the denoiser in the diffusion stage (the paper's setting for its MLP encoder)"})
    num_checkpoints: int | None = field(default=None, metadata={
        "help": "E, the last harvested checkpoints of each task kept in the zoo (default: all the harvest stored)"})
    num_tasks: int | None = field(default=None, metadata={
        "help": "train on the zoo's first num_tasks tasks only (the zoo-size ablation; default: every harvested task)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("vae_steps", "num_checkpoints", "num_tasks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if self.alignment_steps < 0:
            raise ValueError(f"alignment_steps must be >= 0 (0 skips the alignment stage), got {self.alignment_steps}.")
        if self.alignment_steps == 0 and not self.joint_encoder:
            raise ValueError("alignment_steps=0 would leave the dataset encoder untrained: set joint_encoder=True to train it with the denoiser.")

    def stage(self, name: str) -> GeneratorTrainingArguments:
        """The loop settings of stage ``name``."""
        if name == "diffusion":
            return GeneratorTrainingArguments(**{f: getattr(self, f) for f in GeneratorTrainingArguments.__dataclass_fields__})
        steps, rate = (self.vae_steps, self.vae_learning_rate) if name == "vae" else (self.alignment_steps, self.alignment_learning_rate)
        base = GeneratorTrainingArguments(**{f: getattr(self, f) for f in GeneratorTrainingArguments.__dataclass_fields__ if f != "num_epochs"})
        return replace(base, num_steps=steps, learning_rate=rate)


# ----- the condition of a training item --------------------------------------------------------------


class InMemoryRows(torch.utils.data.Dataset):
    """The zoo's training columns held as tensors, read from the head dataset once.

    ``datasets`` decodes its fixed-shape array columns (``Array2D``/``Array3D``) row by row on every batch: measured
    here, that was two thirds of a CPU training run. A zoo is small (2 000 5-way tasks of 384-d heads with 3
    checkpoints: ~60 MB), so it is read once and batches are slices of tensors."""

    def __init__(self, dataset: Dataset) -> None:
        self.columns = {name: torch.as_tensor(values) for name, values in dataset.with_format("torch")[:].items()}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: values[index] for name, values in self.columns.items()}

    def iter(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive batches of ``batch_size`` rows (``datasets.Dataset.iter``'s interface)."""
        for start in range(0, len(self), batch_size):
            yield {name: values[start : start + batch_size] for name, values in self.columns.items()}


class SupportResampler:
    """``K`` support embeddings per class drawn afresh (without replacement) from the items of each task's classes."""

    def __init__(self, distribution: TaskDistribution, column: str, k_shot: int) -> None:
        self.features = distribution.features(column)
        self.k_shot = k_shot
        sizes = torch.as_tensor(distribution.class_sizes, dtype=torch.long)
        if int(sizes.min()) < k_shot:
            raise ValueError(f"Re-sampling {k_shot} support items per class needs classes of >= {k_shot} items; the smallest has {int(sizes.min())}.")
        self.sizes = sizes
        self.rows = torch.zeros(len(sizes), int(sizes.max()), dtype=torch.long)
        for position, class_id in enumerate(distribution.classes):
            rows = torch.as_tensor(distribution.rows_of(int(class_id)), dtype=torch.long)
            self.rows[position, : len(rows)] = rows
        self.position = torch.full((int(distribution.classes.max()) + 1,), -1, dtype=torch.long)
        self.position[torch.as_tensor(distribution.classes)] = torch.arange(len(sizes))

    def __call__(self, classes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, N, K, d)`` for the class ids ``classes`` ``(B, N)``."""
        classes = classes.cpu().long()
        known = classes < len(self.position)
        position = torch.where(known, self.position[classes.clamp(max=len(self.position) - 1)], -1)
        if bool((position < 0).any()):
            raise ValueError(f"The zoo's tasks use classes {sorted(set(classes[position < 0].tolist()))} that the given distribution lacks; "
                             "pass the distribution the heads were harvested from.")
        sizes = self.sizes[position]
        keys = torch.rand(*classes.shape, self.rows.shape[1], generator=generator)
        keys = keys.masked_fill(torch.arange(self.rows.shape[1]) >= sizes.unsqueeze(-1), 2.0)
        picked = keys.argsort(-1)[..., : self.k_shot]
        return self.features[self.rows[position.unsqueeze(-1), picked]]


class Stage(nn.Module):
    """What every stage's loss module shares: the generator, which checkpoints form the zoo, and the condition."""

    def __init__(self, model: D2NWGHeadGenerator, checkpoint_index: list[int], resampler: SupportResampler | None) -> None:
        super().__init__()
        self.model, self.checkpoint_index, self.resampler = model, list(checkpoint_index), resampler

    def condition(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        """The class-grouped support ``(B, N, K, d)`` of a batch (re-drawn if a distribution was given)."""
        if self.resampler is not None:
            return self.resampler(batch["classes"], generator).to(batch["support"].device)
        num_classes = batch["targets"].shape[-2]
        return group_by_class(batch["support"].float(), batch["support_labels"].long(), num_classes)

    def one_checkpoint(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        """One zoo checkpoint per task, drawn uniformly: ``(B, N, d+1)``."""
        targets = batch["targets"][:, self.checkpoint_index].float()
        pick = torch.randint(0, targets.shape[1], (targets.shape[0],), generator=generator).to(targets.device)
        return targets[torch.arange(targets.shape[0], device=targets.device), pick]


class VAEStage(Stage):
    """Stage 1: the VAE's losses on every kept checkpoint of each task, averaged per task."""

    def forward(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        tokens = self.model.heads_to_tokens(batch["targets"][:, self.checkpoint_index].float())
        config = self.model.config
        return {name: value.mean(1) for name, value in vae_losses(self.model.vae, tokens, config.vae_loss, config.kl_weight, generator).items()}


class AlignmentStage(Stage):
    """Stage 2: the alignment loss of each task's dataset code with the frozen VAE latent of one of its checkpoints
    (row-aligned codes: each class token with its row's latent, every row of the batch a negative of the others)."""

    def __init__(self, model: D2NWGHeadGenerator, heads: AlignmentHeads, checkpoint_index: list[int], resampler: SupportResampler | None) -> None:
        super().__init__(model, checkpoint_index, resampler)
        self.heads = heads

    def forward(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        grouped = self.condition(batch, generator)
        with torch.no_grad():
            latents = self.model.encode_heads(self.one_checkpoint(batch, generator))  # (B, L, m)
        codes = self.heads.encoder(grouped)
        if codes.dim() == 3:
            losses = self.heads(codes.flatten(0, 1), latents.flatten(0, 1)).view(codes.shape[:2]).mean(1)
        else:
            losses = self.heads(codes, latents.flatten(1))
        return {"alignment": losses}


class DiffusionStage(Stage):
    """Stage 3: Eq. 5 on ``latent_scale ·`` the VAE latent of one checkpoint per task, given the dataset code (of the
    frozen encoder, or of the encoder trained along when ``joint``)."""

    def __init__(self, model: D2NWGHeadGenerator, checkpoint_index: list[int], resampler: SupportResampler | None, joint: bool = False) -> None:
        super().__init__(model, checkpoint_index, resampler)
        self.scheduler = make_scheduler(model.config.scheduler_config, "ddpm")
        self.joint = joint

    def forward(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        grouped = self.condition(batch, generator)
        with torch.no_grad():
            latents = self.model.encode_heads(self.one_checkpoint(batch, generator)) * self.model.config.latent_scale
        with torch.set_grad_enabled(self.joint and torch.is_grad_enabled()):
            code = self.model.encode_support(grouped)
        return {"denoise": diffusion_loss(lambda x, t: self.model.denoiser(x, t, code), latents, self.scheduler, generator)}


# ----- statistics of the zoo ---------------------------------------------------------------------------


@torch.no_grad()
def token_statistics(
    model: D2NWGHeadGenerator, dataset: Dataset | InMemoryRows, checkpoint_index: list[int], batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean and std of the zoo's tokens (over tasks and checkpoints, and over rows for ``"row"``);
    coordinates that never vary (padding) get std 1."""
    vectorizer, shape = model.config.vectorizer, model.config.statistics_shape
    total, squares, count = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64), 0
    for batch in dataset.iter(batch_size=batch_size):
        tokens = vectorizer.to_tokens(batch["targets"][:, checkpoint_index].double()).reshape(-1, *shape)
        total, squares, count = total + tokens.sum(0), squares + tokens.pow(2).sum(0), count + tokens.shape[0]
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), torch.where(std > 1e-8, std, torch.ones_like(std)).float()


@torch.no_grad()
def latent_std(model: D2NWGHeadGenerator, dataset: Dataset | InMemoryRows, checkpoint_index: list[int], batch_size: int = 256) -> float:
    """The std of the VAE posterior means of every kept checkpoint (LDM's ``1 / scale_factor``); without a VAE, of the standardised tokens."""
    total, squares, count = 0.0, 0.0, 0
    for batch in dataset.iter(batch_size=batch_size):
        latents = model.encode_heads(batch["targets"][:, checkpoint_index].float()).double()
        total, squares, count = total + float(latents.sum()), squares + float(latents.pow(2).sum()), count + latents.numel()
    return max((squares / count - (total / count) ** 2) ** 0.5, 1e-8)


# ----- the entry point -----------------------------------------------------------------------------------


def run_stage(
    name: str, trained: nn.Module, loss: nn.Module, train_set: InMemoryRows, validation_set: InMemoryRows | None, args: D2NWGTrainingArguments,
    output_dir: Path, resume_from_checkpoint: str | os.PathLike | None,
) -> dict[str, Any]:
    """Train ``trained`` (through ``loss``) for stage ``name``, or load it if the stage finished before; its history."""
    directory = output_dir / STAGES_DIR / name
    component, history_file = directory / COMPONENT_NAME, directory / HISTORY_NAME
    if resume_from_checkpoint is not None and component.is_file() and history_file.is_file():
        load_checked_state(trained, load_file(str(component)), component)
        logger.info(f"Stage {name!r} finished before: loaded {component}", main_process_only=True)
        return json.loads(history_file.read_text())
    stage_args = args.stage(name)
    accelerator, _ = prepare_accelerator(None, stage_args, directory, {**asdict(args), "stage": name})
    trainer = GeneratorTrainer(trained, loss, train_set, validation_set, stage_args, accelerator, directory)
    logger.info(f"D2NWG stage {name!r}: {trainer.total_steps} steps on {len(train_set)} tasks", main_process_only=True)
    trainer.train(resume_from_checkpoint)
    history = trainer.history(len(train_set), 0 if validation_set is None else len(validation_set), "tasks")
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({key: value.detach().cpu().contiguous() for key, value in trained.state_dict().items()}, str(component))
        history_file.write_text(json.dumps(history, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return history


def train_d2nwg(
    head_dataset: str | os.PathLike | tuple[Dataset, Mapping[str, Any]],
    output_dir: str | os.PathLike,
    args: D2NWGTrainingArguments | None = None,
    *,
    distribution: TaskDistribution | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    resume_from_checkpoint: str | os.PathLike | None = None,
    **training_kwargs: Any,
) -> D2NWGHeadGenerator:
    """Train a :class:`~ocd_hf.methods.d2nwg.D2NWGHeadGenerator` on a zoo of heads; save it to ``output_dir`` and return it.

    Args:
        head_dataset: a directory made by :func:`~ocd_hf.task_heads.harvest_task_heads` (its ``targets`` are the
            zoo's checkpoints; ``target_spacing="last"`` keeps the last ones), or a ``(Dataset, metadata)`` pair.
        output_dir: receives the saved generator (``config.json``, ``model.safetensors``, ``model_index.json``, a folder
            per component, ``README.md``), ``training_history.json`` and ``stages/<vae|alignment|diffusion>/``
            (checkpoints, each finished stage's component).
        args: :class:`D2NWGTrainingArguments`, or its fields as keyword arguments (not both).
        distribution: the task distribution the zoo was harvested from: every training item's support is then
            re-drawn from its classes (default: the harvested support).
        config_overrides: :class:`~ocd_hf.methods.d2nwg.D2NWGConfig` fields (vectorisation, VAE, encoder, alignment,
            denoiser, schedule, sampler); the embedding size, the encoder and the statistics come from the data.
        resume_from_checkpoint: ``"latest"``: skip the finished stages and resume the current one from its latest checkpoint
            (``None``: train every stage from scratch).
    """
    args = training_arguments(D2NWGTrainingArguments, args, training_kwargs)
    if resume_from_checkpoint not in (None, "latest"):
        raise ValueError(
            f"resume_from_checkpoint must be None or 'latest' (each stage resumes from its own latest checkpoint), got {resume_from_checkpoint!r}."
        )
    refused = sorted(set(config_overrides or {}) & set(DATA_FIELDS))
    if refused:
        raise ValueError(f"config_overrides may not set {refused}: they come from the head dataset and from training.")
    dataset, metadata = resolve_head_dataset(head_dataset)
    missing = [column for column in TRAINING_COLUMNS if column not in dataset.column_names]
    if len(dataset) == 0 or missing:
        raise ValueError(f"The head dataset is empty or lacks the columns {missing} (it has {dataset.column_names}); make it with harvest_task_heads(...).")
    harvested = int(metadata["harvest_config"]["num_targets"])
    kept = args.num_checkpoints or harvested
    if kept > harvested:
        raise ValueError(f"num_checkpoints={kept} exceeds the {harvested} checkpoints per task the harvest stored; harvest with num_targets >= {kept}.")
    checkpoint_index = list(range(harvested - kept, harvested))
    if args.num_tasks is not None:
        if args.num_tasks > len(dataset):
            raise ValueError(f"num_tasks={args.num_tasks} exceeds the {len(dataset)} tasks of the zoo; harvest num_tasks >= {args.num_tasks} "
                             "or train on fewer.")
        dataset = dataset.select(range(args.num_tasks))
    train_set, validation_set = split_rows(dataset.select_columns(TRAINING_COLUMNS), args.validation_fraction, args.seed, item_name="task")
    train_set = InMemoryRows(train_set)
    validation_set = None if validation_set is None else InMemoryRows(validation_set)
    encoder = metadata.get("encoder") or {}
    settings = {"max_num_classes": metadata["n_way"], "max_shots": metadata["k_shot"], **dict(config_overrides or {})}
    config = D2NWGConfig(
        embedding_dim=metadata["embedding_dim"], encoder_id=encoder.get("id"), encoder_revision=encoder.get("revision"),
        encoder_fingerprint=encoder.get("fingerprint"),
        harvest_config={**metadata["harvest_config"], "n_way": metadata["n_way"], "k_shot": metadata["k_shot"], "num_checkpoints": kept,
                        **({} if args.num_tasks is None else {"num_tasks_trained": args.num_tasks})},
        task_distribution=metadata.get("source"), **settings,
    )
    set_seed(args.seed)
    model = D2NWGHeadGenerator(config)
    # A row-aligned code is aligned row by row; a pooled code with the whole latent (all its tokens).
    tokens = 1 if config.encoder_type == "row_aligned" else config.vectorizer.num_tokens(config.max_num_classes)
    alignment = AlignmentHeads(model.dataset_encoder, config.encoder_config["code_size"], config.latent_size * tokens,
                               config.projection_size, config.alignment_loss)
    resampler = None if distribution is None else SupportResampler(distribution, (metadata.get("source") or {}).get("column", "embedding"), metadata["k_shot"])
    output_dir = Path(output_dir)
    mean, std = token_statistics(model, train_set, checkpoint_index)
    model.weight_mean.copy_(mean)
    model.weight_std.copy_(std)
    stages = {}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    diffusion = nn.ModuleDict({"denoiser": model.denoiser, "dataset_encoder": model.dataset_encoder}) if args.joint_encoder else model.denoiser
    for name in STAGES:
        if name == "vae" and not config.use_vae:
            config.latent_scale = 1.0 / latent_std(model, train_set, checkpoint_index)  # the tokens' std (about 1: they are standardised)
            continue
        if name == "alignment" and args.alignment_steps == 0:
            continue
        trained = {"vae": model.vae, "alignment": alignment, "diffusion": diffusion}[name]
        trained.requires_grad_(True)
        if name == "vae" and config.vae_loss == "paper":
            model.vae.logvar.requires_grad_(False)  # only the code loss uses it (an unused trainable parameter would stall DDP)
        if name == "vae":
            loss: nn.Module = VAEStage(model, checkpoint_index, resampler)
        elif name == "alignment":
            loss = AlignmentStage(model, alignment, checkpoint_index, resampler)
        else:
            loss = DiffusionStage(model, checkpoint_index, resampler, joint=args.joint_encoder)
        stages[name] = run_stage(name, trained, loss, train_set, validation_set, args, output_dir, resume_from_checkpoint)
        trained.requires_grad_(False)
        if name == "vae":
            model.eval()
            config.latent_scale = 1.0 / latent_std(model, train_set, checkpoint_index)
    model.requires_grad_(True)
    model.eval()
    state = PartialState()
    if state.is_main_process:
        model.save_pretrained(output_dir, model_card_kwargs={"training_config": asdict(args)})
        (output_dir / HISTORY_NAME).write_text(json.dumps({"settings": asdict(args), "stages": stages}, indent=2))
    state.wait_for_everyone()
    return model
