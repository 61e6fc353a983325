"""``D2NWGHeadGenerator``: generate the classification head of a new few-shot task from its support embeddings by
latent diffusion conditioned on a dataset code, decoded by the weight VAE (D2NWG, Soro et al., ICLR 2025); and
the choice among several generated heads (:func:`select_heads`)."""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub import ModelCard
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from ...cards import GeneratorCardData
from ...fewshot import check_encoder, check_support, head_logits
from ...modeling_utils import HeadGeneratorHubMixin
from .configuration import D2NWGConfig
from .diffusion import make_scheduler, sample_latents
from .model_card import d2nwg_card
from .modules import ENCODER_CLASSES, LatentDenoiser, WeightVAE, build_dataset_encoder, group_by_class

SELECTIONS = ("none", "support_loss", "query_topk")


class D2NWGHeadGenerator(HeadGeneratorHubMixin, PreTrainedModel):
    """A dataset-conditioned generator of classification heads ``(N, d+1)`` for a frozen encoder (D2NWG).

    Three components: ``vae`` (weight tokens <-> latents; ``None`` with ``use_vae=False``, the no-VAE ablation that
    diffuses the tokens themselves), ``dataset_encoder`` (class-grouped support -> dataset code) and ``denoiser`` (ε over
    the latents given the code), plus the per-coordinate ``weight_mean`` / ``weight_std`` of the training heads' tokens.
    Build it from a :class:`~ocd_hf.methods.d2nwg.D2NWGConfig` (untrained), with :func:`~ocd_hf.methods.d2nwg.train_d2nwg`,
    or with :meth:`from_pretrained`. Saved diffusers-style: ``model_index.json`` names the components, each in its own
    folder (``vae/``, ``dataset_encoder/``, ``denoiser/``) with its ``config.json`` and ``model.safetensors``; the root
    ``model.safetensors`` holds the statistics.
    """

    method_name = "D2NWG"
    config_class = D2NWGConfig
    base_model_prefix = "d2nwg"

    def __init__(self, config: D2NWGConfig) -> None:
        super().__init__(config)
        settings = {name: {key: value for key, value in saved.items() if key != "_class_name"}
                    for name, saved in self.component_configs(config).items()}
        self.vae = WeightVAE(**settings["vae"]) if config.use_vae else None
        self.dataset_encoder = build_dataset_encoder(**settings["dataset_encoder"])
        self.denoiser = LatentDenoiser(**settings["denoiser"])
        self.register_buffer("weight_mean", torch.zeros(config.statistics_shape))
        self.register_buffer("weight_std", torch.ones(config.statistics_shape))

    def _init_weights(self, module: nn.Module) -> None:
        """The components initialise themselves: nothing to do."""

    @classmethod
    def component_configs(cls, config: D2NWGConfig) -> dict[str, dict[str, Any]]:
        """The saved config of each component ``config`` builds: its class (``_class_name``) and the keyword arguments of
        :class:`~ocd_hf.methods.d2nwg.modules.WeightVAE` (absent without a VAE), :func:`~ocd_hf.methods.d2nwg.modules.build_dataset_encoder`
        and :class:`~ocd_hf.methods.d2nwg.modules.LatentDenoiser`."""
        vectorizer, code_size = config.vectorizer, config.encoder_config["code_size"]
        components: dict[str, dict[str, Any]] = {}
        if config.use_vae:
            positions = vectorizer.num_positions if config.vectorization == "layer" else 0
            components["vae"] = {"_class_name": WeightVAE.__name__, "width": vectorizer.width, "num_positions": positions, **config.vae_config}
        components["dataset_encoder"] = {
            "_class_name": ENCODER_CLASSES[config.encoder_type].__name__, "encoder_type": config.encoder_type, "embedding_dim": config.embedding_dim,
            "max_num_classes": config.max_num_classes, "max_shots": config.max_shots, **config.encoder_config,
        }
        # Token positions tell the denoiser which token is which; a row-aligned code does that itself (and must, to stay equivariant).
        positions = 0 if config.encoder_type == "row_aligned" else max(vectorizer.num_positions, config.max_num_classes)
        components["denoiser"] = {"_class_name": LatentDenoiser.__name__, "latent_size": config.latent_size, "condition_size": code_size,
                                  "num_positions": positions, **config.denoiser_config}
        return components

    # ----- the pieces -------------------------------------------------------------------------------

    def heads_to_tokens(self, heads: torch.Tensor) -> torch.Tensor:
        """Standardised tokens ``(..., L, width)`` of heads ``(..., N, d+1)``."""
        return (self.config.vectorizer.to_tokens(heads) - self.weight_mean) / self.weight_std

    def tokens_to_heads(self, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Heads ``(..., N, d+1)`` of standardised tokens: un-standardised, then un-vectorised."""
        return self.config.vectorizer.to_heads(tokens * self.weight_std + self.weight_mean, num_classes)

    def encode_heads(self, heads: torch.Tensor) -> torch.Tensor:
        """The VAE posterior means ``(..., L, latent_size)`` of heads (not yet multiplied by ``latent_scale``); without a VAE,
        the standardised tokens."""
        tokens = self.heads_to_tokens(heads)
        return tokens if self.vae is None else self.vae.encode(tokens)[0]

    def decode_latents(self, latents: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Heads ``(..., N, d+1)`` from VAE latents (in the VAE's units; without a VAE, standardised tokens)."""
        return self.tokens_to_heads(latents if self.vae is None else self.vae.decode(latents), num_classes)

    @torch.no_grad()
    def reconstruct_heads(self, heads: torch.Tensor) -> torch.Tensor:
        """Heads through the VAE (posterior mean, then the decoder): how much of a head the latent keeps (all of it without a VAE)."""
        return self.decode_latents(self.encode_heads(heads), heads.shape[-2])

    def encode_support(self, grouped: torch.Tensor) -> torch.Tensor:
        """The dataset code of class-grouped support ``(B, N, K, d)``: ``(B, code)``, or ``(B, N, code)`` row-aligned."""
        return self.dataset_encoder(grouped)

    # ----- generation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_heads(
        self,
        support_embeddings: torch.Tensor,
        support_labels: torch.Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate ``num_samples`` heads for each task, all tasks and draws in one batched sampling loop.

        Args:
            support_embeddings: ``(N·K, d)`` for one task or ``(B, N·K, d)`` for ``B`` tasks of the same ``N·K``; every
                class needs the same ``K`` (the dataset encoder reads ``(N, K, d)``).
            support_labels: ``(N·K,)`` / ``(B, N·K)`` labels ``0..N-1``, every label present (row ``j`` scores label ``j``).
            num_samples: draws per task.
            generator: draws the starting noise (and the DDPM sampler's per-step noise).
            noise: the starting latents ``(num_samples, L, latent_size)`` (``(B, num_samples, ...)`` for a batch) instead
                of drawing them, like diffusers pipelines' ``latents``.

        Returns:
            ``(num_samples, N, d+1)`` heads (weight columns then the bias), or ``(B, num_samples, N, d+1)`` for a batch.
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
        config = self.config
        batched = torch.as_tensor(support_embeddings).dim() == 3
        support, labels, num_classes = check_support(support_embeddings, support_labels, config.embedding_dim, config.max_num_classes,
                                                     config_name="D2NWGConfig")
        parameter = next(self.denoiser.parameters())
        support = support.to(device=parameter.device, dtype=parameter.dtype)
        grouped = group_by_class(support, labels.to(parameter.device), num_classes)
        tasks = support.shape[0]
        shape = (tasks * num_samples, config.vectorizer.num_tokens(num_classes), config.latent_size)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=parameter.device, dtype=parameter.dtype)
        else:
            expected = (tasks, num_samples, *shape[1:]) if batched else (num_samples, *shape[1:])
            if tuple(noise.shape) != expected:
                raise ValueError(f"noise must have the shape of the latents, {expected}; got {tuple(noise.shape)}.")
            noise = noise.to(device=parameter.device, dtype=parameter.dtype).reshape(shape)
        was_training = self.training
        self.eval()
        try:
            code = self.encode_support(grouped).repeat_interleave(num_samples, 0)
            scheduler = make_scheduler(config.scheduler_config, config.sampler)
            latents = sample_latents(lambda x, t: self.denoiser(x, t, code), noise, scheduler, config.inference_steps, generator)
            heads = self.decode_latents(latents / config.latent_scale, num_classes)
        finally:
            self.train(was_training)
        heads = heads.view(tasks, num_samples, num_classes, config.embedding_dim + 1)
        return heads if batched else heads[0]

    def check_encoder(self, encoder: nn.Module | None = None, *, fingerprint: str | None = None, embedding_dim: int | None = None) -> None:
        """Refuse an encoder (or its ``fingerprint`` / ``embedding_dim``) other than the one the generator was trained for
        (:func:`ocd_hf.fewshot.check_encoder`)."""
        check_encoder(self.config, encoder, fingerprint=fingerprint, embedding_dim=embedding_dim)

    # ----- saving and loading: HeadGeneratorHubMixin, with this method's card ----------------

    def model_card(self, **model_card_kwargs: Any) -> ModelCard:
        """The model card; keyword arguments are fields of :class:`~ocd_hf.GeneratorCardData`."""
        return d2nwg_card(self, GeneratorCardData.from_kwargs(model_card_kwargs))


# ----- choosing among generated heads -----------------------------------------------------------------


def head_accuracy(heads: torch.Tensor, items: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy ``(..., )`` of heads ``(..., N, d+1)`` on items ``(..., n, d)`` with labels ``(..., n)`` (leading dims shared)."""
    lead = heads.shape[:-2]
    logits = head_logits(heads.reshape(-1, *heads.shape[-2:]), items.reshape(-1, *items.shape[-2:]).to(heads.dtype))
    return (logits.argmax(-1) == labels.reshape(-1, labels.shape[-1]).to(logits.device)).float().mean(-1).view(lead)


def select_heads(
    heads: torch.Tensor,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    method: str = "none",
    *,
    query: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    top_k: int = 3,
) -> torch.Tensor:
    """Choose among ``S`` generated heads per task ``(B, S, N, d+1)``; returns ``(B, m, N, d+1)``.

    * ``"none"`` — the first draw (``m = 1``): the honest single-sample head.
    * ``"support_loss"`` — the draw with the lowest cross-entropy on the task's own support (``m = 1``): deployable.
    * ``"query_topk"`` — † the ``top_k`` draws with the highest accuracy on the *query* items with their labels
      (``m = top_k``; ties keep the earlier draw): the paper's protocol (top 3 of 50, the mean of their accuracies
      reported). It reads the test labels: report it only as a † row beside the honest one.
    """
    if method not in SELECTIONS:
        raise ValueError(f"method must be one of {SELECTIONS}, got {method!r}.")
    if heads.dim() != 4:
        raise ValueError(f"heads must be (B, S, N, d+1), got {tuple(heads.shape)}.")
    if method == "none":
        return heads[:, :1]
    samples = heads.shape[1]
    if method == "support_loss":
        items = support.unsqueeze(1).expand(-1, samples, -1, -1).flatten(0, 1)
        targets = support_labels.long().unsqueeze(1).expand(-1, samples, -1).flatten(0, 1)
        logits = head_logits(heads.flatten(0, 1), items)
        losses = F.cross_entropy(logits.transpose(1, 2), targets.to(logits.device), reduction="none").mean(-1).view(-1, samples)
        best = losses.argmin(1)
        return heads[torch.arange(len(heads)), best].unsqueeze(1)
    if query is None or query_labels is None:
        raise ValueError("method='query_topk' ranks the draws by query accuracy: pass query and query_labels (it uses the test labels, †).")
    if not 1 <= top_k <= samples:
        raise ValueError(f"top_k must be in 1..{samples} (the draws per task), got {top_k}.")
    accuracy = head_accuracy(heads, query.unsqueeze(1).expand(-1, samples, -1, -1), query_labels.unsqueeze(1).expand(-1, samples, -1))
    order = torch.sort(accuracy, dim=1, descending=True, stable=True).indices[:, :top_k]
    return heads[torch.arange(len(heads)).unsqueeze(1), order]
