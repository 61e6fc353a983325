"""The trunk that the latent-token denoisers of OCD (``delta_mode="latent"``) and D2NWG share.

Written here rather than taken from diffusers, whose transformers expect image or text latents of other shapes:
pre-norm transformer layers over the tokens, a final norm, and an output layer that starts at zero (so a fresh
denoiser predicts zero noise). The methods' denoisers subclass it and add their own conditioning; the attribute
names (``blocks``, ``output_norm``, ``token_out``) are the keys of saved checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenTransformerTrunk(nn.Module):
    """Base class: ``build_trunk`` creates the layers, ``run_trunk`` maps ``(B, L, hidden_size)`` tokens to outputs."""

    def build_trunk(self, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, output_size: int) -> None:
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden_size, num_heads, intermediate_size, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(num_layers)
        )
        self.output_norm = nn.LayerNorm(hidden_size)
        self.token_out = nn.Linear(hidden_size, output_size)
        nn.init.zeros_(self.token_out.weight)
        nn.init.zeros_(self.token_out.bias)

    def run_trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.token_out(self.output_norm(tokens))
