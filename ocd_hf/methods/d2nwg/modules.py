"""D2NWG's networks: heads as tokens (model-wise, layer-wise chunked or one token per row), the dataset encoders over
class-grouped support embeddings, and the latent denoiser. The weight VAE, its losses and the chunking live in the
shared :mod:`ocd_hf.weight_vae` (OCD's latent deltas use them too) and are re-exported here.

Written for a CPU: the paper's VAE and UNet are LDM's image models behind a Linear (a weight vector reshaped
to a 64×64 "image"); a head is at most a few thousand numbers, so MLPs and a small transformer over latent
tokens do the same job at a fraction of the cost.

The Set Transformer blocks (MAB, SAB, ISAB, PMA; Lee et al., 2019) are built on ``nn.MultiheadAttention``;
no library ships them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...token_denoiser import TokenTransformerTrunk
from ...weight_vae import WeightVAE, from_chunks, mlp, num_chunks, to_chunks

__all__ = ["ENCODER_TYPES", "VECTORIZATIONS", "HeadVectorizer", "LatentDenoiser", "MLPEncoder", "RowAlignedEncoder",
           "SetTransformerEncoder", "WeightVAE", "build_dataset_encoder", "group_by_class", "mlp"]

VECTORIZATIONS = ("row", "model", "layer")
ENCODER_TYPES = ("row_aligned", "set_transformer", "mlp")


# ----- heads as tokens ------------------------------------------------------------------------------


class HeadVectorizer:
    """Heads ``(..., N, d+1)`` (weights, then the bias column) as tokens ``(..., L, width)`` and back.

    * ``"model"``: model-wise (§3.2): one token, ``W`` row-major then ``b``, zero-padded to ``max_num_classes`` rows.
    * ``"layer"``: layer-wise chunked (§3.2): ``W`` (padded, row-major) and ``b`` (padded) each zero-padded to a
      multiple of ``chunk_size`` and split into chunks; the chunk index is the token's position (a condition).
    * ``"row"``: one token per head row ``[w_j, b_j]``, no padding and no position: permuting the classes permutes
      the tokens (the row-aligned generator).
    """

    def __init__(self, mode: str, embedding_dim: int, max_num_classes: int, chunk_size: int | None = None) -> None:
        if mode not in VECTORIZATIONS:
            raise ValueError(f"vectorization must be one of {VECTORIZATIONS}, got {mode!r}.")
        if mode == "layer" and (chunk_size is None or chunk_size < 1):
            raise ValueError(f"vectorization='layer' needs chunk_size >= 1, got {chunk_size!r}.")
        self.mode, self.embedding_dim, self.max_num_classes, self.chunk_size = mode, embedding_dim, max_num_classes, chunk_size
        weights = max_num_classes * embedding_dim
        if mode == "layer":
            self.weight_chunks = num_chunks(weights, chunk_size)
            self.bias_chunks = num_chunks(max_num_classes, chunk_size)

    @property
    def width(self) -> int:
        """The size of one token."""
        if self.mode == "row":
            return self.embedding_dim + 1
        if self.mode == "model":
            return self.max_num_classes * (self.embedding_dim + 1)
        return self.chunk_size

    @property
    def num_positions(self) -> int:
        """How many token positions carry an index condition (0 for ``"row"``: rows are interchangeable)."""
        if self.mode == "row":
            return 0
        return 1 if self.mode == "model" else self.weight_chunks + self.bias_chunks

    def num_tokens(self, num_classes: int) -> int:
        """``L`` for an ``N``-way head."""
        return num_classes if self.mode == "row" else self.num_positions

    def to_tokens(self, heads: torch.Tensor) -> torch.Tensor:
        """``(..., N, d+1)`` -> ``(..., L, width)``."""
        if self.mode == "row":
            return heads
        padded = F.pad(heads, (0, 0, 0, self.max_num_classes - heads.shape[-2]))
        weights, bias = padded[..., :-1].flatten(-2), padded[..., -1]
        if self.mode == "model":
            return torch.cat([weights, bias], -1).unsqueeze(-2)
        return torch.cat([to_chunks(weights, self.chunk_size), to_chunks(bias, self.chunk_size)], -2)

    def to_heads(self, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``(..., L, width)`` -> ``(..., N, d+1)``: the inverse of :meth:`to_tokens` (padding dropped)."""
        if self.mode == "row":
            return tokens
        n, d = self.max_num_classes, self.embedding_dim
        if self.mode == "model":
            flat = tokens.squeeze(-2)
            weights, bias = flat[..., : n * d], flat[..., n * d :]
        else:
            weights = from_chunks(tokens[..., : self.weight_chunks, :], n * d)
            bias = from_chunks(tokens[..., self.weight_chunks :, :], n)
        heads = torch.cat([weights.unflatten(-1, (n, d)), bias.unsqueeze(-1)], -1)
        return heads[..., :num_classes, :]


# ----- Set Transformer blocks (Lee et al., 2019) ----------------------------------------------------------


class MAB(nn.Module):
    """Multihead attention block: ``H = LN(X + MHA(X, Y, Y))``, ``MAB(X, Y) = LN(H + rFF(H))``."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.norm_attention = nn.LayerNorm(hidden_size)
        self.feedforward = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.norm_feedforward = nn.LayerNorm(hidden_size)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        hidden = self.norm_attention(queries + self.attention(queries, keys, keys, need_weights=False)[0])
        return self.norm_feedforward(hidden + self.feedforward(hidden))


class SAB(nn.Module):
    """Set attention block ``MAB(X, X)``: permutation-equivariant."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.block = MAB(hidden_size, num_heads)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.block(items, items)


class ISAB(nn.Module):
    """Induced set attention block ``MAB(X, MAB(I, X))`` with ``num_inducing`` learned points: equivariant, linear in the set size."""

    def __init__(self, hidden_size: int, num_heads: int, num_inducing: int) -> None:
        super().__init__()
        self.inducing = nn.Parameter(torch.randn(1, num_inducing, hidden_size) / hidden_size**0.5)
        self.summarise = MAB(hidden_size, num_heads)
        self.broadcast = MAB(hidden_size, num_heads)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        summary = self.summarise(self.inducing.expand(items.shape[0], -1, -1), items)
        return self.broadcast(items, summary)


class PMA(nn.Module):
    """Pooling by multihead attention ``MAB(S, rFF(X))`` with one learned seed: ``(batch, set, h)`` -> ``(batch, h)``, invariant."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.seed = nn.Parameter(torch.randn(1, 1, hidden_size) / hidden_size**0.5)
        self.feedforward = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU())
        self.block = MAB(hidden_size, num_heads)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.block(self.seed.expand(items.shape[0], -1, -1), self.feedforward(items)).squeeze(1)


class SetPooler(nn.Module):
    """The Set Transformer ``T``: ISAB × ``num_layers`` then PMA then SAB × ``num_layers`` (the authors' encoder)."""

    def __init__(self, input_size: int, hidden_size: int, num_heads: int, num_inducing: int, num_layers: int) -> None:
        super().__init__()
        self.project = nn.Linear(input_size, hidden_size)
        self.encoder = nn.Sequential(*(ISAB(hidden_size, num_heads, num_inducing) for _ in range(num_layers)))
        self.pool = PMA(hidden_size, num_heads)
        self.decoder = nn.Sequential(*(SAB(hidden_size, num_heads) for _ in range(num_layers)))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """``(batch, set, input_size)`` -> ``(batch, hidden_size)``."""
        pooled = self.pool(self.encoder(self.project(items)))
        return self.decoder(pooled.unsqueeze(1)).squeeze(1)


# ----- dataset encoders over (B, N, K, d) -----------------------------------------------------------------


class SetTransformerEncoder(nn.Module):
    """The paper's dataset encoder ``z_D = T ∘ T(S)`` (§3.3): a Set Transformer within each class, then one
    across the classes. Invariant to the order of the classes, hence of the labels: it cannot tell which head
    row belongs to which class. Returns ``(B, code_size)``."""

    def __init__(self, embedding_dim: int, code_size: int, hidden_size: int = 128, num_heads: int = 2, num_inducing: int = 16,
                 num_layers: int = 2, **_: int) -> None:
        super().__init__()
        self.within = SetPooler(embedding_dim, hidden_size, num_heads, num_inducing, num_layers)
        self.across = SetPooler(hidden_size, hidden_size, num_heads, num_inducing, num_layers)
        self.out = nn.Linear(hidden_size, code_size)

    def forward(self, grouped: torch.Tensor) -> torch.Tensor:
        batch, classes = grouped.shape[:2]
        per_class = self.within(grouped.flatten(0, 1)).unflatten(0, (batch, classes))
        return self.out(self.across(per_class))


class RowAlignedEncoder(nn.Module):
    """One token per class: the within-class Set Transformer (plus the class prototype, projected), then SAB blocks
    across the classes with no pooling and no position. Permuting the classes permutes the tokens (equivariant), so a
    generator conditioned row by row on them makes row ``j`` for the class labelled ``j``. Returns ``(B, N, code_size)``."""

    def __init__(self, embedding_dim: int, code_size: int, hidden_size: int = 128, num_heads: int = 2, num_inducing: int = 16,
                 num_layers: int = 2, **_: int) -> None:
        super().__init__()
        self.within = SetPooler(embedding_dim, hidden_size, num_heads, num_inducing, num_layers)
        self.prototype = nn.Linear(embedding_dim, hidden_size)
        self.across = nn.Sequential(*(SAB(hidden_size, num_heads) for _ in range(num_layers)))
        self.out = nn.Linear(hidden_size, code_size)

    def forward(self, grouped: torch.Tensor) -> torch.Tensor:
        batch, classes = grouped.shape[:2]
        per_class = self.within(grouped.flatten(0, 1)).unflatten(0, (batch, classes)) + self.prototype(grouped.mean(2))
        return self.out(self.across(per_class))


class MLPEncoder(nn.Module):
    """The order-aware two-layer MLP of the authors' few-shot config (App. A.6): the ``(N, K, d)`` features, zero-padded
    (or cut) to ``(max_num_classes, max_shots, d)``, are read as ``d × (N·K)``; a linear layer mixes the ``N·K`` slots
    into ``h = slot_size`` per feature (zero-padding a slot is the paper's "dynamic linear layer" with that slot's weights
    dropped), and a second reads the flattened ``d·h`` into the code. Each slot (class ``j``, item ``k``) has its own
    weights: the code depends on the label order. Returns ``(B, code_size)``."""

    def __init__(self, embedding_dim: int, code_size: int, max_num_classes: int, max_shots: int, slot_size: int = 8, **_: int) -> None:
        super().__init__()
        self.max_num_classes, self.max_shots = max_num_classes, max_shots
        self.slots = nn.Linear(max_num_classes * max_shots, slot_size)
        self.out = nn.Linear(embedding_dim * slot_size, code_size)

    def forward(self, grouped: torch.Tensor) -> torch.Tensor:
        grouped = grouped[:, : self.max_num_classes, : self.max_shots]
        classes, shots = grouped.shape[1:3]
        grouped = F.pad(grouped, (0, 0, 0, self.max_shots - shots, 0, self.max_num_classes - classes))
        mixed = F.gelu(self.slots(grouped.flatten(1, 2).transpose(1, 2)))  # (B, d, h)
        return self.out(mixed.flatten(1))


ENCODER_CLASSES: dict[str, type[nn.Module]] = {"row_aligned": RowAlignedEncoder, "set_transformer": SetTransformerEncoder, "mlp": MLPEncoder}


def build_dataset_encoder(encoder_type: str, embedding_dim: int, code_size: int, max_num_classes: int, max_shots: int,
                          **settings: int) -> nn.Module:
    """The dataset encoder named ``encoder_type`` (one of :data:`ENCODER_TYPES`)."""
    if encoder_type not in ENCODER_CLASSES:
        raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, got {encoder_type!r}.")
    if encoder_type == "mlp":
        return MLPEncoder(embedding_dim, code_size, max_num_classes, max_shots, **settings)
    return ENCODER_CLASSES[encoder_type](embedding_dim, code_size, **settings)


def group_by_class(support: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Support ``(B, N·K, d)`` with labels ``(B, N·K)`` as ``(B, N, K, d)``: class ``j``'s items in row ``j``, in their order.

    Every class of every task needs the same ``K``."""
    counts = F.one_hot(labels, num_classes).sum(1)  # (B, N)
    if not bool((counts == counts[:, :1]).all()) or bool((counts[:, 0] != counts[0, 0]).any()):
        raise ValueError(
            f"D2NWG's dataset encoder reads the support as (N, K, d): every class needs the same number K of support items, "
            f"got {counts.tolist()} items per class. Give every class K items (e.g. the first min-count of each)."
        )
    order = torch.argsort(labels, dim=1, stable=True)
    grouped = support.gather(1, order.unsqueeze(-1).expand(-1, -1, support.shape[-1]))
    return grouped.unflatten(1, (num_classes, -1))


# ----- the latent denoiser ---------------------------------------------------------------------------------


class LatentDenoiser(TokenTransformerTrunk):
    """``ε_ψ(z_t, z_D, t)`` over latent tokens ``(B, L, latent_size)``.

    Each token is ``[z_t, c]`` (the dataset code ``c`` concatenated, as the authors concatenate it as an extra
    channel), projected, plus the time embedding (diffusers' ``Timesteps`` + ``TimestepEmbedding``) and, with
    ``num_positions > 0``, a learned position embedding; pre-norm transformer layers attend across the tokens. The
    condition is per token ``(B, L, c)`` (row-aligned codes: token ``j`` is conditioned on class ``j``) or pooled
    ``(B, c)`` (broadcast). With no positions it is equivariant in the tokens. The output layer starts at zero.
    """

    def __init__(self, latent_size: int, condition_size: int, hidden_size: int = 256, num_layers: int = 3, num_heads: int = 4,
                 intermediate_size: int = 512, num_positions: int = 0) -> None:
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps  # here: importing the config stays light

        super().__init__()
        self.token_in = nn.Linear(latent_size + condition_size, hidden_size)
        self.time_proj = Timesteps(hidden_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(hidden_size, hidden_size)
        self.positions = nn.Embedding(num_positions, hidden_size) if num_positions else None
        self.build_trunk(hidden_size, num_layers, num_heads, intermediate_size, latent_size)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Predicted noise ``(B, L, latent_size)`` of ``latents`` at scheduler ``timesteps`` ``(B,)`` given ``condition``."""
        if condition.dim() == 2:
            condition = condition.unsqueeze(1).expand(-1, latents.shape[1], -1)
        time = self.time_embedding(self.time_proj(timesteps.reshape(-1)).to(latents.dtype))
        tokens = self.token_in(torch.cat([latents, condition.to(latents.dtype)], -1)) + time.unsqueeze(1)
        if self.positions is not None:
            tokens = tokens + self.positions(torch.arange(latents.shape[1], device=latents.device))
        return self.run_trunk(tokens)
