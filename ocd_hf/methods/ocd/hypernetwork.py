"""The OCD hypernetwork: condition encoders, a denoiser over the weight delta (a diffusers UNet
over the padded matrix, an MLP over the left factor of a rank-1 delta, or a transformer over the latent
tokens of a weight VAE of the delta's chunks), a scale net, and sampling
with a diffusers scheduler (DDIM by default, ``config.scheduler_class``); or, in place of the
diffusion, a deterministic regressor of the delta or a classifier over the labels whose exact deltas
are combined (``config.generator_type``)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn import functional as F

from ...checks import check_int
from ...target import Conditioning
from ...token_denoiser import TokenTransformerTrunk
from ...weight_vae import WeightVAE
from .configuration import OCDConfig, scheduler_class_from_name


def delta_scale(deltas: torch.Tensor, normalization: str) -> torch.Tensor:
    """Per-sample scale ``ρ`` of a batch of deltas ``(batch, ...)``: their RMS or their std."""
    flat = deltas.reshape(deltas.shape[0], -1).float()
    if normalization == "rms":
        return flat.pow(2).mean(1).sqrt()
    return flat.std(1)


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | None) -> dict[str, Any]:
    """The extra arguments of ``scheduler.step`` that it accepts: DDIM's ``eta=0`` (deterministic) and
    the ``generator`` of stochastic steps (DDPM, ancestral and SDE samplers), as diffusers' pipelines pass them."""
    parameters = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in parameters:
        kwargs["eta"] = 0.0
    if "generator" in parameters:
        kwargs["generator"] = generator
    return kwargs


class ConditionEncoder(nn.Module):
    """Standardises one conditioning component with stored statistics and embeds it with an MLP."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.net((values.to(self.mean.dtype) - self.mean) / self.std.clamp_min(1e-6))

    @torch.no_grad()
    def set_statistics(self, values: torch.Tensor) -> None:
        """Set the standardisation statistics from a ``(samples, in_dim)`` tensor of training inputs."""
        self.mean.copy_(values.mean(0))
        self.std.copy_(values.std(0, unbiased=False) if values.shape[0] > 1 else torch.ones_like(self.std))


class FactorDenoiser(nn.Module):
    """``ε(u_t, e, t)`` for the left factor ``u`` of rank-1 deltas: a residual MLP whose every block
    receives the time embedding plus the condition embedding (diffusers' sinusoidal ``Timesteps`` +
    ``TimestepEmbedding``, as the UNet does)."""

    def __init__(self, size: int, hidden_dim: int, num_layers: int, embed_dim: int) -> None:
        super().__init__()
        self.time_proj = Timesteps(embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(embed_dim, embed_dim)
        self.input = nn.Linear(size, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(hidden_dim), "emb": nn.Linear(embed_dim, hidden_dim), "mlp": nn.Linear(hidden_dim, hidden_dim)})
            for _ in range(num_layers)
        )
        self.output = nn.Linear(hidden_dim, size)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.time_embedding(self.time_proj(timesteps).to(sample.dtype)) + embedding)
        hidden = self.input(sample)
        for block in self.blocks:
            hidden = hidden + block["mlp"](F.silu(block["norm"](hidden) + block["emb"](emb)))
        return self.output(hidden)


class LatentTokenDenoiser(TokenTransformerTrunk):
    """``ε(z_t, e, t)`` over the latent tokens ``(batch, num_chunks, latent_size)`` of ``delta_mode="latent"``.

    Conditioned as OCD's other denoisers: the condition embedding ``e`` is added to the time embedding (diffusers'
    ``Timesteps`` + ``TimestepEmbedding``), and the sum is projected and added to every token, with a learned
    embedding of the chunk index; the shared trunk (:class:`~ocd_hf.token_denoiser.TokenTransformerTrunk`) attends
    across the tokens; a few small layers, so that sampling stays cheap on a CPU.
    """

    def __init__(self, latent_size: int, num_tokens: int, embed_dim: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int) -> None:
        super().__init__()
        self.time_proj = Timesteps(embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(embed_dim, embed_dim)
        self.token_in = nn.Linear(latent_size, hidden_size)
        self.condition = nn.Linear(embed_dim, hidden_size)
        self.positions = nn.Embedding(num_tokens, hidden_size)
        self.build_trunk(hidden_size, num_layers, num_heads, intermediate_size, latent_size)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.time_embedding(self.time_proj(timesteps).to(sample.dtype)) + embedding)
        index = torch.arange(sample.shape[1], device=sample.device)
        tokens = self.token_in(sample) + self.positions(index) + self.condition(emb).unsqueeze(1)
        return self.run_trunk(tokens)


class ConditionMLP(nn.Module):
    """A residual MLP from the condition embedding to ``size`` outputs: the regressor of the delta
    (``generator="regression"``) or the label classifier (``generator="label"``)."""

    def __init__(self, embed_dim: int, hidden_dim: int, num_layers: int, size: int) -> None:
        super().__init__()
        self.input = nn.Linear(embed_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)) for _ in range(num_layers)
        )
        self.output = nn.Linear(hidden_dim, size)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        hidden = self.input(F.silu(embedding))
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.output(F.silu(hidden))


class OCDHypernetwork(nn.Module):
    """``ε(Ω_t, I(x), t)`` and ``ρ(I(x))`` of the OCD paper.

    The condition ``e = E_i(input) + E_a(activation) + E_o(output)`` is added to the denoiser's
    time embedding (``class_embed_type="identity"`` of ``UNet2DModel``), as in the paper. In full
    mode the denoiser sees the normalised weight delta zero-padded to ``config.sample_size``; in
    factorised mode it sees the normalised left factor ``u`` ``(batch, out_features)``.

    ``generator="regression"`` replaces the denoiser by a :class:`ConditionMLP` predicting the
    normalised delta (or factor) directly; ``generator="label"`` by one predicting the logits of
    ``q(y | I(x))`` over the ``output_dim`` classes, without a scale net (its deltas are computed exactly).

    In latent mode (``delta_mode="latent"``) the normalised delta is cut into ``config.num_chunks`` tokens of
    ``config.chunk_size`` values (row-major), standardised per coordinate with the training deltas' ``token_mean`` /
    ``token_std``, and encoded by ``vae`` (:class:`~ocd_hf.weight_vae.WeightVAE`, the chunk index a position condition)
    to ``(num_chunks, latent_size)`` posterior means times ``config.latent_scale``: what the :class:`LatentTokenDenoiser`
    diffuses. Sampling decodes the latents of every draw in one batch.
    """

    def __init__(self, config: OCDConfig) -> None:
        super().__init__()
        self.config = config
        embed_dim = config.embed_dim
        dims = config.condition_sizes
        self.encoders = nn.ModuleDict(
            {name: ConditionEncoder(dims[name], config.condition_hidden_dim, embed_dim) for name in config.condition_components}
        )
        mlp = {"hidden_dim": config.factor_denoiser_config["hidden_dim"], "num_layers": config.factor_denoiser_config["num_layers"]}
        if config.generator_type == "label":
            self.label_head = ConditionMLP(embed_dim, size=config.output_dim, **mlp)
            return
        if config.generator_type == "regression":
            self.regressor = ConditionMLP(embed_dim, size=math.prod(self.denoiser_sample_shape()), **mlp)
        elif config.delta_mode == "factorised":
            self.denoiser = FactorDenoiser(config.out_features, **config.factor_denoiser_config)
        elif config.delta_mode == "latent":
            vae = {key: config.vae_config[key] for key in ("latent_size", "hidden_size", "num_layers")}
            self.vae = WeightVAE(config.chunk_size, num_positions=config.num_chunks, **vae)
            self.register_buffer("token_mean", torch.zeros(config.num_chunks, config.chunk_size))
            self.register_buffer("token_std", torch.ones(config.num_chunks, config.chunk_size))
            settings = {key: value for key, value in config.latent_denoiser_config.items() if key != "embed_dim"}
            self.denoiser = LatentTokenDenoiser(config.vae_config["latent_size"], config.num_chunks, embed_dim, **settings)
        else:
            self.denoiser = UNet2DModel(
                sample_size=config.sample_size,
                in_channels=1,
                out_channels=1,
                class_embed_type="identity",
                num_train_timesteps=config.scheduler_config["num_train_timesteps"],
                **config.denoiser_config,
            )
        self.scale_net = nn.Sequential(
            nn.Linear(embed_dim, config.condition_hidden_dim), nn.SiLU(), nn.Linear(config.condition_hidden_dim, 1)
        )

    @property
    def factorised(self) -> bool:
        return self.config.delta_mode == "factorised"

    @property
    def latent(self) -> bool:
        return self.config.delta_mode == "latent"

    def delta_tokens(self, deltas: torch.Tensor) -> torch.Tensor:
        """Normalised deltas ``(batch, out, in)`` as the VAE's standardised tokens ``(batch, num_chunks, chunk_size)``."""
        tokens = deltas.reshape(deltas.shape[0], self.config.num_chunks, self.config.chunk_size).to(self.token_mean.dtype)
        return (tokens - self.token_mean) / self.token_std

    def tokens_to_deltas(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`delta_tokens`: ``(batch, out, in)``."""
        return (tokens * self.token_std + self.token_mean).reshape(tokens.shape[0], *self.config.weight_shape)

    def encode_deltas(self, deltas: torch.Tensor) -> torch.Tensor:
        """The VAE posterior means of normalised deltas, times ``config.latent_scale``: ``(batch, num_chunks, latent_size)``."""
        return self.vae.encode(self.delta_tokens(deltas))[0] * self.config.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised deltas ``(batch, out, in)`` from scaled latents (all rows in one batch)."""
        return self.tokens_to_deltas(self.vae.decode(latents / self.config.latent_scale))

    @torch.no_grad()
    def reconstruct_deltas(self, deltas: torch.Tensor) -> torch.Tensor:
        """Deltas ``(batch, out, in)`` through the VAE (posterior mean, then the decoder), at their own scale ``ρ``:
        what the latent space keeps of them."""
        rho = delta_scale(deltas, self.config.delta_normalization).clamp_min(1e-12).view(-1, 1, 1)
        return self.decode_latents(self.encode_deltas(deltas / rho)) * rho

    @staticmethod
    def condition_values(cond: Conditioning) -> dict[str, torch.Tensor]:
        """The three pooled components of ``I(x)`` by name."""
        return cond.components()

    def embed_condition(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """``e = Σ E_c(I_c(x))`` over the configured components; ``(batch, embed_dim)``."""
        return sum(encoder(values[name]) for name, encoder in self.encoders.items())

    def predict_rho(self, embedding: torch.Tensor) -> torch.Tensor:
        """The scale ``ρ̂`` of each sample's delta (of its factor ``u`` in factorised mode), ``(batch,)``."""
        standardised = self.scale_net(embedding).squeeze(-1)
        return torch.exp(self.config.log_rho_mean + self.config.log_rho_std * standardised)

    def label_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits of ``q(y | I(x))`` ``(batch, output_dim)`` (``generator="label"``)."""
        return self.label_head(embedding)

    def regress(self, embedding: torch.Tensor) -> torch.Tensor:
        """The predicted normalised delta ``(batch, out, in)`` or factor ``(batch, out)`` (``generator="regression"``)."""
        return self.regressor(embedding).view(embedding.shape[0], *self.denoiser_sample_shape())

    def to_denoiser_space(self, deltas: torch.Tensor) -> torch.Tensor:
        """Normalised deltas ``(batch, out, in)`` (or factors ``(batch, out)``) as the denoiser (or the
        regressor, which needs no padding) sees them."""
        if self.factorised or self.config.generator_type == "regression":
            return deltas
        if self.latent:
            with torch.no_grad():  # the VAE is trained first, then frozen
                return self.encode_deltas(deltas)
        height, width = self.config.sample_size
        out_f, in_f = deltas.shape[-2:]
        return F.pad(deltas, (0, width - in_f, 0, height - out_f)).unsqueeze(1)

    def from_denoiser_space(self, samples: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_denoiser_space` (crops the zero padding)."""
        if self.factorised or self.config.generator_type == "regression":
            return samples
        if self.latent:
            return self.decode_latents(samples)
        out_f, in_f = self.config.weight_shape
        return samples[:, 0, :out_f, :in_f]

    def denoiser_sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample in denoiser space."""
        if self.factorised:
            return (self.config.out_features,)
        if self.latent:
            return (self.config.num_chunks, self.config.vae_config["latent_size"])
        return self.config.weight_shape if self.config.generator_type == "regression" else (1, *self.config.sample_size)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Predicted noise for noisy samples in denoiser space."""
        if self.factorised or self.latent:
            return self.denoiser(noisy, timesteps, embedding)
        return self.denoiser(noisy, timesteps, class_labels=embedding).sample

    def make_scheduler(self) -> SchedulerMixin:
        """The sampling scheduler: ``config.scheduler_class`` built from ``config.scheduler_config``."""
        return scheduler_class_from_name(self.config.scheduler_class).from_config(self.config.scheduler_config)

    def make_training_scheduler(self) -> DDPMScheduler:
        """The forward process training noises with: DDPM's ``add_noise`` (``√ᾱ_t x + √(1−ᾱ_t) ε``) over
        ``config.scheduler_config``'s betas, whatever the sampler, as diffusers' training scripts do (a
        sampler such as Euler works in ``x + σ ε`` and maps it back with ``scale_model_input``)."""
        return DDPMScheduler.from_config(self.config.scheduler_config)

    @torch.no_grad()
    def sample(
        self,
        embedding: torch.Tensor,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample one normalised delta (or factor) per row of ``embedding`` with ``config.scheduler_class``
        (DDIM with eta 0 by default), as a diffusers pipeline does: initial noise scaled by the scheduler's
        ``init_noise_sigma``, ``scale_model_input`` before every denoiser call, and ``generator`` for the
        noise of stochastic steps. ``noise`` ``(batch, *denoiser_sample_shape())`` is the starting noise
        instead of a draw from ``generator`` (like a diffusers pipeline's ``latents``).

        Returns ``(batch, out, in)`` deltas, or ``(batch, out)`` factors, rescaled to unit ``ρ``
        (the training normalisation).
        """
        scheduler = self.make_scheduler()
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        check_int("num_inference_steps", steps, minimum=1, fix="sampler steps, or None for config.num_inference_steps")
        scheduler.set_timesteps(steps, device=embedding.device)
        shape = (embedding.shape[0], *self.denoiser_sample_shape())
        if noise is None:
            sample = randn_tensor(shape, generator=generator, device=embedding.device, dtype=embedding.dtype)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} (one starting sample per row of the embedding), got {tuple(noise.shape)}.")
        else:
            sample = noise.to(device=embedding.device, dtype=embedding.dtype)
        sample = sample * scheduler.init_noise_sigma
        extra = step_kwargs(scheduler, generator)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            noise_pred = self.denoise(model_input, t.expand(sample.shape[0]), embedding)
            sample = scheduler.step(noise_pred, t, sample, **extra).prev_sample
        deltas = self.from_denoiser_space(sample)
        scale = delta_scale(deltas, self.config.delta_normalization).clamp_min(1e-12)
        return deltas / scale.view(-1, *([1] * (deltas.dim() - 1))).to(deltas.dtype)
