"""``OCDWrapper``: a backbone plus the OCD hypernetwork that generates, for each input, the weight
shift of one of its Linear layers, applied per sample in a single batched forward pass."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from huggingface_hub import ModelCard
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from ...backbones import SetFitBackbone, load_pretrained_backbone, tokenizer_from_setfit
from ...cards import GeneratorCardData
from ...checks import check_class_labels, check_finite_inputs, check_generator, check_int, check_number
from ...factorised import expand_factors
from ...finetune import finetune_settings, overfit_deltas, overfit_head_deltas
from ...logging import get_logger
from ...modeling_utils import GeneratorHubMixin, load_checked_state, read_generator_files, save_generator
from ...target import (
    Conditioning,
    capture_conditioning,
    delta_shift,
    find_target_linear,
    inject_deltas,
    layer_fingerprint,
    model_output_tensor,
)
from .configuration import OCDConfig
from .hypernetwork import OCDHypernetwork
from .model_card import ocd_card, write_model_card

logger = get_logger(__name__)


def check_backbone(config: OCDConfig, backbone: nn.Module, strict_fingerprint: bool = True) -> tuple[str, nn.Linear]:
    """Check that ``backbone`` has the target layer ``config`` was made for; return its name and module.

    Raises ``ValueError`` naming the problem if the layer is missing, has another shape, or (with
    ``strict_fingerprint``) holds other weights than the layer the hypernetwork was trained on.
    """
    if not config.target_module:
        raise ValueError("OCDConfig.target_module is not set; build the config with OCDConfig.from_backbone(...).")
    name, layer = find_target_linear(backbone, config.target_module)
    if (layer.out_features, layer.in_features) != config.weight_shape:
        raise ValueError(
            f"Target layer {name!r} of {type(backbone).__name__} has weight shape "
            f"({layer.out_features}, {layer.in_features}) but this hypernetwork was made for {config.weight_shape}. "
            "Load it onto the backbone it was trained for (config.base_model_name_or_path)."
        )
    if config.base_layer_fingerprint and layer_fingerprint(layer) != config.base_layer_fingerprint:
        message = (
            f"Target layer {name!r} holds other weights (fingerprint {layer_fingerprint(layer)}) than the layer this "
            f"hypernetwork was trained on ({config.base_layer_fingerprint}): its deltas would not apply. Load the "
            f"backbone {config.base_model_name_or_path!r} (revision {config.base_model_revision!r}), or pass "
            "strict_fingerprint=False to proceed anyway."
        )
        if strict_fingerprint:
            raise ValueError(message)
        logger.warning(message)
    return name, layer


def check_generation_arguments(num_samples: Any, generator: Any, num_inference_steps: Any) -> None:
    """Refuse non-integer or non-positive ``num_samples`` / ``num_inference_steps`` and a ``generator`` that is not a ``torch.Generator``."""
    check_int("num_samples", num_samples, minimum=1, fix="draws per input, e.g. num_samples=5")
    check_int("num_inference_steps", num_inference_steps, minimum=1, optional=True,
              fix="sampler steps, e.g. 10, or None for config.num_inference_steps")
    check_generator(generator)


def repeat_batch(inputs: Mapping[str, Any], repeats: int, batch_size: int) -> dict[str, Any]:
    """Repeat every tensor input whose first dimension is the batch ``repeats`` times, row by row."""
    if repeats == 1:
        return dict(inputs)
    return {
        key: value.repeat_interleave(repeats, dim=0)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size
        else value
        for key, value in inputs.items()
    }


def batch_size_of(inputs: Mapping[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("No tensor input found: pass the backbone's inputs as keyword arguments (e.g. **tokenizer(...)).")


class ForwardWithInputNames:
    """``OCDWrapper.forward`` as a method whose signature also names the backbone's inputs.

    The forward takes the backbone's inputs as ``**inputs``; ``transformers.Trainer`` keeps only the
    dataset columns that the forward's signature names, so the bound method's ``__signature__`` lists
    the backbone's own input names (keyword-only) after OCD's arguments.
    """

    def __init__(self, function: Any) -> None:
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self.function
        return BoundForward(self.function.__get__(instance, owner))


class BoundForward:
    """A bound ``OCDWrapper.forward`` whose ``__signature__`` is its model's :meth:`OCDWrapper.forward_signature`."""

    def __init__(self, method: Any) -> None:
        self._method = method
        self.__func__, self.__self__ = method.__func__, method.__self__
        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(self, name, getattr(method, name))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._method(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return self.__self__.forward_signature()

    def __getattr__(self, name: str) -> Any:
        if name == "_method":  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self._method, name)


def input_parameters(backbone: nn.Module, exclude: Any = ()) -> list[inspect.Parameter]:
    """The named inputs of ``backbone.forward`` (not ``labels``, ``return_dict`` or ``exclude``), keyword-only."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, parameter in inspect.signature(backbone.forward).parameters.items()
        if parameter.kind in kinds and name not in ("labels", "return_dict", *exclude)
    ]


@dataclass
class OCDOutput(ModelOutput):
    """Output of an :class:`OCDWrapper` whose backbone's output has no ``logits`` field."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    draw_logits: torch.Tensor | None = None
    mean_network_logits: torch.Tensor | None = None


class OCDWrapper(GeneratorHubMixin, PreTrainedModel):
    """A backbone with an OCD hypernetwork on one of its ``nn.Linear`` layers.

    Build it with :meth:`attach` (a new, untrained hypernetwork) or :meth:`from_pretrained`.
    :meth:`save_pretrained` writes ``config.json`` and the hypernetwork's ``model.safetensors``
    only; the backbone is referenced by ``config.base_model_name_or_path``. Like a PEFT adapter, the
    backbone is frozen (``requires_grad_(False)``) when it is attached: only the hypernetwork trains
    (see :meth:`print_trainable_parameters`).
    """

    config_class = OCDConfig
    base_model_prefix = "ocd"
    # The forward's **inputs go to the backbone: transformers.Trainer must not add its loss kwargs.
    accepts_loss_kwargs = False

    def __init__(self, config: OCDConfig, backbone: nn.Module | None = None, strict_fingerprint: bool = True) -> None:
        super().__init__(config)
        if backbone is None:
            raise ValueError(
                "OCDWrapper needs its backbone: OCDWrapper(config, backbone), OCDWrapper.attach(backbone, target_module=...) "
                "or OCDWrapper.from_pretrained(path) (which loads config.base_model_name_or_path)."
            )
        self.target_name, self.target_layer = check_backbone(config, backbone, strict_fingerprint)
        self.backbone = backbone.eval().requires_grad_(False)
        config.fill_label_fields(backbone)
        input_names = [parameter.name for parameter in input_parameters(backbone)]
        main_input = getattr(backbone, "main_input_name", None)
        self.main_input_name = main_input if main_input in input_names or not input_names else input_names[0]
        # What predict() / predict_proba() tokenize texts with (from_setfit sets it; else loaded from the base model).
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.hypernetwork = OCDHypernetwork(config)
        device = next(backbone.parameters()).device
        self.hypernetwork.to(device)

    def _init_weights(self, module: nn.Module) -> None:
        """The backbone arrives initialised and diffusers initialises the denoiser: nothing to do."""

    @classmethod
    def attach(
        cls, backbone: nn.Module, target_module: str, example_inputs: Mapping[str, Any] | None = None, **config_kwargs: Any
    ) -> "OCDWrapper":
        """Attach a new (untrained) hypernetwork to the Linear of ``backbone`` matched by ``target_module``."""
        config = OCDConfig.from_backbone(backbone, target_module, example_inputs=example_inputs, **config_kwargs)
        return cls(config, backbone).eval()

    @classmethod
    def from_setfit(cls, setfit_model: Any, target_module: str = "head", **config_kwargs: Any) -> "OCDWrapper":
        """Attach a new hypernetwork to a trained ``setfit.SetFitModel`` (differentiable head).

        The SetFit model becomes a :class:`~ocd_hf.SetFitBackbone` (its weights copied, its predictions
        unchanged) and ``target_module`` (``"head"``, or a body layer such as
        ``"body.encoder.layer.5.output.dense"``) its target; the SetFit body's tokenizer is kept for
        :meth:`predict` and :meth:`predict_proba` on raw texts. ``config_kwargs`` go to :class:`OCDConfig`.
        """
        ocd = cls.attach(SetFitBackbone.from_setfit(setfit_model), target_module, **config_kwargs)
        ocd.tokenizer = tokenizer_from_setfit(setfit_model)
        return ocd

    def text_tokenizer(self) -> PreTrainedTokenizerBase:
        """:attr:`tokenizer`, else the tokenizer saved with the backbone (``base_model_name_or_path`` at its revision)."""
        if self.tokenizer is None:
            if not self.config.base_model_name_or_path:
                raise ValueError(
                    "No tokenizer to turn texts into inputs: pass tokenizer=, set ocd.tokenizer, or build the model with "
                    "OCDWrapper.from_setfit(setfit_model)."
                )
            self.tokenizer = AutoTokenizer.from_pretrained(self.config.base_model_name_or_path, revision=self.config.base_model_revision)
        return self.tokenizer

    @torch.no_grad()
    def predict_proba(
        self,
        inputs: str | Sequence[str],
        batch_size: int = 32,
        as_numpy: bool = False,
        num_samples: int = 5,
        generator: torch.Generator | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> Any:
        """Class probabilities of the OCD ensemble (``num_samples`` draws per text) for raw texts, like
        ``SetFitModel.predict_proba``: ``(len(inputs), num_labels)``, or ``(num_labels,)`` for one string.

        Texts are tokenized with ``tokenizer`` (default :meth:`text_tokenizer`) in batches of ``batch_size``.
        """
        if self.config.task != "classification":
            raise ValueError("predict_proba is for classification backbones; call the model for regression outputs.")
        check_int("batch_size", batch_size, minimum=1, fix="texts tokenized and scored per forward, e.g. batch_size=32")
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        tokenizer = tokenizer or self.text_tokenizer()
        probabilities = []
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            if isinstance(self.backbone, SetFitBackbone):
                encoded = self.backbone.tokenize(batch, tokenizer)  # truncated as the sentence-transformers body does
            else:
                encoded = tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(self.device)
            probabilities.append(self(**encoded, num_samples=num_samples, generator=generator).logits.softmax(-1))
        result = torch.cat(probabilities) if probabilities else torch.empty(0, self.config.output_dim)
        result = result.cpu().numpy() if as_numpy else result
        return result[0] if single else result

    def predict(
        self,
        inputs: str | Sequence[str],
        batch_size: int = 32,
        as_numpy: bool = False,
        use_labels: bool = True,
        num_samples: int = 5,
        generator: torch.Generator | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> Any:
        """Predicted classes of raw texts, like ``SetFitModel.predict``: the label names (``config.id2label``,
        copied from the SetFit model's ``labels``) when ``use_labels`` and the labels have names, else the
        class ids (a tensor, or an array with ``as_numpy``); one label for one string. The class is the
        argmax of :meth:`predict_proba` (the OCD ensemble of ``num_samples`` draws).
        """
        probabilities = self.predict_proba(
            [inputs] if isinstance(inputs, str) else inputs, batch_size, False, num_samples, generator, tokenizer
        )
        ids = probabilities.argmax(-1)
        names = [self.config.id2label[index] for index in range(self.config.num_labels)]
        named = any(name not in (str(index), f"LABEL_{index}") for index, name in enumerate(names))
        if use_labels and named:
            result: Any = [names[int(index)] for index in ids]
        else:
            result = ids.cpu().numpy() if as_numpy else ids
        return result[0] if isinstance(inputs, str) else result

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as PEFT's: the hypernetwork's trainable parameters, and
        every parameter of the backbone and the hypernetwork."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: X || all params: Y || trainable%: Z`` (PEFT's format)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")

    def train(self, mode: bool = True) -> "OCDWrapper":
        """Set the hypernetwork's mode; the frozen backbone always stays in eval mode (no dropout in ``I(x)``)."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ----- the three stages of a forward pass -------------------------------------------------

    @torch.no_grad()
    def conditioning(self, **inputs: Any) -> Conditioning:
        """``I(x)`` from one unmodified forward pass of the backbone (no gradients). Non-finite float inputs are refused,
        and inputs the backbone cannot run on raise a ``ValueError`` naming them (their shapes and dtypes)."""
        check_finite_inputs(inputs)
        return capture_conditioning(self.backbone, self.target_layer, inputs)

    @torch.no_grad()
    def generate_deltas(
        self,
        cond: Conditioning,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        rho: float | None = None,
        inputs: Mapping[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate ``num_samples`` scaled deltas ``ρ̂·Δ̂`` per input.

        Returns ``(batch, num_samples, out, in)``, or in factorised mode the left factors
        ``(batch, num_samples, out)`` (see :meth:`materialise_deltas`). ``rho`` replaces the scale
        net's ``ρ̂`` by a constant (the *no scale* ablation). A ``"regression"`` generator gives the
        same prediction for every draw (not renormalised: its size carries its certainty). A
        ``"label"`` generator returns full deltas combined from :meth:`label_deltas` with its
        ``q(y | I(x))``; it needs the backbone ``inputs`` unless the target layer is the model's head.
        ``noise`` ``(batch, num_samples, *sample shape)`` is the diffusion sampler's starting noise instead
        of a draw from ``generator`` (what lets an evaluation split a batch into chunks and draw the same deltas).
        """
        check_generation_arguments(num_samples, generator, num_inference_steps)
        if rho is not None:
            check_number("rho", rho, positive=True, fix="a constant scale for every delta, or None for the scale net's")
        self.check_conditioning(cond)
        hypernetwork = self.hypernetwork
        with self.hypernetwork_eval():
            embedding = hypernetwork.embed_condition(hypernetwork.condition_values(cond))
            if self.config.generator_type == "label":
                if rho is not None:
                    raise ValueError("A 'label' generator has no scale net: its deltas are exact, so rho= does not apply.")
                return self.combine_label_deltas(hypernetwork.label_logits(embedding).softmax(-1), cond, inputs, num_samples, generator)
            scale = hypernetwork.predict_rho(embedding) if rho is None else torch.full_like(embedding[:, 0], rho)
            if self.config.generator_type == "regression":
                deltas = hypernetwork.regress(embedding).repeat_interleave(num_samples, dim=0)
            else:
                if noise is not None:
                    expected = (embedding.shape[0], num_samples, *hypernetwork.denoiser_sample_shape())
                    if tuple(noise.shape) != expected:
                        raise ValueError(f"noise must have shape (batch, num_samples, *sample shape) = {expected}, got {tuple(noise.shape)}.")
                    noise = noise.flatten(0, 1)
                embedding = embedding.repeat_interleave(num_samples, dim=0)
                deltas = hypernetwork.sample(embedding, generator=generator, num_inference_steps=num_inference_steps, noise=noise)
            scale = scale.repeat_interleave(num_samples, dim=0)
        deltas = deltas * scale.view(-1, *([1] * (deltas.dim() - 1)))
        return deltas.view(-1, num_samples, *deltas.shape[1:])

    def check_conditioning(self, cond: Conditioning) -> None:
        """Refuse a conditioning ``I(x)`` whose components do not have the widths this hypernetwork was made for."""
        values = cond.components()
        for component, size in self.config.condition_sizes.items():
            value = values.get(component)
            if value is None or value.dim() != 2 or value.shape[1] != size:
                shape = None if value is None else tuple(value.shape)
                raise ValueError(
                    f"The conditioning's {component!r} component has shape {shape}, but this hypernetwork expects (batch, {size}): "
                    f"the conditioning comes from another layer or backbone. Build it with this model's conditioning(**inputs)."
                )

    def overfit_settings(self) -> dict[str, Any]:
        """The single-sample fine-tuning of the harvest (``config.harvest_config``; defaults Adam, lr 5e-4, 3 steps)."""
        return finetune_settings(self.config.harvest_config)

    def label_deltas(
        self, cond: Conditioning, inputs: Mapping[str, Any] | None = None, settings: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """The exact delta ``Δ(x, y)`` of the harvest's fine-tuning for every sample and every label,
        ``(batch, output_dim, out, in)`` (classification).

        ``settings`` (``optimizer``, ``lr``, ``steps``) default to :meth:`overfit_settings`. A head
        needs only ``cond``; any other layer re-runs the backbone on ``inputs`` repeated per label.
        """
        if self.config.task != "classification":
            raise ValueError("Deltas per label are defined for classification backbones only.")
        loss = (self.config.harvest_config or {}).get("loss", "cross_entropy")
        if loss != "cross_entropy":
            raise ValueError(
                f"The deltas were harvested with the loss {loss!r}; deltas per label can only be recomputed for the "
                "default cross-entropy. Harvest with the task loss to use them."
            )
        settings = {**self.overfit_settings(), **(settings or {})}
        classes, batch = self.config.output_dim, cond.raw_input.shape[0]
        every_label = torch.arange(classes, device=cond.raw_input.device).repeat(batch)
        if cond.target_is_output:
            base = model_output_tensor(cond.outputs)
            result = overfit_head_deltas(
                cond.raw_input.repeat_interleave(classes, dim=0), base.repeat_interleave(classes, dim=0), every_label, **settings
            )
        elif inputs is None:
            raise ValueError(
                f"Deltas per label for {self.target_name!r}, which is not the model's head, re-run the backbone: pass inputs=."
            )
        else:
            result = overfit_deltas(self.backbone, self.target_layer, repeat_batch(inputs, classes, batch), every_label, **settings)
        return result.deltas.view(batch, classes, *self.config.weight_shape)

    def combine_label_deltas(
        self,
        probabilities: torch.Tensor,
        cond: Conditioning,
        inputs: Mapping[str, Any] | None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(batch, num_samples, out, in)`` deltas from label probabilities ``(batch, classes)``: their
        expectation ``Σ_y q(y) Δ(x, y)`` repeated, or one ``Δ(x, y)`` with ``y ~ q`` per draw
        (``config.label_combination``)."""
        per_label = self.label_deltas(cond, inputs)
        probabilities = probabilities.to(per_label.dtype)
        if self.config.label_combination == "expectation":
            mean = torch.einsum("bc,bcoi->boi", probabilities, per_label)
            return mean.unsqueeze(1).expand(-1, num_samples, -1, -1).contiguous()
        labels = torch.multinomial(probabilities, num_samples, replacement=True, generator=generator)
        return per_label[torch.arange(per_label.shape[0], device=labels.device).unsqueeze(1), labels]

    def full_deltas(self, generated: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Full ``(batch, k, out, in)`` deltas from :meth:`generate_deltas`' output (its left factors in
        factorised mode; a no-op in full mode). Not :func:`ocd_hf.materialise_deltas`, which reads dataset rows."""
        if generated.dim() == 4:
            return generated
        return expand_factors(generated, cond.raw_input, self.config.factor_rule)

    def materialise_deltas(self, deltas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Former name of :meth:`full_deltas` (it shared its name with :func:`ocd_hf.materialise_deltas`)."""
        warnings.warn("OCDWrapper.materialise_deltas is renamed full_deltas.", FutureWarning, stacklevel=2)
        return self.full_deltas(deltas, cond)

    def forward_with_deltas(self, deltas: torch.Tensor, **inputs: Any) -> Any:
        """Run the backbone with ``θ + Δ_b`` at the target layer for sample ``b``.

        ``deltas`` is ``(batch, out, in)``, or ``(batch, out)`` factors in factorised mode.
        """
        with inject_deltas(self.target_layer, deltas, self.config.factor_rule):
            return self.backbone(**inputs)

    def predict_with_deltas(self, cond: Conditioning, deltas: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Model outputs ``(batch, k, -1)`` for ``k`` deltas per input (``(batch, k, ...)`` from :meth:`generate_deltas`).

        When the target layer's output is the model output (a head) this is the base output plus
        ``x Δᵀ``, with no second backbone pass; otherwise the backbone runs once over
        ``batch × k`` rows with the deltas injected.
        """
        batch, k = deltas.shape[:2]
        if cond.target_is_output:
            base = model_output_tensor(cond.outputs)
            raw = cond.raw_input.repeat_interleave(k, dim=0)
            shift = delta_shift(raw, deltas.flatten(0, 1), self.config.factor_rule)
            return (base.repeat_interleave(k, dim=0) + shift.to(base.dtype)).reshape(batch, k, -1)
        outputs = self.forward_with_deltas(deltas.flatten(0, 1), **repeat_batch(inputs, k, batch))
        return model_output_tensor(outputs).reshape(batch, k, -1)

    @contextlib.contextmanager
    def hypernetwork_eval(self) -> Iterator[None]:
        """Sample with dropout/normalisation in eval mode (the official code forgot), then restore the mode."""
        was_training = self.hypernetwork.training
        self.hypernetwork.eval()
        try:
            yield
        finally:
            self.hypernetwork.train(was_training)

    def ensemble(self, draws: torch.Tensor) -> torch.Tensor:
        """Combine ``(batch, k, ...)`` draws: log of the mean probability, or the mean prediction."""
        if self.config.task == "classification":
            return torch.logsumexp(torch.log_softmax(draws, -1), dim=1) - math.log(draws.shape[1])
        return draws.mean(1)

    def forward_signature(self) -> inspect.Signature:
        """The signature of :meth:`forward`: OCD's arguments, then the backbone's named inputs (keyword-only), then ``**inputs``."""
        signature = inspect.signature(type(self).forward)
        own = signature.parameters
        parameters = [p for name, p in own.items() if name != "self" and p.kind != inspect.Parameter.VAR_KEYWORD]
        return signature.replace(parameters=[*parameters, *input_parameters(self.backbone, exclude=own), own["inputs"]])

    @ForwardWithInputNames
    def forward(
        self,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        return_draws: bool = False,
        return_mean_network: bool = False,
        num_inference_steps: int | None = None,
        **inputs: Any,
    ) -> ModelOutput:
        """Predict with a per-sample generated weight shift at the target layer.

        One base pass captures ``I(x)``; ``num_samples`` deltas per input are sampled in one batch
        and applied in one more batched pass (none for head layers). ``inputs`` are the backbone's (its
        forward's names appear in this method's signature, which ``transformers.Trainer`` reads to keep
        dataset columns). Returns the backbone's own
        output type when it has ``logits`` (else :class:`OCDOutput`) whose ``logits`` are the
        ensemble (log of the mean probabilities for classification, mean prediction for
        regression). With ``return_draws`` it also holds ``draw_logits`` ``(batch, k, ...)``; with
        ``return_mean_network``, ``mean_network_logits``: the prediction of the mean delta.
        """
        batch = batch_size_of(inputs)
        check_generation_arguments(num_samples, generator, num_inference_steps)
        if labels is not None and self.config.task == "classification":
            labels = check_class_labels(labels, self.config.output_dim)
            if labels.shape[0] != batch:
                raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {batch} inputs; pass one label per input.")
        cond = self.conditioning(**inputs)
        deltas = self.generate_deltas(cond, num_samples, generator, num_inference_steps, inputs=inputs)
        draws = self.predict_with_deltas(cond, deltas, inputs)
        logits = self.ensemble(draws)
        output_class = type(cond.outputs) if hasattr(cond.outputs, "logits") else OCDOutput
        result = output_class(logits=logits)
        if labels is not None:
            result["loss"] = self.loss(logits, labels)
        if return_draws:
            result["draw_logits"] = draws
        if return_mean_network:
            mean = self.predict_with_deltas(cond, deltas.mean(1, keepdim=True), inputs)
            result["mean_network_logits"] = mean[:, 0]
        return result

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of (log-)ensemble logits for classification, MSE for regression."""
        if self.config.task == "classification":
            return nn.functional.cross_entropy(logits, labels.view(-1).long())
        return nn.functional.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))

    # ----- saving and loading -----------------------------------------------------------------

    def hypernetwork_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that are saved: the hypernetwork's only, contiguous, on CPU."""
        return {k: v.detach().cpu().contiguous() for k, v in self.hypernetwork.state_dict().items()}

    def save_files(self, save_directory: str | os.PathLike, model_card_kwargs: Mapping[str, Any] | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` (the hypernetwork only, never the backbone) and ``README.md``.

        ``model_card_kwargs`` are fields of :class:`~ocd_hf.GeneratorCardData` (``model_id``,
        ``eval_results``, ``results_table``, ``training_config``, ``datasets``, ``license``, ...).
        :meth:`save_pretrained` (which can also push) calls this.
        """
        card_data = GeneratorCardData.from_kwargs(model_card_kwargs)
        save_generator(save_directory, self.config, self.hypernetwork_state_dict())
        write_model_card(self, save_directory, card_data)

    def model_card(self, **model_card_kwargs: Any) -> ModelCard:
        """The model card of this hypernetwork; keyword arguments are fields of :class:`~ocd_hf.GeneratorCardData`."""
        return ocd_card(self, GeneratorCardData.from_kwargs(model_card_kwargs))

    def default_commit_message(self) -> str:
        return f"Upload OCD hypernetwork for {self.config.target_module}"

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        backbone: nn.Module | None = None,
        config: OCDConfig | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        strict_fingerprint: bool = True,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        **backbone_kwargs: Any,
    ) -> "OCDWrapper":
        """Load a saved hypernetwork from a local directory or a Hub repo and attach it to ``backbone``.

        Files come from the directory (its ``subfolder``, if given), else from the Hub cache or the Hub
        (the cache only when ``HF_HUB_OFFLINE=1`` or ``local_files_only``). On the Hub the revision is
        resolved once: ``config.json`` and ``model.safetensors`` come from the same commit. Missing repos,
        revisions and files raise the ``huggingface_hub`` error with a message saying what is missing. The weights are read and
        checked before anything is built: a corrupt or truncated file raises ``ValueError`` and no
        model is returned. Without ``backbone`` the backbone named in the config
        (``base_model_class`` from ``base_model_name_or_path`` at ``base_model_revision``) is
        loaded with ``backbone_kwargs``. A backbone whose target layer is missing, of another
        shape, or holds other weights is refused, and so is a config recording no
        ``base_layer_fingerprint`` (``strict_fingerprint=False`` downgrades these two checks to
        warnings). A ``model.safetensors`` whose sha256 differs from the ``weights_sha256`` in the
        config is refused; a config without one (saved by an older version) loads with a warning.
        """
        if model_args:
            raise TypeError("OCDWrapper.from_pretrained takes no positional arguments besides the path.")
        hub_kwargs = {
            "revision": revision, "cache_dir": cache_dir, "token": token, "local_files_only": local_files_only,
            "force_download": force_download,
        }
        config, state, weights_file = read_generator_files(
            OCDConfig, pretrained_model_name_or_path, config=config, subfolder=subfolder, **hub_kwargs
        )
        if not config.base_layer_fingerprint:
            message = (
                f"The config of {pretrained_model_name_or_path} has no base_layer_fingerprint: nothing shows that the backbone's "
                f"{config.target_module!r} holds the weights the hypernetwork was trained on. Save the model again from a config "
                "made by OCDConfig.from_backbone(...) (which records it), or pass strict_fingerprint=False to load it anyway."
            )
            if strict_fingerprint:
                raise ValueError(message)
            logger.warning(message)
        if backbone is None:
            backbone = load_backbone(config, **backbone_kwargs)
        model = cls(config, backbone, strict_fingerprint=strict_fingerprint)
        model.load_hypernetwork_state(state, source=weights_file)
        model.eval()
        return model

    def load_hypernetwork_state(self, state: Mapping[str, torch.Tensor], source: str | os.PathLike = "the state dict") -> None:
        """Load a hypernetwork state dict, refusing missing, unexpected or misshapen tensors (nothing is loaded then)."""
        load_checked_state(self.hypernetwork, state, source)


def load_backbone(config: OCDConfig, **kwargs: Any) -> nn.Module:
    """Load the backbone named in ``config`` (``base_model_name_or_path`` at ``base_model_revision``)."""
    if not config.base_model_name_or_path:
        raise ValueError("The config names no base model (base_model_name_or_path is empty): pass backbone=... explicitly.")
    kwargs.setdefault("revision", config.base_model_revision)
    return load_pretrained_backbone(config.base_model_name_or_path, config.base_model_class or "", **kwargs)
