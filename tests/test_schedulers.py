"""Swappable diffusers schedulers: ``OCDConfig.scheduler_class`` picks the sampler; training keeps the
variance-preserving ``add_noise`` of DDPM; DDIM (the default) samples exactly as before."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_DENOISER, text_batch, tiny_bert
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from ocd_hf import OCDConfig, OCDWrapper
from ocd_hf.methods.ocd.hypernetwork import delta_scale

SCHEDULERS = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]
FACTOR_DENOISER = {"hidden_dim": 16, "num_layers": 1, "embed_dim": 8}


def tiny_ocd(delta_mode: str = "full", **kwargs) -> OCDWrapper:
    torch.manual_seed(0)
    ocd = OCDWrapper.attach(
        tiny_bert(), "classifier", delta_mode=delta_mode, denoiser_config=TINY_DENOISER, factor_denoiser_config=FACTOR_DENOISER,
        condition_hidden_dim=16, num_inference_steps=3, **kwargs,
    ).eval()
    if delta_mode == "factorised":  # its output layer starts at zero; make the denoiser's prediction matter
        torch.nn.init.normal_(ocd.hypernetwork.denoiser.output.weight, std=0.5)
    return ocd


def condition_embedding(ocd: OCDWrapper) -> torch.Tensor:
    hypernetwork = ocd.hypernetwork
    cond = ocd.conditioning(**text_batch(batch=4, seed=1))
    with torch.no_grad():
        return hypernetwork.embed_condition(hypernetwork.condition_values(cond))


@torch.no_grad()
def ddim_sample_as_before(hypernetwork, embedding: torch.Tensor, generator: torch.Generator, num_inference_steps: int) -> torch.Tensor:
    """The sampling loop as it was before schedulers became swappable (DDIM hard-coded, eta 0)."""
    scheduler = DDIMScheduler(**hypernetwork.config.scheduler_config)
    scheduler.set_timesteps(num_inference_steps, device=embedding.device)
    sample = randn_tensor(
        (embedding.shape[0], *hypernetwork.denoiser_sample_shape()), generator=generator, device=embedding.device, dtype=embedding.dtype
    )
    for t in scheduler.timesteps:
        noise_pred = hypernetwork.denoise(sample, t.expand(sample.shape[0]), embedding)
        sample = scheduler.step(noise_pred, t, sample, eta=0.0).prev_sample
    deltas = hypernetwork.from_denoiser_space(sample)
    scale = delta_scale(deltas, hypernetwork.config.delta_normalization).clamp_min(1e-12)
    return deltas / scale.view(-1, *([1] * (deltas.dim() - 1))).to(deltas.dtype)


@pytest.mark.parametrize("delta_mode", ["full", "factorised"])
def test_default_ddim_samples_are_unchanged(delta_mode):
    ocd = tiny_ocd(delta_mode)
    embedding = condition_embedding(ocd)
    expected = ddim_sample_as_before(ocd.hypernetwork, embedding, torch.Generator().manual_seed(11), 3)
    sampled = ocd.hypernetwork.sample(embedding, generator=torch.Generator().manual_seed(11), num_inference_steps=3)
    torch.testing.assert_close(sampled, expected, rtol=0, atol=0)
    assert ocd.config.scheduler_class == "DDIMScheduler"


@pytest.mark.parametrize("delta_mode", ["full", "factorised"])
@pytest.mark.parametrize("scheduler_class", SCHEDULERS)
def test_every_scheduler_samples_deltas_of_the_right_shape(scheduler_class, delta_mode):
    ocd = tiny_ocd(delta_mode, scheduler_class=scheduler_class)
    assert type(ocd.hypernetwork.make_scheduler()).__name__ == scheduler_class
    cond = ocd.conditioning(**text_batch(batch=4, seed=1))
    first = ocd.generate_deltas(cond, num_samples=2, generator=torch.Generator().manual_seed(3))
    again = ocd.generate_deltas(cond, num_samples=2, generator=torch.Generator().manual_seed(3))
    assert first.shape == ((4, 2, 3, 16) if delta_mode == "full" else (4, 2, 3))
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # stochastic steps (DDPM) draw from the generator
    assert not torch.equal(first[:, 0], first[:, 1])


def test_scheduler_class_round_trips_and_an_old_config_loads_as_ddim(tmp_path):
    ocd = tiny_ocd(scheduler_class="EulerDiscreteScheduler")
    ocd.save_pretrained(tmp_path / "euler")
    assert json.loads((tmp_path / "euler" / "config.json").read_text())["scheduler_class"] == "EulerDiscreteScheduler"
    loaded = OCDWrapper.from_pretrained(tmp_path / "euler", backbone=ocd.backbone)
    assert loaded.config.scheduler_class == "EulerDiscreteScheduler"
    assert type(loaded.hypernetwork.make_scheduler()).__name__ == "EulerDiscreteScheduler"

    saved = json.loads((tmp_path / "euler" / "config.json").read_text())
    del saved["scheduler_class"]  # a config saved before the field existed
    (tmp_path / "euler" / "config.json").write_text(json.dumps(saved))
    assert OCDConfig.from_pretrained(tmp_path / "euler").scheduler_class == "DDIMScheduler"


@pytest.mark.parametrize(
    "name, message",
    [
        ("NoSuchScheduler", r"Unknown scheduler_class 'NoSuchScheduler'.*DDIMScheduler.*EulerDiscreteScheduler"),
        ("UNet2DModel", r"not a diffusers scheduler"),
        ("FlowMatchEulerDiscreteScheduler", r"cannot sample from a denoiser trained"),
    ],
)
def test_unknown_or_incompatible_scheduler_classes_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        OCDConfig(scheduler_class=name)


@pytest.mark.parametrize("scheduler_class", SCHEDULERS)
def test_training_noise_is_the_variance_preserving_forward_process_whatever_the_sampler(scheduler_class):
    """Training noises with DDPM's ``add_noise`` (``√ᾱ x + √(1−ᾱ) ε``), as diffusers' training scripts
    do; the sampling scheduler's ``scale_model_input`` maps its own parametrisation onto it."""
    ocd = tiny_ocd(scheduler_class=scheduler_class)
    scheduler = ocd.hypernetwork.make_training_scheduler()
    clean, noise = torch.randn(5, 1, 4, 16), torch.randn(5, 1, 4, 16)
    timesteps = torch.tensor([0, 10, 500, 900, 999])
    reference = DDIMScheduler(**ocd.config.scheduler_config)  # what training used before
    torch.testing.assert_close(scheduler.add_noise(clean, noise, timesteps), reference.add_noise(clean, noise, timesteps), rtol=0, atol=0)


@pytest.mark.parametrize("scheduler_class", SCHEDULERS)
def test_each_sampler_recovers_a_point_mass_from_its_exact_noise_predictor(scheduler_class, monkeypatch):
    """With the exact ε-predictor of a point mass at ``c`` under the training forward process, every sampler
    must land on ``c``: this fails if a sampler's ``init_noise_sigma`` or ``scale_model_input`` were skipped."""
    ocd = tiny_ocd("factorised", scheduler_class=scheduler_class)
    hypernetwork = ocd.hypernetwork
    target = torch.tensor([0.5, -1.0, 2.0])
    alphas_cumprod = hypernetwork.make_training_scheduler().alphas_cumprod

    def exact_epsilon(noisy, timesteps, embedding):
        alpha = alphas_cumprod[timesteps.round().long()].view(-1, 1)
        return (noisy - alpha.sqrt() * target) / (1 - alpha).sqrt()

    monkeypatch.setattr(hypernetwork, "denoise", exact_epsilon)
    sampled = hypernetwork.sample(condition_embedding(ocd), generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    expected = target / target.pow(2).mean().sqrt()
    torch.testing.assert_close(sampled, expected.expand_as(sampled), rtol=0, atol=1e-3)
