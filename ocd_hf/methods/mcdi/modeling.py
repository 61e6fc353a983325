"""``McDiHeadGenerator``: generate the classification head of a new few-shot task from its support
embeddings, by Mc-Di's deterministic sampler over the label-equivariant denoiser."""

from __future__ import annotations

from typing import Any, Callable

import torch
from huggingface_hub import ModelCard
from torch import nn
from transformers import PreTrainedModel

from ...cards import GeneratorCardData
from ...checks import check_generator, check_int
from ...fewshot import check_encoder, check_support
from ...modeling_utils import HeadGeneratorHubMixin
from .configuration import McDiConfig
from .diffusion import alpha_bars, loss_boundaries, sample_chain, sample_segments, segment_schedule
from .model_card import mcdi_card
from .modules import HeadDenoiser, class_prototypes

# (heads (B, N, d+1), steps (B,), prototypes (B, N, d)) -> noise (B, N, d+1): a HeadDenoiser or a functional call of one.
DenoiserFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def denoise_heads(denoiser: DenoiserFn, heads: torch.Tensor, steps: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``ε_φ`` for ``k`` noisy heads per task: ``heads`` ``(B, k, N, d+1)``, ``steps`` ``(B, k)``, ``prototypes`` ``(B, N, d)``."""
    batch, k = steps.shape
    repeated = prototypes.unsqueeze(1).expand(-1, k, -1, -1).flatten(0, 1)
    return denoiser(heads.flatten(0, 1), steps.flatten(), repeated).view(heads.shape)


class McDiHeadGenerator(HeadGeneratorHubMixin, PreTrainedModel):
    """A task-conditioned generator of classification heads ``(N, d+1)`` for a frozen encoder (Mc-Di).

    Build it from a :class:`~ocd_hf.methods.mcdi.McDiConfig` (untrained), with
    :func:`~ocd_hf.methods.mcdi.train_head_generator`, or with :meth:`from_pretrained`.
    """

    method_name = "Mc-Di"
    config_class = McDiConfig
    base_model_prefix = "mcdi"

    def __init__(self, config: McDiConfig) -> None:
        super().__init__(config)
        self.denoiser = HeadDenoiser(config.embedding_dim, num_timesteps=config.num_timesteps, **config.denoiser_config)
        self.register_buffer("alpha_bar", alpha_bars(config.scheduler_config), persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        """The denoiser initialises itself: nothing to do."""

    @torch.no_grad()
    def generate_heads(
        self,
        support_embeddings: torch.Tensor,
        support_labels: torch.Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        return_intermediates: bool = False,
        noise: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Generate ``num_samples`` heads for each task, all tasks and draws in one batched sampling loop.

        Args:
            support_embeddings: ``(N·K, d)`` for one task or ``(B, N·K, d)`` for ``B`` tasks of the same ``N·K``.
            support_labels: ``(N·K,)`` / ``(B, N·K)`` labels ``0..N-1``, every label present (row ``j`` of
                the head scores label ``j``).
            num_samples: draws per task (each from its own noise).
            generator: the noise's ``torch.Generator``.
            return_intermediates: also return the states at the segment boundaries ``s_i = T − iT/k``
                (Mc-Di's local targets; the last one is the head itself).
            noise: the starting noise ``x_T`` (shaped like the returned heads, in units of ``config.head_scale``)
                instead of drawing it, like diffusers pipelines' ``latents``.
            num_inference_steps: ``None`` runs the paper's deterministic chain through all ``T`` states; an
                integer runs the few-step sampler (strided jumps within each segment, see
                :mod:`~ocd_hf.methods.mcdi.diffusion`) with that many denoiser calls, a multiple of the
                number of segments (``k`` for Mc-Di, 1 for Mv-Di / Tw-Di). Fewer calls are faster but, with the
                generators trained so far, much less accurate (docs/task_generation.md).

        Returns:
            ``(num_samples, N, d+1)`` heads (weight columns then the bias), or ``(B, num_samples, N, d+1)``
            for a batch; with ``return_intermediates`` also the boundary states ``(..., k, N, d+1)``.
        """
        check_int("num_samples", num_samples, minimum=1, fix="draws per task, e.g. num_samples=1")
        check_int("num_inference_steps", num_inference_steps, minimum=1, optional=True, fix="None runs the paper's full chain")
        check_generator(generator)
        config = self.config
        segments = loss_boundaries(config.loss_type, config.num_timesteps, config.num_targets)
        if num_inference_steps is not None:  # checked before any work
            segment_schedule(config.num_timesteps, segments, num_inference_steps)
        batched = torch.as_tensor(support_embeddings).dim() == 3
        support, labels, num_classes = check_support(
            support_embeddings, support_labels, self.config.embedding_dim, self.config.max_num_classes, config_name="McDiConfig"
        )
        parameter = next(self.denoiser.parameters())
        support = support.to(device=parameter.device, dtype=parameter.dtype)
        prototypes = class_prototypes(support, labels.to(parameter.device), num_classes).repeat_interleave(num_samples, 0)
        shape = (prototypes.shape[0], num_classes, self.config.embedding_dim + 1)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=parameter.device, dtype=parameter.dtype)
        else:
            expected = (support.shape[0], num_samples, *shape[1:]) if batched else (num_samples, *shape[1:])
            if tuple(noise.shape) != expected:
                raise ValueError(f"noise must have the shape of the heads, {expected}; got {tuple(noise.shape)}.")
            noise = noise.to(device=parameter.device, dtype=parameter.dtype).reshape(shape)
        was_training = self.training
        self.eval()
        try:
            denoise = lambda x, s: denoise_heads(self.denoiser, x, s, prototypes)  # noqa: E731
            if num_inference_steps is None:
                heads, states = sample_chain(denoise, noise, self.alpha_bar, config.boundaries)
            else:
                record = config.boundaries if return_intermediates else [config.boundaries[-1]]
                heads, states = sample_segments(denoise, noise, self.alpha_bar, segments, num_inference_steps, record)
        finally:
            self.train(was_training)
        heads, states = heads * self.config.head_scale, states * self.config.head_scale
        tasks = support.shape[0]
        heads, states = heads.view(tasks, num_samples, *shape[1:]), states.view(tasks, num_samples, -1, *shape[1:])
        if not batched:
            heads, states = heads[0], states[0]
        return (heads, states) if return_intermediates else heads

    def check_encoder(self, encoder: nn.Module | None = None, *, fingerprint: str | None = None, embedding_dim: int | None = None) -> None:
        """Refuse an encoder (or its ``fingerprint`` / ``embedding_dim``) other than the one the generator was trained for
        (:func:`ocd_hf.fewshot.check_encoder`)."""
        check_encoder(self.config, encoder, fingerprint=fingerprint, embedding_dim=embedding_dim)

    # ----- saving and loading: HeadGeneratorHubMixin, with this method's card ----------------

    def model_card(self, **model_card_kwargs: Any) -> ModelCard:
        """The model card; keyword arguments are fields of :class:`~ocd_hf.GeneratorCardData`."""
        return mcdi_card(self, GeneratorCardData.from_kwargs(model_card_kwargs))


def head_to_linear(head: torch.Tensor) -> nn.Linear:
    """``nn.Linear(d, N)`` holding a generated head ``(N, d+1)`` (weights, then the bias column)."""
    if head.dim() != 2 or head.shape[1] < 2:
        raise ValueError(f"head must be one (N, d+1) head, got shape {tuple(head.shape)}; index a draw first, e.g. heads[0].")
    linear = nn.Linear(head.shape[1] - 1, head.shape[0], device=head.device, dtype=head.dtype)
    with torch.no_grad():
        linear.weight.copy_(head[:, :-1])
        linear.bias.copy_(head[:, -1])
    return linear


def head_to_setfit_head(head: torch.Tensor, setfit_head_or_config: Any = None) -> Any:
    """A SetFit ``SetFitHead`` holding a generated head ``(N, d+1)``.

    ``setfit_head_or_config`` is an existing ``SetFitHead`` (its ``linear`` is overwritten; it must be
    ``Linear(d, N)`` with a bias), or a dict of ``SetFitHead`` keyword arguments (``temperature``, ...;
    ``in_features``/``out_features`` come from the head), or ``None``. ``SetFitHead`` divides its logits by
    ``temperature + eps``; the head is multiplied by it here so that the logits are the generated head's.
    """
    from setfit.modeling import SetFitHead  # the recipes extra: pip install "ocd-hf[recipes]"

    linear = head_to_linear(head)
    if isinstance(setfit_head_or_config, SetFitHead):
        target = setfit_head_or_config
        if target.linear.bias is None or target.linear.weight.shape != linear.weight.shape:
            raise ValueError(
                f"The SetFitHead has a Linear of weight {tuple(target.linear.weight.shape)} (bias: {target.linear.bias is not None}); "
                f"the head needs ({linear.out_features}, {linear.in_features}) with a bias. Build one with "
                f"SetFitHead(in_features={linear.in_features}, out_features={linear.out_features})."
            )
    else:
        settings = dict(setfit_head_or_config or {})
        if {"in_features", "out_features", "bias"} & set(settings):
            raise ValueError("in_features, out_features and bias come from the head; pass only the other SetFitHead arguments.")
        target = SetFitHead(in_features=linear.in_features, out_features=linear.out_features, **settings)
    scale = target.temperature + target.eps
    with torch.no_grad():
        target.linear.weight.copy_(linear.weight * scale)
        target.linear.bias.copy_(linear.bias * scale)
    return target


def head_to_setfit_model(head: torch.Tensor, model_body: Any, labels: list[str] | None = None, normalize_embeddings: bool = False) -> Any:
    """A working ``SetFitModel``: the frozen encoder ``model_body`` (a ``SentenceTransformer``, the one the
    generator was trained on; check it first with :meth:`McDiHeadGenerator.check_encoder`) with a generated head
    ``(N, d+1)`` as its differentiable head. ``labels`` names the classes in row order (``predict`` then returns
    them); ``normalize_embeddings`` must match how the support was embedded (all-MiniLM-L6-v2 normalises in its
    own module chain, so ``False`` is right for it).
    """
    from setfit import SetFitModel  # the recipes extra: pip install "ocd-hf[recipes]"

    if labels is not None and len(labels) != head.shape[0]:
        raise ValueError(f"labels names {len(labels)} classes but the head has {head.shape[0]} rows; pass one name per row, in row order.")
    setfit_head = head_to_setfit_head(head).to(next(model_body.parameters()).device)
    return SetFitModel(model_body=model_body, model_head=setfit_head, labels=labels, normalize_embeddings=normalize_embeddings)
