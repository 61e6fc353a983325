"""Vectorised single-sample overfitting of one Linear layer: the delta ``θ_s − θ`` that a few
optimizer steps on sample ``s`` alone produce, for a whole batch of samples at once.

Every sample gets its own delta tensor row; the loss is the *sum* of per-sample losses, so the
gradient of row ``b`` is exactly sample ``b``'s gradient, and an element-wise optimizer (Adam,
SGD) stepping the ``(batch, out, in)`` tensor equals one optimizer per sample.

A layer that sees one vector ``x`` per sample (a head, an MLP layer) takes a closed form instead
(:func:`closed_form_deltas`): its every gradient is ``δ xᵀ``, so the optimizer's state is per-row
``(batch, out)`` state times a fixed function of ``x``, and no ``(batch, out, in)`` gradient or
optimizer state is formed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .checks import check_class_labels
from .logging import get_logger
from .prefix import PrefixCache, ReplayMismatch, record_prefix
from .target import inject_deltas, model_output_tensor, record_layer_io

logger = get_logger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
# The single-sample fine-tuning of the official OCD code: Adam on the layer's weight, lr 5e-4, 3 steps.
DEFAULT_OPTIMIZER = "adam"
DEFAULT_LR = 5e-4
DEFAULT_STEPS = 3
# torch.optim.Adam's defaults, which OPTIMIZERS["adam"] runs with: the closed form must use the same.
_ADAM_DEFAULTS = inspect.signature(torch.optim.Adam).parameters
ADAM_BETAS: tuple[float, float] = _ADAM_DEFAULTS["betas"].default
ADAM_EPS: float = _ADAM_DEFAULTS["eps"].default
# The paths overfit_deltas can take, for logs and OverfitResult.path; "_split": the network before the target
# ran once (ocd_hf.prefix), each step replays only what follows it.
PATHS = ("closed_form_head", "closed_form_split", "closed_form", "head", "optimizer_split", "optimizer")


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
    """Deltas ``(batch, out, in)``, per-sample losses before/after, optional trajectory ``(batch, steps, out, in)``,
    and which of :data:`PATHS` computed them."""

    deltas: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor
    trajectory: torch.Tensor | None = None
    path: str = "optimizer"


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
    split_prefix: bool = True,
) -> OverfitResult:
    """Fine-tune only ``layer`` on each sample of the batch alone; return every sample's delta.

    Defaults follow the official OCD code (Adam, lr 5e-4, 3 steps, the task loss). The backbone is
    run in eval mode and never modified. When the layer's output *is* the model output (a
    classification head), the prefix of the network runs once and each step costs one matmul
    (:func:`overfit_head_deltas`); otherwise each step re-runs the backbone with the per-sample
    deltas injected, and with ``split_prefix`` (the default) only from the target on: the module calls
    before it are served from the base pass (:mod:`ocd_hf.prefix`; the full pass is the fallback, logged,
    when that replay does not reproduce the base output exactly).
    """
    check_overfit_settings(optimizer, steps)
    was_training = backbone.training
    backbone.eval()
    try:
        with (
            torch.no_grad(),
            record_layer_io(layer) as record,
            count_calls(layer) as calls,
            record_prefix(backbone, layer) if split_prefix else contextlib.nullcontext() as prefix,
        ):
            base_output = model_output_tensor(backbone(**inputs))
        labels = check_task_labels(labels, task, base_output, loss_fn)
        head_fast_path = record["output"] is base_output or (
            record["output"].shape == base_output.shape and torch.equal(record["output"], base_output)
        )
        layer_input = record["input"].detach()
        # One vector per sample, and the layer called once: every gradient is δ xᵀ with this x.
        closed_form = layer_input.dim() == 2 and len(calls) == 1
        if head_fast_path and closed_form:
            result = closed_form_deltas(
                lambda shift: base_output + shift, layer_input, base_output.shape[-1], labels, task, optimizer, lr, steps,
                loss_fn, return_trajectory, path="closed_form_head",
            )
        elif head_fast_path:
            result = overfit_head_deltas(
                layer_input, base_output, labels, task=task, optimizer=optimizer, lr=lr, steps=steps,
                loss_fn=loss_fn, return_trajectory=return_trajectory,
            )
        else:
            replay = split_prefix and replays_exactly(prefix, backbone, inputs, base_output)
            pass_context = prefix.replay if replay else contextlib.nullcontext
            suffix = "_split" if replay else ""
            if closed_form:

                def forward_shifted(shift: torch.Tensor) -> torch.Tensor:
                    with shift_output(layer, shift), pass_context():
                        return model_output_tensor(backbone(**inputs))

                result = closed_form_deltas(
                    forward_shifted, layer_input, layer.out_features, labels, task, optimizer, lr, steps, loss_fn,
                    return_trajectory, path="closed_form" + suffix,
                )
            else:

                def forward(delta: torch.Tensor) -> torch.Tensor:
                    with inject_deltas(layer, delta), pass_context():
                        return model_output_tensor(backbone(**inputs))

                result = optimise_deltas(forward, layer.weight, labels, task, optimizer, lr, steps, loss_fn, return_trajectory)
                result.path = "optimizer" + suffix
        log_path(result.path)
        return result
    finally:
        backbone.train(was_training)


@functools.lru_cache(maxsize=None)
def log_path(path: str) -> None:
    """Say once per process which way :func:`overfit_deltas` computes the deltas."""
    explanations = {
        "closed_form_head": "closed-form optimizer on a head that sees one vector per sample (no backbone pass per step)",
        "closed_form_split": "closed-form optimizer on a layer that sees one vector per sample (per-row state; the network "
        "before the layer ran once, each step runs only what follows it)",
        "closed_form": "closed-form optimizer on a layer that sees one vector per sample (per-row state, backbone pass per step)",
        "head": "optimizer on (batch, out, in) deltas of a per-token head (no backbone pass per step)",
        "optimizer_split": "optimizer on (batch, out, in) deltas (the network before the layer ran once, each step runs "
        "only what follows it)",
        "optimizer": "optimizer on (batch, out, in) deltas, backbone pass per step",
    }
    logger.info(f"overfit_deltas: {path} path, {explanations[path]}.")


@functools.lru_cache(maxsize=None)
def log_split_fallback(reason: str) -> None:
    """Say once per reason why the network before the target is re-run at every step."""
    logger.info(f"overfit_deltas: full backbone pass per step, not the split at the target layer: {reason}.")


def replays_exactly(prefix: PrefixCache, backbone: nn.Module, inputs: Mapping[str, Any], base_output: torch.Tensor) -> bool:
    """Whether a pass that replays ``prefix`` reproduces ``base_output`` bit for bit (logged when not). It runs
    with grad enabled like the optimizer steps, so control flow that depends on the grad mode shows here."""
    reason = prefix.reason
    if not reason:
        try:
            with torch.enable_grad(), prefix.replay():
                replayed = model_output_tensor(backbone(**inputs)).detach()
            if not torch.equal(replayed, base_output):
                reason = "a pass replaying the network before the target does not reproduce the base output"
        except ReplayMismatch as error:
            reason = str(error)
    if reason:
        log_split_fallback(reason)
    return not reason


@contextlib.contextmanager
def count_calls(layer: nn.Module) -> Iterator[list[None]]:
    """A list that grows by one at every call of ``layer`` inside the block."""
    calls: list[None] = []
    handle = layer.register_forward_hook(lambda module, args, output: calls.append(None))
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def shift_output(layer: nn.Module, shift: torch.Tensor) -> Iterator[None]:
    """Add ``shift`` ``(batch, out)`` to ``layer``'s output inside the block."""
    handle = layer.register_forward_hook(lambda module, args, output: output + shift.to(output.dtype))
    try:
        yield
    finally:
        handle.remove()


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
    result = optimise_deltas(forward, weight_like, labels, task, optimizer, lr, steps, loss_fn, return_trajectory)
    result.path = "head"
    return result


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


def closed_form_deltas(
    forward: Callable[[torch.Tensor], torch.Tensor],
    layer_input: torch.Tensor,
    out_features: int,
    labels: torch.Tensor,
    task: str,
    optimizer: str,
    lr: float,
    steps: int,
    loss_fn: LossFn | None,
    return_trajectory: bool,
    path: str = "closed_form",
) -> OverfitResult:
    """:func:`optimise_deltas` for a Linear that sees one vector ``x`` ``(batch, in)`` per sample, in closed form.

    ``forward(shift)`` is the model output when the layer's output is shifted by ``shift = Δ x``
    ``(batch, out_features)``. Every gradient of the layer's weight is ``δ xᵀ``, ``δ`` the gradient of
    the loss at the layer's output, so Adam's moments are exactly ``m = a xᵀ`` and ``v = b (x²)ᵀ`` with
    per-row ``a = EMA(δ)`` and ``b = EMA(δ²)``, and its step is
    ``−step_size · a_o x_i / (√b_o |x_i| / √(1−β₂ᵗ) + eps)`` element-wise (eps kept: it makes the delta
    not quite rank-1). A step needs only ``Δ x``; the ``(batch, out, in)`` deltas are summed once at
    the end. SGD's step ``−lr δ xᵀ`` is rank-1 outright. Equal to ``torch.optim`` on the full delta up
    to float rounding (tests/test_harvest_kernels.py).
    """
    loss_fn = loss_fn or per_sample_task_loss(task)
    x = layer_input.detach()
    labels = labels.to(x.device)
    squared, magnitude = x.pow(2), x.abs()
    beta1, beta2 = ADAM_BETAS
    shift = torch.zeros(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    first = torch.zeros_like(shift)
    second = torch.zeros_like(shift)
    # Δ = x_i · Σ_t c_t,o s_t,oi: x factors out of the sum over steps. SGD: s = 1, so Δ = (Σ_t c_t) xᵀ, rank-1;
    # Adam: s_t = 1 / (r_t,o |x_i| + eps), so the sum is kept as a (batch, out, in) tensor.
    total = torch.zeros_like(shift) if optimizer == "sgd" else torch.zeros(*shift.shape, x.shape[-1], dtype=x.dtype, device=x.device)
    eps = torch.full((1, 1, 1), ADAM_EPS, dtype=x.dtype, device=x.device)
    snapshots = []
    loss_before = None
    for step in range(1, steps + 1):
        leaf = shift.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = loss_fn(forward(leaf), labels)
            (grad,) = torch.autograd.grad(losses.sum(), leaf)
        if loss_before is None:
            loss_before = losses.detach()
        if optimizer == "sgd":
            total.add_(grad, alpha=-lr)
            shift = total * squared.sum(-1, keepdim=True)
        else:
            # torch.optim.Adam's update (single-tensor, no weight decay), on the per-row factors.
            first.lerp_(grad, 1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            coefficient = first * (-lr / (1 - beta1**step))
            rate = second.sqrt() / (1 - beta2**step) ** 0.5
            # eps + r_o |x_i| as a batched outer product: on CPU 3x faster than a broadcasting addcmul.
            scale = torch.baddbmm(eps.expand_as(total), rate.unsqueeze(-1), magnitude.unsqueeze(1))
            total.addcdiv_(coefficient.unsqueeze(-1).expand_as(scale), scale)
            # Σ_i total_oi x_i²: a product and a sum beat a batched matrix-vector bmm 3x on CPU.
            shift = (total * squared.unsqueeze(1)).sum(-1)
        if return_trajectory:
            snapshots.append(expand_rows(total, x))
    with torch.no_grad():
        loss_after = loss_fn(forward(shift), labels)
    trajectory = torch.stack(snapshots, 1) if return_trajectory else None
    deltas = trajectory[:, -1] if trajectory is not None else expand_rows(total, x)
    return OverfitResult(
        deltas=deltas, loss_before=loss_before, loss_after=loss_after.detach(), trajectory=trajectory, path=path
    )


def expand_rows(total: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Δ_oi = total_o(i) · x_i`` ``(batch, out, in)`` from ``total`` ``(batch, out)`` or ``(batch, out, in)``."""
    return (total if total.dim() == 3 else total.unsqueeze(-1)) * x.unsqueeze(1)
