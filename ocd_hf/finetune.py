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
# "closed_form_token": a per-token layer of which one token per sample reaches the loss (its deltas are rank-1).
PATHS = (
    "closed_form_head", "closed_form_split", "closed_form", "closed_form_token_split", "closed_form_token", "head",
    "optimizer_split", "optimizer",
)


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

            def forward_shifted(shift: torch.Tensor) -> torch.Tensor:
                with shift_output(layer, shift), pass_context():
                    return model_output_tensor(backbone(**inputs))

            def forward(delta: torch.Tensor) -> torch.Tensor:
                with inject_deltas(layer, delta), pass_context():
                    return model_output_tensor(backbone(**inputs))

            result, first_step = None, None
            if len(calls) == 1 and layer_input.dim() in (2, 3):  # called once on one vector, or on tokens
                try:
                    result = closed_form_deltas(
                        forward_shifted, layer_input, layer.out_features, labels, task, optimizer, lr, steps, loss_fn,
                        return_trajectory, path=("closed_form" if layer_input.dim() == 2 else "closed_form_token") + suffix,
                    )
                except SeveralTokens as several:  # found at the first step: that step is the optimizer path's first
                    if several.gradient is not None:
                        first_step = (several.losses, torch.bmm(several.gradient.transpose(1, 2), layer_input))
            if result is None:
                result = optimise_deltas(
                    forward, layer.weight, labels, task, optimizer, lr, steps, loss_fn, return_trajectory, first_step=first_step
                )
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
        "closed_form_token_split": "closed-form optimizer on a per-token layer of which one token per sample reaches the "
        "loss (the network before the layer ran once)",
        "closed_form_token": "closed-form optimizer on a per-token layer of which one token per sample reaches the loss",
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
    first_step: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> OverfitResult:
    """``steps`` optimizer steps on a ``(batch, *weight.shape)`` delta under the summed per-sample loss of
    ``forward(delta)`` (the model output with the deltas applied). ``first_step``: the per-sample losses and
    the gradient at the zero delta, when already computed."""
    loss_fn = loss_fn or per_sample_task_loss(task)
    delta = torch.zeros(labels.shape[0], *weight.shape, dtype=weight.dtype, device=weight.device, requires_grad=True)
    # The fused kernel (one pass over the tensor; on CPU ~5x faster than the default for Adam) where torch has one.
    opt = OPTIMIZERS[optimizer]([delta], lr=lr, fused=delta.device.type in ("cpu", "cuda") or None)
    labels = labels.to(weight.device)
    trajectory = []
    loss_before = None
    with torch.enable_grad():
        for step in range(steps):
            if step == 0 and first_step is not None:
                losses, grad = first_step
            else:
                losses = loss_fn(forward(delta), labels)
                (grad,) = torch.autograd.grad(losses.sum(), delta)
            if loss_before is None:
                loss_before = losses.detach()
            # contiguous: torch 2.13's fused CPU Adam reads a non-contiguous grad (a bmm backward's transpose) as if
            # it were laid out contiguously, and steps the wrong entries.
            delta.grad = grad.contiguous()
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
    not quite rank-1). A step needs only ``Δ x`` (each step adds ``c_o Σ_i x_i² / (r_o |x_i| + eps)``) and
    adds its ``c_o / (r_o |x_i| + eps)`` to one ``(batch, out, in)`` buffer in cache-sized chunks
    (:func:`accumulate_adam_step`); no gradient, moment or per-step delta of that size is formed. SGD's step
    ``−lr δ xᵀ`` is rank-1 outright. Equal to ``torch.optim`` on the full delta up to float rounding
    (tests/test_harvest_kernels.py).

    A per-token layer (``layer_input`` ``(batch, tokens, in)``, ``shift`` ``(batch, tokens, out_features)``)
    takes the same form when one token ``t`` per sample reaches the loss (a last-layer target under a
    classifier that reads the CLS token): the weight's gradient ``Σ_j δ_j x_jᵀ`` is then ``δ_t x_tᵀ``. The
    token is the one whose output has a non-zero gradient at the first step; every step applies the
    true shift ``Δ x_j`` to every token and checks that no other token's gradient is non-zero, so the
    result is exact or :class:`SeveralTokens` is raised (with the first step's gradient, if it was then).
    """
    loss_fn = loss_fn or per_sample_task_loss(task)
    tokens = layer_input.detach() if layer_input.dim() == 3 else None
    x = None if tokens is not None else layer_input.detach()
    labels = labels.to(layer_input.device)
    beta1, beta2 = ADAM_BETAS
    batch, in_features = layer_input.shape[0], layer_input.shape[-1]
    shift = torch.zeros(*layer_input.shape[:-1], out_features, dtype=layer_input.dtype, device=layer_input.device)
    first = torch.zeros(batch, out_features, dtype=layer_input.dtype, device=layer_input.device)
    second = torch.zeros_like(first)
    # Δ = x_i · Σ_t c_t,o s_t,oi: x factors out of the sum over steps. SGD: s = 1, so Δ = (Σ_t c_t) xᵀ, rank-1;
    # Adam: s_t = 1 / (r_t,o |x_i| + eps), so the sum is kept as a (batch, out, in) tensor, written in place
    # (a fresh tensor of that size per step costs more in page faults than its arithmetic).
    total = torch.zeros_like(first) if optimizer == "sgd" else first.new_empty(batch, out_features, in_features)
    trajectory = first.new_empty(batch, steps, out_features, in_features) if return_trajectory else None
    loss_before = token = None
    for step in range(1, steps + 1):
        leaf = shift.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = loss_fn(forward(leaf), labels)
            (grad,) = torch.autograd.grad(losses.sum(), leaf)
        if loss_before is None:
            loss_before = losses.detach()
        if tokens is not None:
            token = reaching_token(grad, losses, token, step)
            grad = grad[torch.arange(grad.shape[0], device=grad.device), token]
            if x is None:
                x = tokens[torch.arange(tokens.shape[0], device=tokens.device), token]
        if step == 1:
            squared, magnitude = x * x, x.abs()
        if optimizer == "sgd":
            total.add_(grad, alpha=-lr)
            shift = layer_shift(total, x, squared, tokens)
        else:
            # torch.optim.Adam's update (single-tensor, no weight decay), on the per-row factors.
            first.lerp_(grad, 1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            coefficient = first * (-lr / (1 - beta1**step))
            rate = second.sqrt() / (1 - beta2**step) ** 0.5
            gain = accumulate_adam_step(total, coefficient, rate, magnitude, squared if tokens is None else None, step == 1)
            # Δ x = Σ_t c_t ⊙ Σ_i x_i² s_t,·i: each step adds its own term, so total is never re-read for it.
            shift = shift + coefficient * gain if tokens is None else layer_shift(total, x, squared, tokens)
        if trajectory is not None:
            expand_rows(total, x, out=trajectory[:, step - 1])
    with torch.no_grad():
        loss_after = loss_fn(forward(shift), labels)
    if trajectory is not None:
        deltas = trajectory[:, -1]
    else:  # Adam: in place, total is not needed any more
        deltas = expand_rows(total, x, out=total if total.dim() == 3 else None)
    return OverfitResult(
        deltas=deltas, loss_before=loss_before, loss_after=loss_after.detach(), trajectory=trajectory, path=path
    )


# Samples per chunk of the closed form's (chunk, out, in) work: ~1 MB of float32, so the element-wise passes of one
# step over a chunk stay in the L2 cache (measured on CPU at LeNet-5 fc2's 84 x 120: 2-3x faster than passes over
# a whole batch of 256, which spill to memory).
CHUNK_ELEMENTS = 2**18


def accumulate_adam_step(
    total: torch.Tensor,
    coefficient: torch.Tensor,
    rate: torch.Tensor,
    magnitude: torch.Tensor,
    squared: torch.Tensor | None,
    first_step: bool,
) -> torch.Tensor | None:
    """One closed-form Adam step on ``total`` ``(batch, out, in)``: ``total_oi (+)= c_o / (r_o |x_i| + eps)``
    (assigned at the first step), chunk by chunk. Returns ``Σ_i x_i² / (r_o |x_i| + eps)`` ``(batch, out)`` (this
    step's share of ``Δ x`` per unit ``c``) when ``squared`` (``x²``) is given, else ``None``."""
    batch, out_features, in_features = total.shape
    gain = total.new_empty(batch, out_features) if squared is not None else None
    chunk = max(1, CHUNK_ELEMENTS // (out_features * in_features))
    buffer = total.new_empty(min(chunk, batch), out_features, in_features)
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        # 1 / (r_o |x_i| + eps) in one reused buffer: a broadcasting product then in-place ops (on CPU 4x faster
        # than one broadcasting addcmul).
        scale = buffer[: min(chunk, batch - start)]
        torch.mul(rate[rows].unsqueeze(-1), magnitude[rows].unsqueeze(1), out=scale).add_(ADAM_EPS).reciprocal_()
        if gain is not None:
            torch.bmm(squared[rows].unsqueeze(1), scale.transpose(1, 2), out=gain[rows].unsqueeze(1))
        if first_step:
            torch.mul(scale, coefficient[rows].unsqueeze(-1), out=total[rows])
        else:
            total[rows].addcmul_(scale, coefficient[rows].unsqueeze(-1))
    return gain


class SeveralTokens(Exception):
    """More than one token of a per-token layer's output reaches the loss: the closed form does not apply.
    ``losses`` and ``gradient`` ``(batch, tokens, out)`` are the first step's when it was found there, else ``None``."""

    def __init__(self, losses: torch.Tensor | None, gradient: torch.Tensor | None) -> None:
        super().__init__("more than one token of the layer's output reaches the loss")
        self.losses, self.gradient = losses, gradient


def reaching_token(gradient: torch.Tensor, losses: torch.Tensor, token: torch.Tensor | None, step: int) -> torch.Tensor:
    """The one token ``(batch,)`` per sample whose output has a non-zero gradient (chosen at the first step,
    token 0 where none has); raises :class:`SeveralTokens` if another token's gradient is non-zero."""
    reaches = gradient.ne(0).any(-1)
    if token is None:
        token = reaches.int().argmax(-1)
    rows = torch.arange(reaches.shape[0], device=reaches.device)
    if reaches.sum(-1).sub(reaches[rows, token].int()).any():
        raise SeveralTokens(losses.detach(), gradient) if step == 1 else SeveralTokens(None, None)
    return token


def layer_shift(total: torch.Tensor, x: torch.Tensor, squared: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The layer output's shift under ``Δ_oi = total_o(i) x_i``: ``Δ x`` ``(batch, out)`` for a rank-1 ``total``
    ``(batch, out)`` (SGD), or ``Δ x_j`` for every token ``(batch, tokens, out)``."""
    if tokens is None:
        return total * squared.sum(-1, keepdim=True)
    if total.dim() == 2:
        return torch.bmm(tokens, x.unsqueeze(-1)) * total.unsqueeze(1)
    return torch.bmm(tokens * x.unsqueeze(1), total.transpose(1, 2))


def expand_rows(total: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Δ_oi = total_o(i) · x_i`` ``(batch, out, in)`` from ``total`` ``(batch, out)`` or ``(batch, out, in)``
    (into ``out`` when given)."""
    return torch.mul(total if total.dim() == 3 else total.unsqueeze(-1), x.unsqueeze(1), out=out)
