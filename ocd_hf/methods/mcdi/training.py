"""Train a Mc-Di head generator on a head dataset: single-level (the shared
:class:`~ocd_hf.trainer.GeneratorTrainer` minimising the per-task diffusion loss) or bi-level with
REPTILE (the paper's Alg. 2), both resuming exactly from their checkpoints."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from datasets import Dataset
from diffusers.training_utils import EMAModel
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from ...atomic import write_json_atomically
from ...checks import check_number, check_writable_dir
from ...task_heads import resolve_head_dataset
from ...trainer import (
    HISTORY_NAME,
    BestWeights,
    GeneratorTrainer,
    GeneratorTrainingArguments,
    TrainingState,
    check_resume_settings,
    load_loop_state,
    prepare_accelerator,
    resolve_checkpoint,
    run_settings,
    save_checkpoint_atomically,
    save_loop_state,
    saved_weights,
    split_rows,
    training_arguments,
)
from .configuration import McDiConfig
from .diffusion import LOSS_TYPES, draw_states, local_consistency_loss, loss_boundaries
from .modeling import McDiHeadGenerator, denoise_heads
from .modules import class_prototypes

logger = get_logger(__name__)

TRAINING_COLUMNS = ["support", "support_labels", "targets"]
META_OPTIMIZERS = ("sgd", "adam")
# The McDiConfig fields a training run may set besides what the data and the arguments decide.
TRAINABLE_CONFIG_FIELDS = ("denoiser_config", "scheduler_config", "max_num_classes")


@dataclass
class McDiTrainingArguments(GeneratorTrainingArguments):
    """The training loop's settings plus Mc-Di's loss and REPTILE (see :func:`train_head_generator`).

    Single-level training uses ``batch_size``, ``learning_rate`` (AdamW), the LR schedule, gradient
    accumulation and clipping. REPTILE uses ``meta_batch_size`` tasks per meta step (``num_steps`` /
    ``num_epochs`` count meta steps), ``inner_steps`` Adam steps at ``inner_lr`` per task and the outer
    ``meta_optimizer`` at ``meta_lr``; both use the EMA, validation, logging and checkpoint settings.
    """

    loss_type: str = field(default="mcdi", metadata={
        "help": "mcdi: local consistency through the local targets; mvdi: vanilla loss on θ_M only; twdi: vanilla loss on "
        "every local target (the paper's naive variant)", "choices": list(LOSS_TYPES)})
    num_targets: int | None = field(default=None, metadata={
        "help": "local targets k per trajectory (default: the harvest's; must divide it and the diffusion steps; mvdi uses 1)"})
    reptile: bool = field(default=False, metadata={"help": "meta-train with REPTILE (Alg. 2) instead of single-level training"})
    inner_lr: float = field(default=0.005, metadata={"help": "REPTILE: Adam learning rate of each task's inner loop"})
    meta_lr: float = field(default=0.001, metadata={"help": "REPTILE: outer step size ζ"})
    inner_steps: int = field(default=3, metadata={"help": "REPTILE: inner Adam steps per task"})
    meta_batch_size: int = field(default=8, metadata={"help": "REPTILE: tasks per meta step (their inner loops run vectorised)"})
    meta_optimizer: str = field(default="adam", metadata={
        "help": "REPTILE's outer update: adam, Adam at lr ζ with −mean(φ_i − φ) as the gradient (as many REPTILE implementations "
        "do); sgd, Alg. 2's literal φ ← φ + ζ·mean(φ_i − φ), which with the paper's ζ = 0.001 moves φ by ~1e-5 per step and "
        "did not learn at all in 300 meta steps where adam did (tests' synthetic tasks); use sgd with ζ near 1",
        "choices": list(META_OPTIMIZERS)})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if self.loss_type == "mvdi" and self.num_targets not in (None, 1):
            raise ValueError(f"loss_type='mvdi' uses θ_M alone: leave num_targets unset (or 1), got {self.num_targets}.")
        if self.meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(f"meta_optimizer must be one of {META_OPTIMIZERS}, got {self.meta_optimizer!r}.")
        check_number("inner_lr", self.inner_lr, positive=True, fix="e.g. inner_lr=0.005")
        check_number("meta_lr", self.meta_lr, positive=True, fix="e.g. meta_lr=0.001")
        for name in ("num_targets", "inner_steps", "meta_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if self.reptile and (self.gradient_accumulation_steps or 1) != 1:
            raise ValueError("REPTILE averages meta_batch_size tasks per meta step; leave gradient_accumulation_steps unset.")


# ----- the loss ---------------------------------------------------------------------------------------


class HeadDiffusionLoss(nn.Module):
    """Per-task diffusion loss of a head generator (the module Accelerate prepares): ``{"denoise": (B,)}``.

    A batch of the head dataset gives each task's class prototypes (from ``support``/``support_labels``)
    and its local targets ``targets[:, target_index]`` in units of ``config.head_scale``; states and
    noise are drawn from the trainer's generator and :func:`~ocd_hf.methods.mcdi.diffusion.local_consistency_loss`
    (with the boundaries of ``config.loss_type``) gives the per-task loss.
    """

    def __init__(self, model: McDiHeadGenerator, target_index: list[int]) -> None:
        super().__init__()
        config = model.config
        self.model = model
        self.target_index = list(target_index)
        boundaries = loss_boundaries(config.loss_type, config.num_timesteps, config.num_targets)
        self.register_buffer("boundaries", torch.tensor(boundaries), persistent=False)

    def prepare(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Class prototypes ``(B, N, d)`` and normalised targets ``(B, k, N, d+1)`` of a batch of tasks."""
        targets = batch["targets"][:, self.target_index].float() / self.model.config.head_scale
        prototypes = class_prototypes(batch["support"].float(), batch["support_labels"], targets.shape[-2])
        return prototypes, targets

    def draw(self, targets: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """States ``(B, k)`` and noise like ``targets``."""
        states = draw_states(self.boundaries, self.model.config.num_timesteps, targets.shape[0], generator)
        noise = torch.randn(targets.shape, generator=generator, device=targets.device, dtype=targets.dtype)
        return states, noise

    def task_loss(self, denoiser: Any, prototypes: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The loss ``(B,)`` of ``denoiser`` (a module or a functional call of one)."""
        return local_consistency_loss(
            lambda x, s: denoise_heads(denoiser, x, s, prototypes), targets, noise, states, self.model.alpha_bar, self.boundaries
        )

    def forward(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        prototypes, targets = self.prepare(batch)
        states, noise = self.draw(targets, generator)
        return {"denoise": self.task_loss(self.model.denoiser, prototypes, targets, noise, states)}


# ----- REPTILE ------------------------------------------------------------------------------------------


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``seed`` and ``keys`` (every meta step draws from its own generator: exact resume needs no RNG state)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class ReptileTrainer:
    """REPTILE (Alg. 2) over a head generator's denoiser, its inner loops vectorised over the meta-batch.

    Meta step ``m``: tasks ``m·B .. (m+1)·B`` of epoch ``e``'s order (a permutation seeded by ``seed + e``);
    ``φ_b ← φ`` for each; ``inner_steps`` Adam steps at ``inner_lr`` on task ``b``'s loss (fresh states
    and noise each step); then an Adam step at ``ζ`` with ``−mean_b(φ_b − φ)`` as the gradient
    (``meta_optimizer="adam"``) or Alg. 2's ``φ ← φ + ζ · mean_b(φ_b − φ)`` (``"sgd"``). The ``B`` copies ``φ_b`` are stacked
    ``(B, *shape)`` and the loss is ``vmap(functional_call)`` over them; their losses are summed, so
    each copy's gradient is its own task's and one element-wise Adam over the stack is ``B`` independent
    Adams. Every meta step draws from a generator seeded by ``(seed, m)``: a checkpoint (φ, the outer
    optimizer, the EMA, the loop state) resumes exactly.
    """

    def __init__(
        self, model: McDiHeadGenerator, loss: HeadDiffusionLoss, train_set: Dataset, validation_set: Dataset | None,
        args: McDiTrainingArguments, accelerator: Accelerator, output_dir: str | os.PathLike,
        generator_settings: Mapping[str, Any] | None = None,
    ) -> None:
        if accelerator.num_processes > 1:
            raise ValueError("REPTILE training runs in one process; launch it without --num_processes, or set reptile=False.")
        if len(train_set) < args.meta_batch_size:
            raise ValueError(f"meta_batch_size={args.meta_batch_size} exceeds the {len(train_set)} training tasks; lower it or harvest more.")
        self.model, self.loss, self.args, self.accelerator = model, loss, args, accelerator
        self.train_set, self.validation_set = train_set, validation_set
        self.output_dir = Path(output_dir)
        self.steps_per_epoch = len(train_set) // args.meta_batch_size
        self.total_steps = args.num_steps if args.num_steps is not None else self.steps_per_epoch * (args.num_epochs or 10)
        self.parameters = list(model.denoiser.parameters())
        self.outer = torch.optim.Adam(self.parameters, lr=args.meta_lr) if args.meta_optimizer == "adam" else None
        prepared = accelerator.prepare(model.denoiser, *([self.outer] if self.outer is not None else []))
        self.outer = prepared[1] if self.outer is not None else None
        self.ema = EMAModel(self.parameters, decay=args.ema_decay, use_ema_warmup=True, power=args.ema_power) if args.ema_decay else None
        self.state = TrainingState()
        self.settings = run_settings(args, model.denoiser, generator_settings, len(train_set), len(validation_set or []))
        self.best = BestWeights(self.state, self.parameters, self.ema)
        self.saved_step = 0

    def task_indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        size = self.args.meta_batch_size
        return order[position * size : (position + 1) * size].tolist()

    def meta_step(self, step: int) -> float:
        """One meta step; returns the meta-batch's mean loss before adaptation."""
        generator = torch.Generator().manual_seed(step_seed(self.args.seed, step))
        prototypes, targets = self.loss.prepare(self.train_set[self.task_indices(step)])
        denoiser, size = self.model.denoiser, targets.shape[0]
        base = {name: parameter.detach() for name, parameter in denoiser.named_parameters()}
        copies = {name: value.unsqueeze(0).repeat(size, *([1] * value.dim())).requires_grad_(True) for name, value in base.items()}
        inner = torch.optim.Adam(copies.values(), lr=self.args.inner_lr)

        def one_task(params: dict[str, torch.Tensor], *task: torch.Tensor) -> torch.Tensor:
            def call(*inputs: torch.Tensor) -> torch.Tensor:
                return functional_call(denoiser, params, inputs)

            return self.loss.task_loss(call, *(value.unsqueeze(0) for value in task))[0]

        before = None
        for _ in range(self.args.inner_steps):
            states, noise = self.loss.draw(targets, generator)
            with torch.enable_grad():
                losses = vmap(one_task)(copies, prototypes, targets, noise, states)
                gradients = torch.autograd.grad(losses.sum(), list(copies.values()))
            before = losses.detach().mean() if before is None else before
            for copy, gradient in zip(copies.values(), gradients):
                copy.grad = gradient
            inner.step()
        with torch.no_grad():
            for name, parameter in denoiser.named_parameters():
                direction = (copies[name].detach() - base[name]).mean(0)
                if self.outer is None:
                    parameter.add_(direction, alpha=self.args.meta_lr)
                else:
                    parameter.grad = -direction
        if self.outer is not None:
            self.outer.step()
            self.outer.zero_grad()
        return float(before)

    def train(self, resume_from_checkpoint: str | os.PathLike | None = None) -> TrainingState:
        """Run (or resume) to ``total_steps`` meta steps; the model ends with the EMA weights, in eval mode."""
        checkpoint = resolve_checkpoint(self.output_dir, resume_from_checkpoint)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            logger.info(f"Resumed from {checkpoint} at meta step {self.state.global_step}", main_process_only=True)
        args, state = self.args, self.state
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=state.global_step, desc="REPTILE", disable=not args.progress)
        while state.global_step < self.total_steps:
            loss = self.meta_step(state.global_step)
            state.global_step += 1
            bar.update(1)
            if self.ema is not None:
                self.ema.step(self.parameters)
            state.window_sums["denoise"] = state.window_sums.get("denoise", 0.0) + loss
            state.window_batches += 1
            finished = state.global_step >= self.total_steps
            if state.global_step % args.logging_steps == 0 or finished:
                entry = {"step": state.global_step, "epoch": round(state.global_step / self.steps_per_epoch, 4),
                         "denoise_loss": state.window_sums["denoise"] / state.window_batches}
                state.window_sums, state.window_batches = {}, 0
                if self.validation_set is not None:
                    entry.update(self.validate())
                self.best.update(entry, {})
                state.log_history.append(entry)
                self.accelerator.log(entry, step=state.global_step)
                bar.set_postfix({key: f"{value:.4g}" for key, value in entry.items() if key.endswith("loss")})
            if args.checkpointing_steps is not None and state.global_step % args.checkpointing_steps == 0:
                self.save_checkpoint()
        bar.close()
        self.saved_step = self.best.finish(args.load_best_model_at_end)
        self.model.eval()
        return state

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The validation tasks' loss with the EMA weights and noise from a fixed seed."""
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
        generator = torch.Generator().manual_seed(self.args.seed)
        losses = [self.loss(batch, generator)["denoise"] for batch in self.validation_set.iter(batch_size=self.args.batch_size)]
        if self.ema is not None:
            self.ema.restore(self.parameters)
        return {"val_denoise_loss": float(torch.cat(losses).mean())}

    def save_checkpoint(self) -> Path:
        """``accelerator.save_state`` (φ, the outer optimizer) plus the loop state, the EMA and the best weights, written
        atomically as the shared trainer writes them."""

        def write(path: Path) -> None:
            save_loop_state(path, self.state, self.ema, self.settings, self.best.tensors)

        return save_checkpoint_atomically(self.accelerator, self.output_dir, self.state.global_step, self.args.checkpoints_total_limit, write)

    def load_checkpoint(self, path: Path) -> None:
        """Inverse of :meth:`save_checkpoint`, after checking that the run's settings and generator are the checkpoint's."""
        check_resume_settings(path, self.settings)
        self.accelerator.load_state(str(path))
        self.state, self.best.tensors = load_loop_state(path, self.ema)
        self.best.state = self.state

    def history(self, num_train: int, num_validation: int) -> dict[str, Any]:
        """The JSON written to ``training_history.json``."""
        return {
            "global_step": self.state.global_step, "num_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
            "num_train_tasks": num_train, "num_validation_tasks": num_validation, "num_processes": 1,
            **saved_weights(self.state, self.saved_step),
            "settings": asdict(self.args), "log_history": self.state.log_history,
        }


# ----- the entry point -----------------------------------------------------------------------------------


def target_index(harvested: int, num_targets: int) -> list[int]:
    """Which of ``harvested`` stored targets serve as ``num_targets`` evenly spaced ones (the last is always ``θ_M``)."""
    if harvested % num_targets:
        raise ValueError(
            f"num_targets={num_targets} must divide the {harvested} local targets the heads were harvested with "
            f"(so that they are evenly spaced); choose one of {[k for k in range(1, harvested + 1) if harvested % k == 0]}."
        )
    return [harvested // num_targets * i - 1 for i in range(1, num_targets + 1)]


def head_rms(dataset: Dataset, batch_size: int = 256) -> float:
    """The RMS of the final heads ``θ_M`` of ``dataset`` (the unit generated heads are expressed in)."""
    total, count = 0.0, 0
    for batch in dataset.iter(batch_size=batch_size):
        final = batch["targets"][:, -1].double()
        total, count = total + float(final.pow(2).sum()), count + final.numel()
    return math.sqrt(total / count)


def train_head_generator(
    head_dataset: str | os.PathLike | tuple[Dataset, Mapping[str, Any]],
    output_dir: str | os.PathLike,
    args: McDiTrainingArguments | None = None,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    resume_from_checkpoint: str | os.PathLike | None = None,
    accelerator: Accelerator | None = None,
    **training_kwargs: Any,
) -> McDiHeadGenerator:
    """Train a :class:`~ocd_hf.methods.mcdi.McDiHeadGenerator` on harvested heads; save it to ``output_dir`` and return it.

    Args:
        head_dataset: a directory made by :func:`~ocd_hf.methods.mcdi.harvest_task_heads`, or a ``(Dataset, metadata)`` pair.
        output_dir: receives ``config.json``, ``model.safetensors``, ``README.md``, ``training_history.json`` and
            ``checkpoints/checkpoint-<step>``.
        args: :class:`McDiTrainingArguments`, or its fields as keyword arguments (not both).
        config_overrides: any of ``denoiser_config``, ``scheduler_config``, ``max_num_classes``; the rest of the
            config comes from the data (``embedding_dim``, ``N``, the encoder, ``head_scale``) and ``args``.
        resume_from_checkpoint: ``"latest"`` (starts afresh if there is none) or a checkpoint directory; single-level
            and REPTILE runs both continue exactly where they stopped.
        accelerator: an ``Accelerator`` to use (default: a new one).
    """
    args = training_arguments(McDiTrainingArguments, args, training_kwargs)
    check_writable_dir(output_dir)
    refused = sorted(set(config_overrides or {}) - set(TRAINABLE_CONFIG_FIELDS))
    if refused:
        raise ValueError(
            f"config_overrides may only set {list(TRAINABLE_CONFIG_FIELDS)}, got {refused}: loss_type and num_targets are training "
            "arguments, and the embedding size, encoder and head scale come from the head dataset."
        )
    dataset, metadata = resolve_head_dataset(head_dataset)
    missing = [column for column in TRAINING_COLUMNS if column not in dataset.column_names]
    if len(dataset) == 0 or missing:
        raise ValueError(
            f"The head dataset is empty or lacks the columns {missing} (it has {dataset.column_names}); make it with harvest_task_heads(...)."
        )
    harvested = int(metadata["harvest_config"]["num_targets"])
    num_targets = 1 if args.loss_type == "mvdi" else args.num_targets or harvested
    index = target_index(harvested, num_targets)
    selected = dataset.select_columns(TRAINING_COLUMNS)
    selected = selected if selected.format["type"] == "custom" else selected.with_format("torch")
    train_set, validation_set = split_rows(selected, args.validation_fraction, args.seed, item_name="task")
    encoder = metadata.get("encoder") or {}
    config = McDiConfig(
        embedding_dim=metadata["embedding_dim"], max_num_classes=metadata["n_way"], num_targets=num_targets, loss_type=args.loss_type,
        head_scale=head_rms(train_set), encoder_id=encoder.get("id"), encoder_revision=encoder.get("revision"),
        encoder_fingerprint=encoder.get("fingerprint"),
        harvest_config={**metadata["harvest_config"], "n_way": metadata["n_way"], "k_shot": metadata["k_shot"]},
        task_distribution=metadata.get("source"),
        **dict(config_overrides or {}),
    )
    accelerator, created_accelerator = prepare_accelerator(accelerator, args, output_dir, asdict(args))
    set_seed(args.seed)
    model = McDiHeadGenerator(config)
    loss = HeadDiffusionLoss(model, index)
    # The config fields that decide what is trained (loss_type and num_targets are training arguments, compared as such).
    generator_settings = {name: getattr(config, name) for name in (*TRAINABLE_CONFIG_FIELDS, "embedding_dim")}
    if args.reptile:
        trainer = ReptileTrainer(model, loss, train_set, validation_set, args, accelerator, output_dir, generator_settings)
    else:
        trainer = GeneratorTrainer(model.denoiser, loss, train_set, validation_set, args, accelerator, output_dir,
                                   generator_settings=generator_settings)
    num_validation = 0 if validation_set is None else len(validation_set)
    logger.info(
        f"Training a {args.loss_type} head generator ({'REPTILE' if args.reptile else 'single-level'}) on {len(train_set)} tasks "
        f"({num_validation} held out) for {trainer.total_steps} steps, k = {num_targets}", main_process_only=True,
    )
    trainer.train(resume_from_checkpoint)
    model.eval()
    if accelerator.is_main_process:
        history = trainer.history(len(train_set), num_validation) if args.reptile else trainer.history(len(train_set), num_validation, "tasks")
        model.save_pretrained(output_dir, model_card_kwargs={"training_config": history["settings"]})
        write_json_atomically(Path(output_dir) / HISTORY_NAME, history)
    accelerator.wait_for_everyone()
    if created_accelerator:
        accelerator.end_training()
    return model
