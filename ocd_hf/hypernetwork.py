"""The OCD hypernetwork: condition encoders, a diffusers UNet denoiser over the (padded) weight
delta, a scale net, and DDIM sampling."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn import functional as F

from .configuration_ocd import OCDConfig
from .target import Conditioning


def delta_scale(deltas: torch.Tensor, normalization: str) -> torch.Tensor:
    """Per-sample scale ``ρ`` of a batch of deltas ``(batch, ...)``: their RMS or their std."""
    flat = deltas.reshape(deltas.shape[0], -1).float()
    if normalization == "rms":
        return flat.pow(2).mean(1).sqrt()
    return flat.std(1)


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


class OCDHypernetwork(nn.Module):
    """``ε(Ω_t, I(x), t)`` and ``ρ(I(x))`` of the OCD paper.

    The condition ``e = E_i(input) + E_a(activation) + E_o(output)`` is added to the UNet's time
    embedding (``class_embed_type="identity"``), as in the paper. The denoiser sees the normalised
    weight delta zero-padded to ``config.sample_size``.
    """

    def __init__(self, config: OCDConfig) -> None:
        super().__init__()
        self.config = config
        embed_dim = config.denoiser_config["block_out_channels"][0] * 4
        dims = {"input": config.in_features, "activation": config.out_features, "output": config.output_dim}
        self.encoders = nn.ModuleDict(
            {name: ConditionEncoder(dims[name], config.condition_hidden_dim, embed_dim) for name in config.condition_components}
        )
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

    @staticmethod
    def condition_values(cond: Conditioning) -> dict[str, torch.Tensor]:
        """The three pooled components of ``I(x)`` by name."""
        return {"input": cond.layer_input, "activation": cond.layer_output, "output": cond.model_output}

    def embed_condition(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """``e = Σ E_c(I_c(x))`` over the configured components; ``(batch, embed_dim)``."""
        return sum(encoder(values[name]) for name, encoder in self.encoders.items())

    def predict_rho(self, embedding: torch.Tensor) -> torch.Tensor:
        """The scale ``ρ̂`` of each sample's delta, ``(batch,)``."""
        standardised = self.scale_net(embedding).squeeze(-1)
        return torch.exp(self.config.log_rho_mean + self.config.log_rho_std * standardised)

    def pad(self, deltas: torch.Tensor) -> torch.Tensor:
        """``(batch, out, in)`` -> ``(batch, 1, H, W)`` zero-padded for the UNet."""
        height, width = self.config.sample_size
        out_f, in_f = deltas.shape[-2:]
        return F.pad(deltas, (0, width - in_f, 0, height - out_f)).unsqueeze(1)

    def crop(self, samples: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pad`."""
        out_f, in_f = self.config.weight_shape
        return samples[:, 0, :out_f, :in_f]

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Predicted noise for padded noisy deltas ``(batch, 1, H, W)``."""
        return self.denoiser(noisy, timesteps, class_labels=embedding).sample

    def make_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler(**self.config.scheduler_config)

    @torch.no_grad()
    def sample(
        self,
        embedding: torch.Tensor,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
    ) -> torch.Tensor:
        """Sample one normalised delta per row of ``embedding`` with DDIM (eta 0).

        Returns ``(batch, out, in)`` deltas rescaled to unit ``ρ`` (the training normalisation).
        """
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(num_inference_steps or self.config.num_inference_steps, device=embedding.device)
        height, width = self.config.sample_size
        sample = randn_tensor(
            (embedding.shape[0], 1, height, width), generator=generator, device=embedding.device, dtype=embedding.dtype
        )
        for t in scheduler.timesteps:
            noise_pred = self.denoise(sample, t.expand(sample.shape[0]), embedding)
            sample = scheduler.step(noise_pred, t, sample, eta=0.0).prev_sample
        deltas = self.crop(sample)
        scale = delta_scale(deltas, self.config.delta_normalization).clamp_min(1e-12)
        return deltas / scale.view(-1, 1, 1).to(deltas.dtype)
