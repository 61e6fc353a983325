"""Contrastive alignment of dataset codes with the frozen VAE's weight latents (§3.3, Eq. 2).

Two losses, both per pair ``(P,)`` over a batch of ``P`` matched pairs (row ``i`` of ``codes`` belongs with row
``i`` of ``latents``; one checkpoint per task in a batch, so no pair is a false negative of another):

* :func:`info_nce_loss` — the paper's Eq. 2 as HyperCLIP (and CLIP) compute it: L2-normalised features,
  a learned temperature ``τ = exp(−logit_scale)``, symmetric (codes → latents and latents → codes).
* :func:`soft_target_loss` — what the authors' code trains: raw dot products (no normalisation), ``τ = 1``, and
  soft targets ``softmax((C Cᵀ + Z Zᵀ) / 2 · τ)`` in place of the identity, symmetric.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

ALIGNMENT_LOSSES = ("infonce", "soft")
# CLIP's initial temperature 0.07 and its cap on the logit scale (100).
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


def info_nce_loss(codes: torch.Tensor, latents: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE per pair ``(P,)``: ``½ [CE(s·ĉ_i·Ẑᵀ, i) + CE(s·ẑ_i·Ĉᵀ, i)]``, ``s = exp(logit_scale)`` (capped at 100)."""
    codes, latents = F.normalize(codes, dim=-1), F.normalize(latents, dim=-1)
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * codes @ latents.T
    target = torch.arange(len(codes), device=codes.device)
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2


def soft_target_loss(codes: torch.Tensor, latents: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The authors' symmetric soft-target loss per pair ``(P,)``: logits ``C Zᵀ / τ`` against ``softmax((C Cᵀ + Z Zᵀ) / 2 · τ)``."""
    logits = codes @ latents.T / temperature
    targets = F.softmax((codes @ codes.T + latents @ latents.T) / 2 * temperature, dim=-1)
    codes_loss = -(targets * F.log_softmax(logits, -1)).sum(-1)
    latents_loss = -(targets.T * F.log_softmax(logits.T, -1)).sum(-1)
    return (codes_loss + latents_loss) / 2


class AlignmentHeads(nn.Module):
    """The dataset encoder being aligned, with linear projections of its codes and of the VAE latents into a shared
    ``projection_size`` space and CLIP's learned logit scale. Only the encoder is kept after training."""

    def __init__(self, encoder: nn.Module, code_size: int, latent_size: int, projection_size: int, loss: str = "infonce") -> None:
        super().__init__()
        if loss not in ALIGNMENT_LOSSES:
            raise ValueError(f"alignment_loss must be one of {ALIGNMENT_LOSSES}, got {loss!r}.")
        self.encoder, self.loss = encoder, loss
        self.code_projection = nn.Linear(code_size, projection_size)
        self.latent_projection = nn.Linear(latent_size, projection_size)
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))

    def forward(self, codes: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The loss per pair ``(P,)`` of ``codes`` ``(P, code_size)`` and ``latents`` ``(P, latent_size)``."""
        codes, latents = self.code_projection(codes), self.latent_projection(latents)
        if self.loss == "infonce":
            return info_nce_loss(codes, latents, self.logit_scale)
        return soft_target_loss(codes, latents)
