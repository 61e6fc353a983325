"""Rank-1 ("factorised") deltas of a Linear that sees one vector per sample.

Every single-sample gradient of such a layer is ``δ xᵀ``, so the overfit delta is ``Δ = u vᵀ`` with
a right factor known at test time from the layer input ``x``: ``v = x`` for SGD, ``v = sign(x)``
for Adam (its element-wise normalisation divides ``x_j`` out, up to eps). Storing and generating
``u`` (``out_features`` numbers) instead of ``Δ`` (``out × in``) is exact where this holds;
:func:`factorise_deltas` measures how exact on each sample instead of assuming it.
"""

from __future__ import annotations

import math

import torch

FACTOR_RULES = ("sign", "input")
SIGN_ZERO_TOLERANCE = 1e-12
RULE_FOR_OPTIMIZER = {"adam": "sign", "adamw": "sign", "sgd": "input"}
# Deltas per chunk of the residual's (chunk, out, in) temporary: ~1 MB of float32, which stays in the L2 cache (as
# ocd_hf.finetune.CHUNK_ELEMENTS). Measured on one CPU thread: 416 LeNet-5 fc2 deltas (84 x 120) 4x faster than one
# temporary for the whole batch, which pays page faults for fresh memory; each row's residual is the same bit for bit.
RESIDUAL_CHUNK_ELEMENTS = 2**18


def right_factor(layer_input: torch.Tensor, rule: str) -> torch.Tensor:
    """``v`` from the layer input ``x`` ``(..., in)``: ``sign(x)`` or ``x`` itself."""
    if rule == "sign":
        # Inputs that are zero up to float noise (|x| <= 1e-12) give Adam no gradient to normalise:
        # its step there is ~0, not ±lr, so their factor entry is 0.
        return torch.sign(layer_input) * (layer_input.abs() > SIGN_ZERO_TOLERANCE)
    if rule == "input":
        return layer_input
    raise ValueError(f"Unknown factor rule {rule!r}; expected one of {FACTOR_RULES}.")


def factorise_deltas(deltas: torch.Tensor, layer_input: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares left factors ``u`` ``(batch, out)`` with ``Δ ≈ u vᵀ``, and the relative residual
    ``‖Δ − u vᵀ‖ / ‖Δ‖`` ``(batch,)`` (0 where the factorisation is exact)."""
    v = right_factor(layer_input, rule).to(deltas.dtype)
    u = torch.einsum("boi,bi->bo", deltas, v) / v.pow(2).sum(-1, keepdim=True).clamp_min(1e-30)
    chunk = max(1, RESIDUAL_CHUNK_ELEMENTS // max(1, math.prod(deltas.shape[1:])))
    residual = deltas.new_empty(deltas.shape[0])
    for start in range(0, deltas.shape[0], chunk):
        part = slice(start, start + chunk)
        residual[part] = (deltas[part] - u[part].unsqueeze(-1) * v[part].unsqueeze(1)).flatten(1).norm(dim=1)
    return u, residual / deltas.flatten(1).norm(dim=1).clamp_min(1e-30)


def expand_factors(factors: torch.Tensor, layer_input: torch.Tensor, rule: str) -> torch.Tensor:
    """Full deltas ``u vᵀ`` ``(batch, ..., out, in)`` from factors ``(batch, ..., out)`` and inputs ``(batch, in)``."""
    v = right_factor(layer_input, rule).to(factors.dtype)
    v = v.view(v.shape[0], *([1] * (factors.dim() - 2)), 1, v.shape[-1])
    return factors.unsqueeze(-1) * v


def factor_shift(factors: torch.Tensor, layer_input: torch.Tensor, rule: str) -> torch.Tensor:
    """``Δ x = u (vᵀ x)`` without building ``Δ``: ``(batch, out)`` from ``(batch, out)`` and ``(batch, in)``."""
    coefficient = (right_factor(layer_input, rule) * layer_input).sum(-1, keepdim=True)
    return factors * coefficient.to(factors.dtype)
