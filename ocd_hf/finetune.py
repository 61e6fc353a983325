"""Vectorised single-sample overfitting of one Linear layer: the delta ``θ_s − θ`` that a few
optimizer steps on sample ``s`` alone produce, for a whole batch of samples at once.

Every sample gets its own delta tensor row; the loss is the *sum* of per-sample losses, so the
gradient of row ``b`` is exactly sample ``b``'s gradient, and an element-wise optimizer (Adam,
SGD) stepping the ``(batch, out, in)`` tensor equals one optimizer per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .checks import check_class_labels
from .target import inject_deltas, model_output_tensor, record_layer_io

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
# The single-sample fine-tuning of the official OCD code: Adam on the layer's weight, lr 5e-4, 3 steps.
DEFAULT_OPTIMIZER = "adam"
DEFAULT_LR = 5e-4
DEFAULT_STEPS = 3


def finetune_settings(recorded: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``optimizer``, ``lr`` and ``steps`` from ``recorded`` (e.g. a harvest's settings), the defaults where absent."""
    recorded = recorded or {}
    return {
        "optimizer": recorded.get("optimizer", DEFAULT_OPTIMIZER),
        "lr": float(recorded.get("lr", DEFAULT_LR)),
        "steps": int(recorded.get("steps", DEFAULT_STEPS)),
    }


def per_sample_task_loss(task: str) -> LossFn:
    """Per-sample loss ``(batch,)`` of the backbone's task: cross-entropy or squared error."""
    if task == "classification":
        return lambda output, labels: F.cross_entropy(output, labels.long(), reduction="none")
    if task == "regression":
        return lambda output, labels: (output.reshape(labels.shape[0], -1) - labels.reshape(labels.shape[0], -1).to(output.dtype)).pow(2).mean(1)
    raise ValueError(f"Unknown task {task!r}; expected 'classification' or 'regression' (or pass loss_fn=).")


@dataclass
class OverfitResult:
    """Deltas ``(batch, out, in)``, per-sample losses before/after, optional trajectory ``(batch, steps, out, in)``."""

    deltas: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor
    trajectory: torch.Tensor | None = None


def overfit_deltas(
    backbone: nn.Module,
    layer: nn.Linear,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    task: str = "classification",
    optimizer: str = DEFAULT_OPTIMIZER,
    lr: float = DEFAULT_LR,
    steps: int = DEFAULT_STEPS,
    loss_fn: LossFn | None = None,
    return_trajectory: bool = False,
) -> OverfitResult:
    """Fine-tune only ``layer`` on each sample of the batch alone; return every sample's delta.

    Defaults follow the official OCD code (Adam, lr 5e-4, 3 steps, the task loss). The backbone is
    run in eval mode and never modified. When the layer's output *is* the model output (a
    classification head), the prefix of the network runs once and each step costs one matmul
    (:func:`overfit_head_deltas`); otherwise each step re-runs the backbone with the per-sample
    deltas injected.
    """
    check_overfit_settings(optimizer, steps)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), record_layer_io(layer) as record:
            base_output = model_output_tensor(backbone(**inputs))
        labels = check_task_labels(labels, task, base_output, loss_fn)
        head_fast_path = record["output"] is base_output or (
            record["output"].shape == base_output.shape and torch.equal(record["output"], base_output)
        )
        if head_fast_path:
            return overfit_head_deltas(
                record["input"].detach(), base_output, labels, task=task, optimizer=optimizer, lr=lr, steps=steps,
                loss_fn=loss_fn, return_trajectory=return_trajectory,
            )

        def forward(delta: torch.Tensor) -> torch.Tensor:
            with inject_deltas(layer, delta):
                return model_output_tensor(backbone(**inputs))

        return optimise_deltas(forward, layer.weight, labels, task, optimizer, lr, steps, loss_fn, return_trajectory)
    finally:
        backbone.train(was_training)


def overfit_head_deltas(
    layer_input: torch.Tensor,
    base_output: torch.Tensor,
    labels: torch.Tensor,
    task: str = "classification",
    optimizer: str = DEFAULT_OPTIMIZER,
    lr: float = DEFAULT_LR,
    steps: int = DEFAULT_STEPS,
    loss_fn: LossFn | None = None,
    return_trajectory: bool = False,
) -> OverfitResult:
    """:func:`overfit_deltas` for a layer whose output is the model output (a head), from its input
    ``(batch, [tokens,] in)`` and the base output alone: the model output under ``Δ`` is
    ``base_output + x Δᵀ``, so no backbone is needed."""
    check_overfit_settings(optimizer, steps)
    labels = check_task_labels(labels, task, base_output, loss_fn)
    layer_input = layer_input.detach()
    flat = layer_input.reshape(layer_input.shape[0], -1, layer_input.shape[-1])

    def forward(delta: torch.Tensor) -> torch.Tensor:
        return base_output + torch.bmm(flat, delta.transpose(1, 2)).reshape(base_output.shape)

    weight_like = torch.empty(base_output.shape[-1], layer_input.shape[-1], dtype=layer_input.dtype, device=layer_input.device)
    return optimise_deltas(forward, weight_like, labels, task, optimizer, lr, steps, loss_fn, return_trajectory)


def check_task_labels(labels: torch.Tensor, task: str, base_output: torch.Tensor, loss_fn: LossFn | None) -> torch.Tensor:
    """The labels the task loss needs: class indices below the output's width (``-100``, fractional or non-finite
    labels would give zero or NaN deltas without a word). Regression targets pass as they are (a harvest skips and
    counts the non-finite deltas that non-finite inputs or targets give); a custom ``loss_fn`` decides for itself."""
    labels = torch.as_tensor(labels)
    if loss_fn is not None or task != "classification":
        return labels
    return check_class_labels(labels, base_output.shape[-1]).to(labels.device)


def check_overfit_settings(optimizer: str, steps: int) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")


def optimise_deltas(
    forward: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    labels: torch.Tensor,
    task: str,
    optimizer: str,
    lr: float,
    steps: int,
    loss_fn: LossFn | None,
    return_trajectory: bool,
) -> OverfitResult:
    """``steps`` optimizer steps on a ``(batch, *weight.shape)`` delta under the summed per-sample loss of
    ``forward(delta)`` (the model output with the deltas applied)."""
    loss_fn = loss_fn or per_sample_task_loss(task)
    delta = torch.zeros(labels.shape[0], *weight.shape, dtype=weight.dtype, device=weight.device, requires_grad=True)
    opt = OPTIMIZERS[optimizer]([delta], lr=lr)
    labels = labels.to(weight.device)
    trajectory = []
    loss_before = None
    with torch.enable_grad():
        for _ in range(steps):
            losses = loss_fn(forward(delta), labels)
            if loss_before is None:
                loss_before = losses.detach()
            (grad,) = torch.autograd.grad(losses.sum(), delta)
            delta.grad = grad
            opt.step()
            if return_trajectory:
                trajectory.append(delta.detach().clone())
    with torch.no_grad():
        loss_after = loss_fn(forward(delta), labels)
    return OverfitResult(
        deltas=delta.detach(),
        loss_before=loss_before,
        loss_after=loss_after.detach(),
        trajectory=torch.stack(trajectory, 1) if return_trajectory else None,
    )
