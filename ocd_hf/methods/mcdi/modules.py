"""The Mc-Di denoiser ``ε_φ(x_s, s, c)`` over a classification head ``(N, d+1)``, equivariant in the labels.

One token per head row ``j`` (its weights and bias), built with the prototype ``p_j`` of class ``j``
(the mean support embedding of that class): ``[x_j, p_j, x_j[:d] ⊙ p_j]`` projected to the hidden
size, plus the task context (the mean prototype, projected) and the time embedding (diffusers'
``Timesteps`` + ``TimestepEmbedding``). Pre-norm transformer blocks attend across the rows, with no
position encoding: permuting the classes permutes the tokens and hence the output rows, exactly.
The output of each row is ``row_out(h_j) + a_j [p_j, 0] + b_j [p̄, 0] + c_j x_j`` with per-row scalar gates
``(a_j, b_j, c_j)`` read from ``h_j``: the hidden size (256) is smaller than the embedding (384), so without
these paths a row could only leave a 256-dimensional subspace, while a head row is mostly a class prototype
minus the task's mean (measured: without them the generator learned nothing on MiniLM embeddings).
The blocks are written out (attention as two ``einsum`` s) rather than ``nn.TransformerEncoder``, so
that ``torch.func.vmap`` over stacked copies of the weights (REPTILE's inner loops) runs batched:
vmap has no batching rule for PyTorch's fused CPU attention kernel and would fall back to a loop.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from torch.nn import functional as F

# Step indices 1..T are spread over diffusers' usual 0..1000 range before the sinusoidal embedding.
TIMESTEP_RANGE = 1000.0


class RowAttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention across the rows and a GELU feed-forward, both residual."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attention_out = nn.Linear(hidden_size, hidden_size)
        self.feedforward_norm = nn.LayerNorm(hidden_size)
        self.feedforward = nn.Sequential(nn.Linear(hidden_size, intermediate_size), nn.GELU(), nn.Linear(intermediate_size, hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(batch, rows, hidden)``."""
        query, key, value = self.qkv(self.attention_norm(tokens)).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)
        scores = torch.einsum("brhc,bshc->bhrs", query, key) * query.shape[-1] ** -0.5
        attended = torch.einsum("bhrs,bshc->brhc", scores.softmax(-1), value).flatten(-2)
        tokens = tokens + self.attention_out(attended)
        return tokens + self.feedforward(self.feedforward_norm(tokens))


class HeadDenoiser(nn.Module):
    """``ε_φ`` for heads ``(batch, N, d+1)`` at steps ``(batch,)`` given class prototypes ``(batch, N, d)``."""

    def __init__(
        self, embedding_dim: int, hidden_size: int = 256, num_layers: int = 3, num_heads: int = 4, intermediate_size: int = 512,
        num_timesteps: int = 21,
    ) -> None:
        super().__init__()
        self.num_timesteps = num_timesteps
        self.row_in = nn.Linear(3 * embedding_dim + 1, hidden_size)
        self.context_in = nn.Linear(embedding_dim, hidden_size)
        self.time_proj = Timesteps(hidden_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(hidden_size, hidden_size)
        self.input_norm = nn.LayerNorm(hidden_size)
        self.blocks = nn.ModuleList(RowAttentionBlock(hidden_size, num_heads, intermediate_size) for _ in range(num_layers))
        self.output_norm = nn.LayerNorm(hidden_size)
        self.row_out = nn.Linear(hidden_size, embedding_dim + 1)
        self.gates = nn.Linear(hidden_size, 3)  # per-row weights of p_j, the mean prototype and x_j in the output
        for layer in (self.row_out, self.gates):
            nn.init.zeros_(layer.weight)  # start by predicting no noise (as DiT does): a quiet, stable start
            nn.init.zeros_(layer.bias)

    def forward(self, heads: torch.Tensor, steps: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        weights = heads[..., :-1]
        rows = torch.cat([heads, prototypes, weights * prototypes], -1)
        time = self.time_embedding(self.time_proj(steps.reshape(-1).float() * (TIMESTEP_RANGE / self.num_timesteps)).to(heads.dtype))
        context = self.context_in(prototypes.mean(-2))
        tokens = self.input_norm(self.row_in(rows) + (context + time).unsqueeze(-2))
        for block in self.blocks:
            tokens = block(tokens)
        hidden = self.output_norm(tokens)
        gates = self.gates(hidden)
        mean_prototype = prototypes.mean(-2, keepdim=True).expand_as(prototypes)
        paths = torch.stack([F.pad(prototypes, (0, 1)), F.pad(mean_prototype, (0, 1)), heads], -1)  # (..., N, d+1, 3)
        return self.row_out(hidden) + (paths * gates.unsqueeze(-2)).sum(-1)


def class_prototypes(support: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean support embedding per class ``(B, N, d)`` from ``support`` ``(B, n, d)`` and ``labels`` ``(B, n)``."""
    one_hot = F.one_hot(labels.long(), num_classes).to(support.dtype)  # (B, n, N)
    return torch.bmm(one_hot.transpose(1, 2), support) / one_hot.sum(1).unsqueeze(-1)
