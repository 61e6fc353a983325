"""The Accelerate training loop shared by every generator: AdamW, an LR schedule, gradient
accumulation and clipping, EMA (diffusers' ``EMAModel``), periodic logging (trackers through
``report_to``) and validation, and checkpoints that resume exactly.

A method supplies the module to train and a loss module whose ``forward(batch, generator)`` returns
its named per-sample losses ``{name: (batch,)}``; the trainer minimises their weighted sum and logs
each as ``<name>_loss`` (``val_<name>_loss`` on the validation split). Nothing here names a method.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .atomic import PARTIAL_PREFIX, commit_directory
from .checks import check_int, check_number

if TYPE_CHECKING:
    from datasets import Dataset
    from diffusers.training_utils import EMAModel

logger = get_logger(__name__)

HISTORY_NAME = "training_history.json"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
EMA_WEIGHTS_NAME = "ema.safetensors"


@dataclass
class GeneratorTrainingArguments:
    """Settings of a generator's training loop, validated on creation; ``HfArgumentParser`` builds the
    command line from it (``ocd-hf train --help``). Methods subclass it to add their own settings."""

    num_steps: int | None = field(default=None, metadata={"help": "optimizer steps (give num_steps or num_epochs; default 10 epochs)"})
    num_epochs: int | None = field(default=None, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=32, metadata={
        "help": "items per process and forward; a step sees batch_size × processes × gradient_accumulation_steps"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_scheduler: str = field(default="constant", metadata={"help": "a diffusers.optimization.get_scheduler schedule"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "warm-up steps of the LR schedule"})
    gradient_accumulation_steps: int | None = field(default=None, metadata={
        "help": "batches per optimizer step (default: the accelerator's, else 1)"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping (None disables it)"})
    ema_decay: float | None = field(default=0.9999, metadata={
        "help": "upper bound of the EMA decay (None disables EMA); it warms up as 1 − (1 + step)^−ema_power, so the EMA "
        "averages the last ~step^ema_power steps and is useful at every run length (a constant 0.9999 would stay "
        "dominated by the initialisation in any CPU-sized run)"})
    ema_power: float = field(default=0.75, metadata={"help": "EMA warm-up power (diffusers' choice for short runs)"})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "share of the data held out; its losses are logged with the EMA weights (those that are saved)"})
    logging_steps: int = field(default=10, metadata={"help": "log the mean training losses every so many steps"})
    validation_steps: int | None = field(default=None, metadata={
        "help": "validate every so many steps (default: at every logging step) and at the end"})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "accelerator.save_state every so many steps"})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "keep at most this many checkpoints"})
    seed: int = field(default=0, metadata={"help": "seeds the initialisation, the data order, the noise and the validation split"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (main process only)"})
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "Accelerate trackers to log to (e.g. tensorboard, wandb; none: no tracker); used when the trainer creates the Accelerator"})
    load_best_model_at_end: bool = field(default=True, metadata={
        "help": "end with (and save) the weights of the validation with the lowest loss rather than the last ones; "
        "training_history.json names the step saved (saved_step). Needs a validation split"})

    def __post_init__(self) -> None:
        if self.num_steps is not None and self.num_epochs is not None:
            raise ValueError("Pass num_steps or num_epochs, not both.")
        positive = ("num_steps", "num_epochs", "batch_size", "gradient_accumulation_steps", "logging_steps", "validation_steps",
                    "checkpointing_steps", "checkpoints_total_limit")
        for name in positive:
            check_int(name, getattr(self, name), minimum=1, optional=True)
        check_int("lr_warmup_steps", self.lr_warmup_steps, minimum=0)
        check_number("learning_rate", self.learning_rate, positive=True, fix="e.g. learning_rate=1e-4")
        check_number("weight_decay", self.weight_decay, positive=False, fix="e.g. weight_decay=0.0")
        check_number("ema_power", self.ema_power, positive=True, fix="e.g. ema_power=0.75")
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, positive=True, fix="e.g. max_grad_norm=1.0, or None to disable clipping")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, (int, float)) and 0.0 < self.ema_decay < 1.0):
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}.")
        if not (isinstance(self.validation_fraction, (int, float)) and 0.0 <= self.validation_fraction < 1.0):
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}.")
        report_to = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        self.report_to = [name for name in report_to if name != "none"]  # transformers' spelling of "no tracker"


def check_trackers(report_to: list[str]) -> None:
    """Refuse trackers that are not installed: Accelerate would drop them silently and log nothing."""
    available = {str(tracker) for tracker in get_available_trackers()}
    missing = [name for name in report_to if name != "all" and name in set(LoggerType.list()) and name not in available]
    if missing:
        raise ValueError(
            f"report_to={report_to} asks for {missing}, not installed here (pip install {' '.join(missing)}); "
            f"the trackers available are {sorted(available) or 'none'}."
        )


def training_arguments(args_class: type[GeneratorTrainingArguments], args: GeneratorTrainingArguments | None,
                       training_kwargs: Mapping[str, Any]) -> GeneratorTrainingArguments:
    """``args``, or an ``args_class`` built from ``training_kwargs`` (a method's ``train_*(..., num_steps=...)``); not both."""
    if args is not None and training_kwargs:
        raise TypeError(f"Pass the training settings as args= or as keyword arguments, not both (got {sorted(training_kwargs)}).")
    known = {f.name for f in fields(args_class)}
    unknown = sorted(set(training_kwargs) - known)
    if unknown:
        raise TypeError(f"Unknown training arguments {unknown}; {args_class.__name__} has {sorted(known)}.")
    return args or args_class(**training_kwargs)


def tracker_values(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as trackers accept them: scalars and strings, anything else as its string."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value) for name, value in settings.items()}


def prepare_accelerator(
    accelerator: Accelerator | None, args: GeneratorTrainingArguments, output_dir: str | os.PathLike, tracked: Mapping[str, Any]
) -> tuple[Accelerator, bool]:
    """The accelerator to train with and whether it was created here. A new one logs to ``args.report_to``
    (refused if not installed) under ``output_dir`` with ``tracked`` as the run's settings; a given one must
    agree with ``args.gradient_accumulation_steps``."""
    if accelerator is not None:
        steps = args.gradient_accumulation_steps
        if steps is not None and steps != accelerator.gradient_accumulation_steps:
            raise ValueError(
                f"gradient_accumulation_steps={steps} differs from the accelerator's "
                f"({accelerator.gradient_accumulation_steps}); set it on the Accelerator or leave it unset."
            )
        return accelerator, False
    check_trackers(args.report_to)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps or 1, log_with=args.report_to or None, project_dir=output_dir
    )
    if args.report_to:
        accelerator.init_trackers("ocd-hf", config=tracker_values(tracked))
    return accelerator, True


@dataclass
class TrainingState:
    """What a checkpoint stores besides Accelerate's state: the step, the history, the open logging window, and
    the step and total loss of the best validation so far."""

    global_step: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    window_sums: dict[str, float] = field(default_factory=dict)
    window_batches: int = 0
    best_step: int | None = None
    best_val_loss: float | None = None


# Settings that may change when a run resumes: they decide how long it runs and what it reports, not what it computes.
RESUMABLE_SETTINGS = ("num_steps", "num_epochs", "progress", "report_to", "logging_steps", "validation_steps", "checkpointing_steps",
                      "checkpoints_total_limit", "load_best_model_at_end")
BEST_WEIGHTS_NAME = "best.safetensors"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def numbered_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-<step>`` directory under ``output_dir``, complete or not, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def is_complete(path: Path) -> bool:
    """Whether checkpoint ``path`` was fully written: the loop state is its last file (and since checkpoints are
    renamed into place only when complete, only a checkpoint left by an older version can lack it)."""
    return (path / TRAINING_STATE_NAME).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints written under ``output_dir``, oldest first."""
    return [path for path in numbered_checkpoints(output_dir) if is_complete(path)]


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | os.PathLike | None) -> Path | None:
    """The checkpoint directory to resume from: ``"latest"`` (the newest complete one, ``None`` if there is none yet;
    incomplete ones are skipped with a warning naming them) or an explicit path."""
    if resume_from_checkpoint is None:
        return None
    if str(resume_from_checkpoint) == "latest":
        complete = list_checkpoints(output_dir)
        incomplete = [path for path in numbered_checkpoints(output_dir) if not is_complete(path)]
        if incomplete:
            logger.warning(
                f"Skipping incomplete checkpoint(s) {[str(path) for path in incomplete]} (a run died while writing them); "
                f"resuming from {str(complete[-1]) if complete else 'scratch'}. Delete them to silence this warning.",
                main_process_only=True,
            )
        return complete[-1] if complete else None
    path = Path(resume_from_checkpoint)
    if not is_complete(path):
        raise ValueError(
            f"resume_from_checkpoint={str(path)!r} is not a checkpoint written by an ocd-hf trainer, or an incomplete one (no {TRAINING_STATE_NAME}); "
            f"pass 'latest' or a directory like {Path(output_dir) / CHECKPOINTS_DIR / (CHECKPOINT_PREFIX + '100')}."
        )
    return path


def prune_checkpoints(output_dir: str | os.PathLike, limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond the newest ``limit`` (``None``: keep all). Called only once the
    newest checkpoint is complete, so that a crash never leaves fewer complete checkpoints than before."""
    if limit is not None:
        existing = list_checkpoints(output_dir)
        for old in existing[: max(0, len(existing) - limit)]:
            shutil.rmtree(old)


def save_checkpoint_atomically(
    accelerator: Accelerator, output_dir: str | os.PathLike, step: int, limit: int | None, write: Any
) -> Path:
    """``accelerator.save_state`` plus ``write(directory)`` (every process; the trainer's own files) into a temporary
    directory, renamed to ``checkpoints/checkpoint-<step>`` once complete; then the oldest beyond ``limit`` are pruned.
    A process killed at any instant leaves the previous checkpoints intact (and at worst a ``.partial-*`` directory
    that the next save deletes)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    partial, final = root / f"{PARTIAL_PREFIX}{CHECKPOINT_PREFIX}{step}", root / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(PARTIAL_PREFIX + "*"):
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    write(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit_directory(partial, final)
        prune_checkpoints(output_dir, limit)
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {final}", main_process_only=True)
    return final


def json_value(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so that settings compare across a save."""
    return json.loads(json.dumps(value, default=str))


def run_settings(
    args: GeneratorTrainingArguments, model: nn.Module, generator_settings: Mapping[str, Any] | None, num_train: int, num_validation: int
) -> dict[str, Any]:
    """What a checkpoint records to refuse a resume that would silently mix runs: the training arguments, the
    method's generator settings, the sizes of the training and validation splits (the data order and the position
    in the epoch depend on them) and the shapes of the trained tensors."""
    return {
        "arguments": json_value(asdict(args)),
        "generator": json_value({**(generator_settings or {}), "num_train_items": num_train, "num_validation_items": num_validation}),
        "tensors": {name: list(tensor.shape) for name, tensor in model.state_dict().items()},
    }


def check_resume_settings(path: Path, current: Mapping[str, Any]) -> None:
    """Refuse to resume from checkpoint ``path`` with other settings than it was written with (those in
    :data:`RESUMABLE_SETTINGS` may change), or onto another generator; name each difference."""
    saved = json.loads((path / TRAINING_STATE_NAME).read_text()).get("settings")
    if saved is None:
        logger.warning(f"Checkpoint {path} records no settings (an older version wrote it): the resume cannot be checked.")
        return
    generator = sorted(
        f"{name}: {saved['generator'].get(name)!r} in the checkpoint, {value!r} now"
        for name, value in current["generator"].items() if saved["generator"].get(name) != value
    )
    tensors_then, tensors_now = saved["tensors"], current["tensors"]
    differing = sorted(name for name in set(tensors_then) | set(tensors_now) if tensors_then.get(name) != tensors_now.get(name))
    if generator or differing:
        raise ValueError(
            f"Checkpoint {path} was written for another generator or dataset: {'; '.join(generator) or 'same settings'}; "
            f"{len(differing)} tensor(s) differ in name or shape (e.g. {differing[:3]}). Resume with the generator settings "
            "of that run (config_overrides), or train into another output_dir (or without resume_from_checkpoint)."
        )
    changed = sorted(
        f"{name}={value!r} (the checkpoint has {saved['arguments'].get(name)!r})"
        for name, value in current["arguments"].items()
        if name not in RESUMABLE_SETTINGS and name in saved["arguments"] and saved["arguments"][name] != value
    )
    if changed:
        raise ValueError(
            f"Resuming from {path} with changed training settings: {', '.join(changed)}. A resume continues the run exactly, "
            f"so only {list(RESUMABLE_SETTINGS)} may change: resume with the checkpoint's values, or train into another "
            "output_dir (or without resume_from_checkpoint) to use the new ones."
        )


def save_loop_state(path: Path, state: TrainingState, ema: EMAModel | None, settings: Mapping[str, Any] | None = None,
                    best: list[torch.Tensor] | None = None) -> None:
    """Write the EMA weights and the best weights so far (safetensors), then the loop state and ``settings`` (JSON,
    last: its presence marks a complete checkpoint) into checkpoint ``path``."""
    ema_state = {}
    if ema is not None:
        save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, str(path / EMA_WEIGHTS_NAME))
        ema_state = {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}
    if best is not None:
        save_file({str(i): tensor.detach().cpu().contiguous() for i, tensor in enumerate(best)}, str(path / BEST_WEIGHTS_NAME))
    (path / TRAINING_STATE_NAME).write_text(json.dumps({**asdict(state), "ema": ema_state, "settings": settings}, indent=2))


def load_loop_state(path: Path, ema: EMAModel | None) -> tuple[TrainingState, list[torch.Tensor] | None]:
    """Inverse of :func:`save_loop_state`: the loop state and the best weights so far (if any), with the EMA (if any)
    restored in place."""
    if ema is not None and not (path / EMA_WEIGHTS_NAME).is_file():
        raise ValueError(f"Checkpoint {path} holds no EMA weights but ema_decay is set; resume with ema_decay=None.")
    saved = json.loads((path / TRAINING_STATE_NAME).read_text())
    ema_state = saved.pop("ema")
    saved.pop("settings", None)
    if ema is not None:
        shadow = load_file(str(path / EMA_WEIGHTS_NAME))
        ema.load_state_dict({**ema_state, "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    best = None
    if (path / BEST_WEIGHTS_NAME).is_file():
        tensors = load_file(str(path / BEST_WEIGHTS_NAME))
        best = [tensors[str(i)] for i in range(len(tensors))]
    return TrainingState(**saved), best


def saved_weights(state: TrainingState, saved_step: int) -> dict[str, Any]:
    """The history's record of which weights were saved: their step, and the best validation's step and loss."""
    return {"saved_step": saved_step, "best_step": state.best_step, "best_val_loss": state.best_val_loss}


def validation_total(entry: Mapping[str, Any], loss_weights: Mapping[str, float]) -> float | None:
    """The weighted sum of a log entry's validation losses (``val_<name>_loss``), ``None`` if it has none."""
    values = {key[len("val_"):-len("_loss")]: value for key, value in entry.items() if key.startswith("val_") and key.endswith("_loss")}
    return sum(loss_weights.get(name, 1.0) * value for name, value in values.items()) if values else None


class BestWeights:
    """The weights of the validation with the lowest loss so far (those validated: the EMA's when there is one),
    kept in memory and in every checkpoint, and put back at the end of training."""

    def __init__(self, state: TrainingState, parameters: list[nn.Parameter], ema: EMAModel | None) -> None:
        self.state, self.parameters, self.ema = state, parameters, ema
        self.tensors: list[torch.Tensor] | None = None

    def update(self, entry: Mapping[str, Any], loss_weights: Mapping[str, float]) -> None:
        """Remember the validated weights if ``entry``'s validation loss is the lowest yet."""
        total = validation_total(entry, loss_weights)
        if total is None or (self.state.best_val_loss is not None and not total < self.state.best_val_loss):
            return
        self.state.best_step, self.state.best_val_loss = self.state.global_step, float(total)
        source = self.ema.shadow_params if self.ema is not None else self.parameters
        self.tensors = [tensor.detach().clone() for tensor in source]

    def finish(self, load_best: bool) -> int:
        """Put the weights to save into the model (the best ones with ``load_best``, else the last EMA or raw ones); return their step."""
        if load_best and self.tensors is not None:
            with torch.no_grad():
                for parameter, tensor in zip(self.parameters, self.tensors):
                    parameter.copy_(tensor.to(parameter.device))
            saved = self.state.best_step
            logger.info(
                f"Keeping the weights of step {saved} (lowest validation loss, {self.state.best_val_loss:.4g}) of "
                f"{self.state.global_step} steps", main_process_only=True,
            )
            return saved
        if self.ema is not None:
            self.ema.copy_to(self.parameters)
        return self.state.global_step


def split_rows(dataset: Dataset, validation_fraction: float, seed: int, item_name: str = "row") -> tuple[Dataset, Dataset | None]:
    """Carve a seeded random validation split off ``dataset`` (``None`` when ``validation_fraction`` is 0).

    Rows are selected in memory (``Dataset.train_test_split`` would write index cache files into the
    weight dataset's directory).
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    if validation_fraction == 0.0:
        return dataset, None
    num_validation = math.ceil(validation_fraction * len(dataset))
    if num_validation >= len(dataset):
        raise ValueError(
            f"validation_fraction={validation_fraction} of {len(dataset)} {item_name}(s) leaves none to train on; "
            "harvest more or lower validation_fraction (0 disables validation)."
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    validation, train = order[:num_validation].sort().values, order[num_validation:].sort().values
    return dataset.select(train.tolist(), keep_in_memory=True), dataset.select(validation.tolist(), keep_in_memory=True)


def make_loader(dataset: Dataset, batch_size: int, seed: int | None) -> DataLoader:
    """A DataLoader over a torch-formatted dataset; shuffled with a per-epoch seed (``seed + epoch``) if ``seed`` is given."""
    sampler = SeedableRandomSampler(dataset, data_seed=seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


class GeneratorTrainer:
    """The Accelerate training loop of one generator: AdamW, LR schedule, gradient accumulation and
    clipping, EMA, periodic logging and validation, and checkpoints that resume exactly.

    ``model`` holds the trained parameters (saved, averaged by the EMA); ``loss`` is the module
    Accelerate prepares (DDP wraps it), usually holding ``model``: ``loss(batch, generator)`` returns
    named per-sample losses, minimised as ``Σ loss_weights[name] · mean`` (weight 1 by default).

    Exact resumption: Accelerate's checkpoint restores the weights, optimizer, LR schedule and RNGs;
    the trainer adds the loop state (JSON), the EMA weights and each process's noise generator
    (safetensors), and skips the batches of the current epoch already seen (the data order is
    ``seed + epoch``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        train_set: Dataset,
        validation_set: Dataset | None,
        args: GeneratorTrainingArguments,
        accelerator: Accelerator,
        output_dir: str | os.PathLike,
        loss_weights: Mapping[str, float] | None = None,
        generator_settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.loss_weights = dict(loss_weights or {})
        self.args = args
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.accumulation = accelerator.gradient_accumulation_steps
        batches_per_epoch = math.ceil(len(train_set) / (args.batch_size * accelerator.num_processes))
        steps_per_epoch = math.ceil(batches_per_epoch / self.accumulation)
        self.total_steps = args.num_steps if args.num_steps is not None else steps_per_epoch * (args.num_epochs or 10)
        # diffusers is imported here, not at the top, so that the training arguments (and `ocd-hf --help`) do not import it.
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
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
        prepared = accelerator.prepare(loss, optimizer, schedule, *loaders)
        self.loss, self.optimizer, self.schedule, self.train_loader = prepared[:4]
        self.validation_loader = prepared[4] if validation_set is not None else None
        self.steps_per_epoch = math.ceil(len(self.train_loader) / self.accumulation)
        self.parameters = list(model.parameters())
        self.ema = None
        if args.ema_decay is not None:
            self.ema = EMAModel(self.parameters, decay=args.ema_decay, use_ema_warmup=True, power=args.ema_power)
        self.generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)
        self.state = TrainingState()
        self.settings = run_settings(args, model, generator_settings, len(train_set), len(validation_set or []))
        self.best = BestWeights(self.state, self.parameters, self.ema)
        self.saved_step = 0

    def train(self, resume_from_checkpoint: str | os.PathLike | None = None) -> TrainingState:
        """Run (or resume) training to ``total_steps``; the model ends with the EMA weights, in eval mode."""
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
        self.saved_step = self.best.finish(self.args.load_best_model_at_end)
        self.model.eval()
        return self.state

    def epoch_batches(self, epoch: int) -> DataLoader:
        """The batches of ``epoch`` not yet trained on (all of them, except in the epoch a run resumes in)."""
        self.train_loader.set_epoch(epoch)
        seen = (self.state.global_step - epoch * self.steps_per_epoch) * self.accumulation
        return self.accelerator.skip_first_batches(self.train_loader, seen) if seen else self.train_loader

    def training_step(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Forward and backward one batch; the optimizer steps when the accumulation window closes."""
        with self.accelerator.accumulate(self.loss):
            losses = self.loss(batch, self.generator)
            total = sum(self.loss_weights.get(name, 1.0) * value.mean() for name, value in losses.items())
            self.accelerator.backward(total)
            if self.accelerator.sync_gradients and self.args.max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(self.loss.parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad()
        for name, value in losses.items():
            self.state.window_sums[name] = self.state.window_sums.get(name, 0.0) + float(value.detach().mean())
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
            self.best.update(entry, self.loss_weights)
            state.log_history.append(entry)
            self.accelerator.log({key: value for key, value in entry.items() if key != "step"}, step=state.global_step)
            bar.set_postfix({key: f"{value:.4g}" for key, value in entry.items() if key.endswith("loss")})
        if args.checkpointing_steps is not None and state.global_step % args.checkpointing_steps == 0:
            self.save_checkpoint()

    def close_window(self) -> dict[str, float]:
        """Mean training losses over the batches since the last log (all processes), then reset."""
        state = self.state
        names = sorted(state.window_sums)
        sums = torch.tensor([state.window_sums[name] for name in names], device=self.accelerator.device)
        means = self.accelerator.reduce(sums, "mean") / state.window_batches
        state.window_sums, state.window_batches = {}, 0
        return {**{f"{name}_loss": float(mean) for name, mean in zip(names, means)}, "learning_rate": self.schedule.get_last_lr()[0]}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation losses of the EMA weights (those that are saved), with noise drawn from a fixed seed
        so that values compare across steps."""
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
        generator = torch.Generator(device=self.accelerator.device).manual_seed(self.args.seed + self.accelerator.process_index)
        self.loss.eval()
        gathered: dict[str, list[torch.Tensor]] = {}
        for batch in self.validation_loader:
            for name, value in self.loss(batch, generator).items():
                gathered.setdefault(name, []).append(self.accelerator.gather_for_metrics(value))
        self.loss.train()
        if self.ema is not None:
            self.ema.restore(self.parameters)
        return {f"val_{name}_loss": float(torch.cat(values).mean()) for name, values in sorted(gathered.items())}

    def save_checkpoint(self) -> Path:
        """``accelerator.save_state`` plus the loop state, the EMA and best weights and each process's noise generator,
        written atomically to ``checkpoints/checkpoint-<step>`` (:func:`save_checkpoint_atomically`); keeps at most
        ``checkpoints_total_limit`` checkpoints."""
        accelerator = self.accelerator

        def write(path: Path) -> None:
            save_file({"state": self.generator.get_state()}, str(path / f"noise_generator_{accelerator.process_index}.safetensors"))
            accelerator.wait_for_everyone()  # every process's files are written before the main process marks it complete
            if accelerator.is_main_process:
                save_loop_state(path, self.state, self.ema, self.settings, self.best.tensors)

        return save_checkpoint_atomically(accelerator, self.output_dir, self.state.global_step, self.args.checkpoints_total_limit, write)

    def load_checkpoint(self, path: Path) -> None:
        """Inverse of :meth:`save_checkpoint`, after checking that the run's settings and generator are the checkpoint's."""
        accelerator = self.accelerator
        check_resume_settings(path, self.settings)
        generator_file = path / f"noise_generator_{accelerator.process_index}.safetensors"
        if not generator_file.is_file():
            raise ValueError(
                f"Checkpoint {path} has no noise generator for process {accelerator.process_index}: it was written by fewer "
                "processes. Resume with the number of processes that wrote it."
            )
        if self.ema is not None and not (path / EMA_WEIGHTS_NAME).is_file():
            raise ValueError(f"Checkpoint {path} holds no EMA weights but ema_decay is set; resume with ema_decay=None.")
        accelerator.load_state(str(path))
        self.state, best = load_loop_state(path, self.ema)
        self.best.state = self.state
        self.best.tensors = None if best is None else [tensor.to(accelerator.device) for tensor in best]
        self.generator.set_state(load_file(str(generator_file))["state"])
        if self.ema is not None:
            self.ema.to(accelerator.device)

    def history(self, num_train: int, num_validation: int, item_name: str = "samples") -> dict[str, Any]:
        """The JSON written to ``training_history.json``."""
        return {
            "global_step": self.state.global_step,
            "num_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            f"num_train_{item_name}": num_train,
            f"num_validation_{item_name}": num_validation,
            "num_processes": self.accelerator.num_processes,
            "total_batch_size": self.args.batch_size * self.accelerator.num_processes * self.accumulation,
            **saved_weights(self.state, self.saved_step),
            "settings": {**asdict(self.args), "gradient_accumulation_steps": self.accumulation},
            "log_history": self.state.log_history,
        }


