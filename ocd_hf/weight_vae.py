"""A weight VAE over vectorised weights split into tokens, shared by the methods that diffuse in its latent space
(D2NWG's heads, OCD's ``delta_mode="latent"`` deltas): layer-wise chunking (equal chunks, the chunk index a
position condition), the VAE and its two training losses (D2NWG §3.2, Eq. 1, and the authors' code).

Written for a CPU: the paper's VAE is LDM's image autoencoder behind a Linear (a weight vector reshaped to a 64×64
"image"); MLPs over chunk tokens do the same job at a fraction of the cost.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

VAE_LOSSES = ("paper", "code")


# ----- layer-wise chunking --------------------------------------------------------------------------------


def num_chunks(size: int, chunk_size: int) -> int:
    """How many chunks of ``chunk_size`` hold ``size`` values (the last one zero-padded)."""
    return math.ceil(size / chunk_size)


def to_chunks(values: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``(..., size)`` -> ``(..., num_chunks, chunk_size)``, zero-padding the last chunk."""
    padded = F.pad(values, (0, num_chunks(values.shape[-1], chunk_size) * chunk_size - values.shape[-1]))
    return padded.unflatten(-1, (-1, chunk_size))


def from_chunks(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., num_chunks, chunk_size)`` -> ``(..., size)``: the inverse of :func:`to_chunks` (padding dropped)."""
    return tokens.flatten(-2)[..., :size]


# ----- the weight VAE -------------------------------------------------------------------------------


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of ``sizes`` with SiLU between them."""
    layers: list[nn.Module] = []
    for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(size_in, size_out))
        if index < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class WeightVAE(nn.Module):
    """A VAE over weight tokens ``(..., L, width)`` with a diagonal Gaussian posterior ``(..., L, latent_size)``.

    With ``num_positions > 0`` (layer-wise chunks) a learned embedding of the chunk index is added to the first
    hidden layer of the encoder and of the decoder (the chunk index as a condition). ``logvar`` is the learned scalar
    log-variance of the ``code`` loss's L1 likelihood (LDM's ``LPIPSWithDiscriminator.logvar``); the ``paper`` loss
    does not use it.
    """

    def __init__(self, width: int, latent_size: int = 64, hidden_size: int = 512, num_layers: int = 2, num_positions: int = 0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"The VAE needs num_layers >= 1, got {num_layers}.")
        self.latent_size = latent_size
        self.encoder_in = nn.Linear(width, hidden_size)
        self.encoder = mlp([hidden_size] * num_layers + [2 * latent_size])
        self.decoder_in = nn.Linear(latent_size, hidden_size)
        self.decoder = mlp([hidden_size] * num_layers + [width])
        self.positions = nn.Embedding(num_positions, 2 * hidden_size) if num_positions else None
        self.logvar = nn.Parameter(torch.zeros(()))

    def _position(self, hidden: torch.Tensor, part: int) -> torch.Tensor:
        if self.positions is None:
            return hidden
        size = hidden.shape[-1]
        index = torch.arange(hidden.shape[-2], device=hidden.device)
        return hidden + self.positions(index)[:, part * size : (part + 1) * size]

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance, each ``(..., L, latent_size)``."""
        hidden = F.silu(self._position(self.encoder_in(tokens), 0))
        mean, logvar = self.encoder(hidden).chunk(2, -1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamps the same way

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Tokens ``(..., L, width)`` from latents ``(..., L, latent_size)``."""
        return self.decoder(F.silu(self._position(self.decoder_in(latents), 1)))


def vae_losses(vae: WeightVAE, tokens: torch.Tensor, loss_type: str, kl_weight: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The VAE's named losses per item (summed over the item's tokens ``(..., L, width)``; leading dims kept).

    ``paper`` (Eq. 1): ``Σ (ŵ − w)²`` (a unit-variance Gaussian likelihood) and ``β·KL``. ``code`` (LDM's
    ``LPIPSWithDiscriminator`` without the discriminator, as the authors train it): ``Σ |ŵ − w| / exp(s) + s`` with
    the VAE's learned scalar ``s = vae.logvar``, ``β·KL``, and ``1000 · mean (ŵ − w)²``. ``ŵ`` decodes a posterior sample.
    """
    if loss_type not in VAE_LOSSES:
        raise ValueError(f"vae_loss must be one of {VAE_LOSSES}, got {loss_type!r}.")
    mean, logvar = vae.encode(tokens)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    error = vae.decode(mean + (0.5 * logvar).exp() * noise) - tokens
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum((-2, -1))
    if loss_type == "paper":
        return {"reconstruction": error.pow(2).sum((-2, -1)), "kl": kl_weight * kl}
    nll = (error.abs() / vae.logvar.exp() + vae.logvar).sum((-2, -1))
    return {"nll": nll, "kl": kl_weight * kl, "mse": 1000.0 * error.pow(2).mean((-2, -1))}
