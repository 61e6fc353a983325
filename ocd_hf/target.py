"""Find the target ``nn.Linear`` of a backbone, capture the conditioning ``I(x)`` with hooks, and
apply per-sample weight deltas to it in one batched forward pass."""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .factorised import factor_shift


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` submodules of ``model`` by full dotted name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _candidates_message(model: nn.Module) -> str:
    lines = [f"  {name}: Linear({m.in_features} -> {m.out_features})" for name, m in linear_layers(model).items()]
    return "Candidate nn.Linear layers:\n" + ("\n".join(lines) if lines else "  (none)")


def peft_adapter_layer(modules: Mapping[str, nn.Module], name: str) -> str | None:
    """The name of the PEFT adapter layer that module ``name`` is, or is inside, if any.

    Recognised by structure, without importing peft: a tuner layer (LoRA, IA³, ...) holds the layer it
    adapts as ``base_layer``; a ``ModulesToSaveWrapper`` holds ``original_module`` and ``modules_to_save``.
    """
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        module = modules.get(prefix)
        if isinstance(getattr(module, "base_layer", None), nn.Module) or (
            hasattr(module, "original_module") and hasattr(module, "modules_to_save")
        ):
            return prefix
    return None


def find_target_linear(model: nn.Module, target_module: str) -> tuple[str, nn.Linear]:
    """Resolve ``target_module`` to exactly one ``nn.Linear`` of ``model``.

    Matching follows peft's ``target_modules``: an exact full name, then a dotted suffix
    (``"output.dense"`` matches ``"encoder.layer.5.output.dense"``), then a regex that must match
    the full name. Raises ``ValueError`` listing the candidate Linear layers if nothing or more
    than one layer matches, or if the match is not an ``nn.Linear``. A layer with a PEFT adapter on it
    (a LoRA layer, its ``base_layer``, a ``modules_to_save`` copy) is refused with the fix: merge the
    adapter first (``peft_model.merge_and_unload()``), since the adapter's output is added after the
    base layer's and OCD's deltas and fingerprint would describe the base weights alone.
    """
    if not isinstance(target_module, str) or not target_module:
        raise ValueError(f"target_module must be a non-empty string, got {target_module!r}.\n{_candidates_message(model)}")
    modules = dict(model.named_modules())
    if target_module in modules:
        matches = [target_module]
    else:
        matches = [name for name in modules if name.endswith("." + target_module)]
        if not matches:
            try:
                pattern = re.compile(target_module)
            except re.error:
                pattern = None
            matches = [name for name in modules if name and pattern is not None and pattern.fullmatch(name)]
    if not matches:
        raise ValueError(
            f"target_module {target_module!r} matches no module of {type(model).__name__} "
            f"(tried exact name, dotted suffix and full-match regex).\n{_candidates_message(model)}"
        )
    if len(matches) > 1:
        raise ValueError(
            f"target_module {target_module!r} is ambiguous: it matches {matches}. Pass a full name.\n"
            f"{_candidates_message(model)}"
        )
    name = matches[0]
    module = modules[name]
    adapter = peft_adapter_layer(modules, name)
    if adapter is not None:
        raise ValueError(
            f"target_module {target_module!r} resolves to {name!r}, which is (inside) the PEFT adapter layer {adapter!r} "
            f"({type(modules[adapter]).__name__}). OCD generates deltas for a plain nn.Linear: with an adapter on it, the "
            "layer's output is its base layer's plus the adapter's, so deltas and the layer fingerprint of the base weights "
            "alone would not describe it. Merge the adapter into the backbone first, `backbone = peft_model.merge_and_unload()`, "
            "then attach OCD to the merged model (and save or push that model as the backbone the config names)."
        )
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"target_module {target_module!r} resolves to {name!r}, a {type(module).__name__}, not an nn.Linear.\n"
            f"{_candidates_message(model)}"
        )
    return name, module


def layer_fingerprint(layer: nn.Linear) -> str:
    """A short SHA-256 of the layer's weight (and bias) values, to refuse the wrong backbone on load."""
    digest = hashlib.sha256()
    for tensor in (layer.weight, layer.bias):
        if tensor is not None:
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def pool_tokens(tensor: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Reduce ``(batch, tokens, dim)`` to ``(batch, dim)`` by a mean over valid tokens.

    Tensors that already are ``(batch, dim)`` are returned as they are. The attention mask is used
    when its token count matches; otherwise every token counts.
    """
    if tensor.dim() == 2:
        return tensor
    flat = tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == flat.shape[1]:
        weights = attention_mask.to(flat.dtype).unsqueeze(-1)
        return (flat * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return flat.mean(1)


def model_output_tensor(outputs: Any) -> torch.Tensor:
    """The tensor of a backbone's output used as conditioning: ``logits`` if present, else the first tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = outputs.values() if isinstance(outputs, Mapping) else outputs
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"Cannot find an output tensor in the backbone's output of type {type(outputs).__name__}.")


# The three components of I(x): the name a config lists -> the Conditioning field and dataset column holding it.
CONDITION_FIELDS = {"input": "layer_input", "activation": "layer_output", "output": "model_output"}


@dataclass
class Conditioning:
    """``I(x)``: the target layer's input and output and the model's output, pooled per sample.

    ``raw_input`` keeps the unpooled layer input, which per-sample weights act on;
    ``target_is_output`` says that the layer's output *is* the model output (a head), so a weight
    shift changes the output by exactly ``x Δᵀ`` and no second backbone pass is needed.
    """

    layer_input: torch.Tensor
    layer_output: torch.Tensor
    model_output: torch.Tensor
    raw_input: torch.Tensor
    outputs: Any
    target_is_output: bool = False

    def components(self) -> dict[str, torch.Tensor]:
        """The three pooled components of ``I(x)`` by component name (``"input"``, ``"activation"``, ``"output"``)."""
        return {name: getattr(self, field) for name, field in CONDITION_FIELDS.items()}

    @property
    def per_token(self) -> bool:
        return self.raw_input.dim() > 2


@contextlib.contextmanager
def record_layer_io(layer: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input and output of ``layer`` during the forward passes run inside the block."""
    record: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        record["input"] = args[0]
        record["output"] = output

    handle = layer.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


def describe_inputs(inputs: Mapping[str, Any]) -> str:
    """``name (shape) dtype`` of every tensor input."""
    return ", ".join(
        f"{name} {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}" if isinstance(value, torch.Tensor) else f"{name}={value!r}"
        for name, value in inputs.items()
    )


def input_limits(backbone: nn.Module) -> str:
    """What a transformers backbone's config says its token inputs must respect (empty for other backbones)."""
    config = getattr(backbone, "config", None)
    limits = [f"{name} = {getattr(config, name)}" for name in ("vocab_size", "max_position_embeddings") if getattr(config, name, None)]
    return f" (token ids below vocab_size, sequences no longer than max_position_embeddings: {', '.join(limits)})" if limits else ""


def capture_conditioning(backbone: nn.Module, layer: nn.Module, inputs: Mapping[str, Any]) -> Conditioning:
    """Run one unmodified forward pass of ``backbone`` and return ``I(x)`` for the target ``layer``."""
    with record_layer_io(layer) as record:
        try:
            outputs = backbone(**inputs)
        except (RuntimeError, IndexError, TypeError, ValueError) as error:  # torch's and transformers' errors name no input
            raise ValueError(
                f"{type(backbone).__name__} cannot run on the inputs {describe_inputs(inputs)}: {type(error).__name__}: "
                f"{error}. Pass the inputs its forward takes, with their dtypes and shapes{input_limits(backbone)}."
            ) from error
    if "input" not in record:
        raise ValueError(
            "The target layer was not called during the backbone's forward pass; pick a layer that "
            "contributes to the output (see ocd_hf.linear_layers(backbone))."
        )
    mask = inputs.get("attention_mask")
    model_out = model_output_tensor(outputs)
    return Conditioning(
        layer_input=pool_tokens(record["input"], mask),
        layer_output=pool_tokens(record["output"], mask),
        model_output=pool_tokens(model_out, mask),
        raw_input=record["input"],
        outputs=outputs,
        target_is_output=record["output"] is model_out,
    )


def delta_shift(layer_input: torch.Tensor, deltas: torch.Tensor, factor_rule: str | None = None) -> torch.Tensor:
    """``x Δ_bᵀ`` for every sample ``b``: the change of the layer's output under per-sample deltas.

    ``deltas`` is ``(batch, out, in)``, or ``(batch, out)`` left factors of rank-1 deltas whose right
    factor follows ``factor_rule`` (then ``x`` must be one vector per sample).
    """
    if layer_input.shape[0] != deltas.shape[0]:
        raise ValueError(f"Got {deltas.shape[0]} deltas for a batch of {layer_input.shape[0]} inputs at the target layer.")
    if deltas.dim() == 2:
        if layer_input.dim() != 2 or factor_rule is None:
            raise ValueError(
                "Factorised (rank-1) deltas need a layer that sees one vector per sample and a factor_rule; "
                f"got a layer input of shape {tuple(layer_input.shape)}. Use full deltas for per-token layers."
            )
        return factor_shift(deltas, layer_input, factor_rule)
    flat = layer_input.reshape(layer_input.shape[0], -1, layer_input.shape[-1])
    shift = torch.bmm(flat, deltas.to(flat.dtype).transpose(1, 2))
    return shift.reshape(*layer_input.shape[:-1], deltas.shape[1])


@contextlib.contextmanager
def inject_deltas(layer: nn.Linear, deltas: torch.Tensor, factor_rule: str | None = None) -> Iterator[None]:
    """Make ``layer`` compute ``x (W + Δ_b)ᵀ + b`` for sample ``b`` of the batch, without a loop.

    ``deltas`` has shape ``(batch, out_features, in_features)``, or ``(batch, out_features)`` for
    factorised deltas (see :func:`delta_shift`); the layer's own output is kept and ``x Δ_bᵀ``
    added to it, so the backbone's forward runs unchanged.
    """
    expected = (layer.out_features, layer.in_features)
    if deltas.dim() not in (2, 3) or tuple(deltas.shape[1:]) != expected[: deltas.dim() - 1]:
        raise ValueError(
            f"deltas must have shape (batch, {expected[0]}, {expected[1]}) or, factorised, (batch, {expected[0]}); "
            f"got {tuple(deltas.shape)}."
        )

    def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + delta_shift(args[0], deltas, factor_rule).to(output.dtype)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def backbone_task(backbone: nn.Module) -> str:
    """``"regression"`` for a backbone configured for regression (one label), else ``"classification"``."""
    config = getattr(backbone, "config", None)
    if getattr(config, "problem_type", None) == "regression" or getattr(config, "num_labels", 2) == 1:
        return "regression"
    return "classification"


def dummy_inputs_for(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A small batch of valid inputs for common ``transformers`` backbones (text and vision)."""
    config = getattr(backbone, "config", None)
    device = next(backbone.parameters()).device
    if config is not None and hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return {"pixel_values": torch.zeros(2, config.num_channels, *size, device=device)}
    if config is not None and hasattr(config, "vocab_size"):
        return {
            "input_ids": torch.ones(2, 4, dtype=torch.long, device=device),
            "attention_mask": torch.ones(2, 4, dtype=torch.long, device=device),
        }
    raise ValueError(
        f"Cannot build example inputs for {type(backbone).__name__}; pass example_inputs= (a dict of model inputs)."
    )


def describe_backbone(backbone: nn.Module, target_module: str, example_inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything :class:`~ocd_hf.OCDConfig` needs to know about ``backbone`` and its target layer."""
    name, layer = find_target_linear(backbone, target_module)
    inputs = dict(example_inputs) if example_inputs is not None else dummy_inputs_for(backbone)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        cond = capture_conditioning(backbone, layer, inputs)
    backbone.train(was_training)
    config = getattr(backbone, "config", None)
    return {
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "base_model_class": type(backbone).__name__,
        "target_module": name,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "output_dim": cond.model_output.shape[-1],
        "per_token": cond.per_token,
        "task": backbone_task(backbone),
        "base_layer_fingerprint": layer_fingerprint(layer),
    }
