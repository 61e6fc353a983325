"""Mc-Di's diffusion: the noise schedule, the local-consistency loss (and its Mv-Di / Tw-Di variants) and
the deterministic sampler of the paper's proof, all in *forward* indexing.

Forward indexing: state ``s = 0`` is the data, ``s = T`` is noise, ``ᾱ(s) = ∏_{j ≤ s} α_j`` with
``ᾱ(0) = 1`` (``ᾱ(s)`` is diffusers' ``alphas_cumprod[s - 1]``). The paper (Eq. 3, App. A) counts the
other way: its ``x_0`` is noise, its ``x_T`` the data and its ``ᾱ_t = ∏_{j=t}^{T-1} α_j``; its step
``t`` is our state ``s = T − t``. Local target ``θ_i`` (``i = 1..k``, ``θ_k = θ_M``) is reached at
paper step ``iT/k``, i.e. at our boundary ``s_i = T − iT/k`` (``s_k = 0``).

**The local-consistency loss.** The paper's ``ᾱ^i_t = ∏_{j=t}^{iT/k-1} α_j`` is the forward marginal
from ``s_i`` to ``s``: ``r = ᾱ(s)/ᾱ(s_i)``. For target ``i`` and ``s ∈ (s_i, T]`` (paper ``t ∈ [0, iT/k)``)
its Eq. 3 reads ``x = √r θ_i + √(1−r) ε`` and ``‖√(1−r) ε_φ(x, s) − √(1−ᾱ(s)) ε‖²``. App. A derives it
as the denoising-matching KL of the sub-chain ``θ_i → x_s`` (whose cumulative coefficient is ``r``)
against the *fixed* vanilla sampler step, whose mean is ``(x − (1−α_s)/√(1−ᾱ(s)) ε_φ)/√α_s``; the
sub-chain's posterior mean is the same expression with ``√(1−r)`` and its true noise ``ε`` in place of
``√(1−ᾱ(s))`` and ``ε_φ``. Equating the two means gives ``ε_φ = √((1−ᾱ(s))/(1−r)) ε``, i.e. the
squared error above, whose per-state factor the paper then drops ("∝"). We divide it by ``1 − ᾱ(s)``
(a weight that depends on ``s`` only, so the minimiser is unchanged):

    loss_i(s) = ‖ √((1−r)/(1−ᾱ(s))) · ε_φ(x, s) − ε ‖²,    x = √r θ_i + √(1−r) ε,

so that for ``k = 1`` (``s_1 = 0``, ``r = ᾱ(s)``, the factor is exactly 1) it *is* the vanilla DDPM
ε-loss, bit for bit (Prop. 1, Mv-Di). A task's loss is the mean over its ``k`` targets of ``loss_i`` at
``s`` uniform in ``(s_i, T]`` (the paper's ``E_{i ∈ (0,k]} E_t``). Tw-Di, the naive variant, is the
same formula with every boundary at 0: the vanilla loss on every local target.

The exact minimiser for point targets: for ``x`` at state ``s``, the segments ``i`` with ``s_i < s``
compete with weights ``λ_i p_i(x)`` (``λ_i = 1/(k(T − s_i))`` the sampling density of ``(i, s)``,
``p_i = N(√r_i θ_i, (1−r_i) I)``) and ``ε* = √(1−ᾱ(s)) Σ λ_i p_i (x − √r_i θ_i) / Σ λ_i p_i (1−r_i)``.
With one dominant segment, the sampler's step from ``s_i + 1`` (where ``1 − r = 1 − α``) lands exactly
on ``θ_i`` whatever ``x`` is: this is what makes the chain pass through every local target.

**The schedule.** The paper's literal T = 20 with k = 3 puts boundaries at 6.67/13.33 and a 20-step
linear 1e-4..0.02 schedule leaves ``√ᾱ_T ≈ 0.9`` (no noise). We use diffusers'
``DDPMScheduler(num_train_timesteps=21, beta_schedule="squaredcos_cap_v2")``: boundaries 14, 7, 0;
``√ᾱ(T) = 0.0023`` and ``√(ᾱ(T)/ᾱ(s_1)) = 0.0047``, so every segment starts from (nearly) pure noise.

**The sampler** is the deterministic DDPM mean step of App. A / D.1 (the paper omits ``σ_z ε``):
``x_{s−1} = (x_s − (1−α_s)/√(1−ᾱ(s)) ε_φ(x_s, s)) / √α_s`` with ``α_s = ᾱ(s)/ᾱ(s−1)``. (The
main text's Eq. 2 is an ``x_0`` estimate, not a step.)

**The few-step sampler** (``num_inference_steps``, our addition; the paper has none): segment ``i``
is the sub-chain ``θ_i → x_s`` with cumulative coefficient ``r = ᾱ(s)/ᾱ(s_i)``, whose noise the loss
trains ``√((1−r)/(1−ᾱ(s))) ε_φ`` to predict, so ``θ̂ = (x − (1−r)/√(1−ᾱ(s)) ε_φ)/√r``. A jump from ``s``
to ``s' ∈ [s_i, s)`` takes the mean of the sub-chain's posterior ``q(x_{s'} | x_s, θ̂)`` (the proof's step
with a stride: no noise added): ``x' = (√r' (1 − r/r') θ̂ + √(r/r') (1 − r') x)/(1 − r)``. With one jump per
state it *is* the chain above (up to rounding); a jump onto ``s_i`` lands on ``θ̂``. With the exact
minimiser it still ends on ``θ_M`` from any number of jumps; with a trained denoiser, fewer jumps cost
accuracy (docs/task_generation.md measures it).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

# (x (..., k, *shape), s (..., k)) -> predicted noise, shaped like x.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSS_TYPES = ("mcdi", "mvdi", "twdi")
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 21, "beta_schedule": "squaredcos_cap_v2"}


def alpha_bars(scheduler_config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``ᾱ(s)`` for ``s = 0..T`` (``ᾱ(0) = 1``): diffusers' ``alphas_cumprod`` of ``scheduler_config``, cast to ``dtype``."""
    from diffusers import DDPMScheduler  # here, not at the top: the config imports this module, and diffusers is slow to import

    scheduler = DDPMScheduler(**{**DEFAULT_SCHEDULER_CONFIG, **(scheduler_config or {})})
    return torch.cat([torch.ones(1, dtype=dtype), scheduler.alphas_cumprod.to(dtype)])


def segment_boundaries(num_timesteps: int, num_targets: int) -> list[int]:
    """``s_i = T − iT/k`` for ``i = 1..k``: the state at which local target ``i`` is reached (``s_k = 0``)."""
    if num_targets < 1 or num_timesteps % num_targets:
        raise ValueError(
            f"num_targets={num_targets} must be >= 1 and divide the {num_timesteps} diffusion steps, so that every local "
            f"target is reached at a whole step; choose num_targets among {[k for k in range(1, num_timesteps + 1) if num_timesteps % k == 0]} "
            "or change scheduler_config['num_train_timesteps']."
        )
    return [num_timesteps - i * num_timesteps // num_targets for i in range(1, num_targets + 1)]


def loss_boundaries(loss_type: str, num_timesteps: int, num_targets: int) -> list[int]:
    """The state each target of the loss is reached at: Mc-Di's ``s_i``; every target at 0 for Tw-Di; ``[0]`` for Mv-Di."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    if loss_type == "mvdi":
        return [0]
    if loss_type == "twdi":
        return [0] * num_targets
    return segment_boundaries(num_timesteps, num_targets)


def draw_states(boundaries: torch.Tensor, num_timesteps: int, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(batch, k)`` states, target ``i``'s uniform in ``(boundaries[i], T]``."""
    uniform = torch.rand(batch, len(boundaries), generator=generator, device=boundaries.device, dtype=torch.float64)
    span = num_timesteps - boundaries
    return boundaries + 1 + (uniform * span).long().clamp_(max=span - 1)


def local_consistency_loss(
    denoise: DenoiseFn,
    targets: torch.Tensor,
    noise: torch.Tensor,
    states: torch.Tensor,
    alpha_bar: torch.Tensor,
    boundaries: torch.Tensor,
) -> torch.Tensor:
    """Per-task loss ``(B,)``: the mean over the ``k`` targets of ``‖√((1−r)/(1−ᾱ(s))) ε_φ(x, s) − ε‖²``.

    ``targets`` and ``noise`` are ``(B, k, *shape)``, ``states`` ``(B, k)`` with ``states > boundaries``;
    ``r = ᾱ(s)/ᾱ(s_i)`` and ``x = √r θ_i + √(1−r) ε`` (see the module docstring). With boundaries at 0,
    ``r = ᾱ(s)`` and the factor is exactly 1: the vanilla ε-loss (Mv-Di for k = 1, Tw-Di for k > 1).
    """
    if targets.shape[:2] != states.shape or noise.shape != targets.shape or states.shape[1] != len(boundaries):
        raise ValueError(
            f"targets {tuple(targets.shape)}, noise {tuple(noise.shape)} and states {tuple(states.shape)} must share "
            f"(batch, k) with k = {len(boundaries)} boundaries."
        )
    alpha_bar = alpha_bar.to(device=targets.device, dtype=targets.dtype)
    ratio = alpha_bar[states] / alpha_bar[boundaries.to(states.device)].expand_as(states)
    extra = (1,) * (targets.dim() - 2)
    ratio = ratio.reshape(*ratio.shape, *extra)
    noisy = ratio**0.5 * targets + (1 - ratio) ** 0.5 * noise
    scale = ((1 - ratio) / (1 - alpha_bar[states]).reshape(ratio.shape)) ** 0.5
    prediction = denoise(noisy, states)
    return (scale * prediction - noise).pow(2).flatten(2).mean(2).mean(1)


@torch.no_grad()
def sample_chain(
    denoise: DenoiseFn, noise: torch.Tensor, alpha_bar: torch.Tensor, record: list[int] | tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the deterministic sampler from ``x_T = noise`` ``(B, *shape)`` down to ``s = 0``.

    ``denoise`` receives ``(B, 1, *shape)`` states and ``(B, 1)`` step indices. Returns ``x_0`` and, if
    ``record`` lists states (e.g. the segment boundaries), the states reached there ``(B, len(record), *shape)``.
    """
    num_timesteps = len(alpha_bar) - 1
    alpha_bar = alpha_bar.to(device=noise.device, dtype=noise.dtype)
    x = noise
    recorded = {}
    for s in range(num_timesteps, 0, -1):
        states = torch.full((x.shape[0], 1), s, dtype=torch.long, device=x.device)
        epsilon = denoise(x.unsqueeze(1), states).squeeze(1)
        alpha = alpha_bar[s] / alpha_bar[s - 1]
        x = (x - (1 - alpha) / (1 - alpha_bar[s]).sqrt() * epsilon) / alpha.sqrt()
        if s - 1 in record:
            recorded[s - 1] = x
    return x, torch.stack([recorded[s] for s in record], 1) if record else None


def segment_schedule(num_timesteps: int, boundaries: list[int], num_inference_steps: int) -> list[tuple[int, int, int]]:
    """``(s, s', s_i)`` jumps of the few-step sampler: ``num_inference_steps`` spread evenly over the segments
    ``(s_i, s_{i−1}]`` (``s_0 = T``), each segment's steps evenly spaced and its last jump ending on ``s_i``."""
    segments = sorted(set(boundaries), reverse=True)
    lengths = [high - low for high, low in zip([num_timesteps, *segments], segments)]
    if num_inference_steps % len(segments) or not 1 <= num_inference_steps // len(segments) <= min(lengths):
        valid = [len(segments) * n for n in range(1, min(lengths) + 1)]
        raise ValueError(
            f"num_inference_steps={num_inference_steps!r} must give every one of the {len(segments)} segments the same "
            f"number of steps, at most its length: choose one of {valid}, or None for the full chain of {num_timesteps} steps."
        )
    per_segment = num_inference_steps // len(segments)
    jumps = []
    for high, low in zip([num_timesteps, *segments], segments):
        states = torch.linspace(high, low, per_segment + 1).round().long().tolist()
        jumps += [(s, s_next, low) for s, s_next in zip(states[:-1], states[1:])]
    return jumps


@torch.no_grad()
def sample_segments(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    alpha_bar: torch.Tensor,
    boundaries: list[int],
    num_inference_steps: int,
    record: list[int] | tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The few-step sampler (module docstring): strided posterior-mean jumps on each segment's sub-chain,
    ``num_inference_steps`` denoiser calls in all. Same arguments and returns as :func:`sample_chain`; ``boundaries`` are the
    loss's (``loss_boundaries``: Tw-Di and Mv-Di have one segment), ``record`` must be among the jumps' ends."""
    alpha_bar = alpha_bar.to(device=noise.device, dtype=noise.dtype)
    jumps = segment_schedule(len(alpha_bar) - 1, boundaries, num_inference_steps)
    missing = sorted(set(record) - {s_next for _, s_next, _ in jumps})
    if missing:
        raise ValueError(f"states {missing} are not reached by the {num_inference_steps}-step sampler; record among {[j[1] for j in jumps]}.")
    x, recorded = noise, {}
    for s, s_next, low in jumps:
        states = torch.full((x.shape[0], 1), s, dtype=torch.long, device=x.device)
        ratio, ratio_next = alpha_bar[s] / alpha_bar[low], alpha_bar[s_next] / alpha_bar[low]
        segment_noise = ((1 - ratio) / (1 - alpha_bar[s])).sqrt() * denoise(x.unsqueeze(1), states).squeeze(1)
        estimate = (x - (1 - ratio).sqrt() * segment_noise) / ratio.sqrt()
        kept = ratio / ratio_next  # the sub-chain's ᾱ(s)/ᾱ(s') over the jump
        x = (ratio_next.sqrt() * (1 - kept) * estimate + kept.sqrt() * (1 - ratio_next) * x) / (1 - ratio)
        if s_next in record:
            recorded[s_next] = x
    return x, torch.stack([recorded[s] for s in record], 1) if record else None
