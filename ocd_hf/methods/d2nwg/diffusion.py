"""D2NWG's latent diffusion (§3.4, Eq. 3–6) on diffusers' schedulers: the ε-prediction loss (Eq. 5) and the
samplers (the authors' ancestral DDPM sampler over all 1 024 steps, or DDIM with few steps, the fast default).

The authors' settings (their LDM config): 1 024 training steps, ``scaled_linear`` betas 0.0015 → 0.0155,
ε-prediction, latents multiplied by ``1 / std`` of the training latents (LDM's ``scale_factor``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

if TYPE_CHECKING:  # diffusers is imported where it is used, so that importing the config stays light
    from diffusers import DDIMScheduler, DDPMScheduler

# (noisy latents (B, L, m), timesteps (B,)) -> predicted noise (B, L, m)
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1024, "beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0155, "prediction_type": "epsilon",
}
SAMPLERS = ("ddim", "ddpm")


def make_scheduler(scheduler_config: Mapping[str, Any], sampler: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
    """The diffusers scheduler of ``sampler`` (``"ddpm"``: ancestral, also the training schedule; ``"ddim"``: deterministic, η = 0)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    from diffusers import DDIMScheduler, DDPMScheduler

    config = {**DEFAULT_SCHEDULER_CONFIG, **scheduler_config}
    if config["prediction_type"] != "epsilon":
        raise ValueError(f"D2NWG's denoiser predicts the noise: prediction_type must be 'epsilon', got {config['prediction_type']!r}.")
    return DDPMScheduler(**config) if sampler == "ddpm" else DDIMScheduler(**config)


def diffusion_loss(denoise: DenoiseFn, latents: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 5 per item ``(B,)``: ``‖ε − ε_ψ(z_t, t)‖²`` averaged over the latent, ``t`` uniform, ``z_t`` from ``scheduler.add_noise``."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, steps)
    return (denoise(noisy, steps) - noise).pow(2).flatten(1).mean(1)


@torch.no_grad()
def sample_latents(
    denoise: DenoiseFn, noise: torch.Tensor, scheduler: DDPMScheduler | DDIMScheduler, num_inference_steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run ``scheduler`` from ``noise`` ``(B, L, m)`` over ``num_inference_steps`` steps (the DDPM sampler draws its
    per-step noise from ``generator``)."""
    from diffusers import DDPMScheduler

    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    extra = {"generator": generator} if isinstance(scheduler, DDPMScheduler) else {"eta": 0.0}
    for step in scheduler.timesteps:
        timesteps = torch.full((latents.shape[0],), int(step), dtype=torch.long, device=latents.device)
        latents = scheduler.step(denoise(latents, timesteps), step, latents, **extra).prev_sample
    return latents
