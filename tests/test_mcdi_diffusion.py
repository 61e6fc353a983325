"""Mc-Di's diffusion: the schedule, the losses (Mv-Di is the vanilla DDPM loss bit for bit) and the key
property of the local-consistency loss: with the exact optimal denoiser for one task's point targets, the
deterministic sampler passes through every local target at its boundary and ends at θ_M (Tw-Di does not)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from ocd_hf.methods.mcdi import HeadDenoiser, alpha_bars, local_consistency_loss, sample_chain, segment_boundaries
from ocd_hf.methods.mcdi.diffusion import draw_states, loss_boundaries, sample_segments, segment_schedule
from ocd_hf.task_heads import fit_task_heads

ALPHA_BAR = alpha_bars(dtype=torch.float64)
T = len(ALPHA_BAR) - 1


def test_schedule_starts_every_segment_from_noise():
    assert T == 21 and segment_boundaries(T, 3) == [14, 7, 0]
    assert ALPHA_BAR[0] == 1 and torch.all(ALPHA_BAR[1:] < ALPHA_BAR[:-1])
    assert abs(float(ALPHA_BAR[T].sqrt()) - 0.0023) < 1e-4  # the whole chain starts from noise
    assert abs(float((ALPHA_BAR[T] / ALPHA_BAR[14]).sqrt()) - 0.0047) < 1e-4  # so does the first segment's sub-chain
    assert loss_boundaries("twdi", T, 3) == [0, 0, 0] and loss_boundaries("mvdi", T, 3) == [0]


def test_states_are_drawn_inside_each_segment():
    boundaries = torch.tensor([14, 7, 0])
    states = draw_states(boundaries, T, 20000, torch.Generator().manual_seed(0))
    for i, low in enumerate(boundaries.tolist()):
        assert set(states[:, i].tolist()) == set(range(low + 1, T + 1))  # (s_i, T], every state reached


def test_mvdi_loss_is_the_vanilla_ddpm_loss_bit_for_bit():
    torch.manual_seed(0)
    denoiser = HeadDenoiser(8, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32)
    for parameter in denoiser.parameters():  # the zero-initialised output layer would make both losses ‖ε‖²
        torch.nn.init.normal_(parameter, std=0.2)
    generator = torch.Generator().manual_seed(1)
    heads, prototypes = torch.randn(6, 5, 9, generator=generator), torch.randn(6, 5, 8, generator=generator)
    noise = torch.randn(6, 5, 9, generator=generator)
    timesteps = torch.randint(0, T, (6,), generator=generator)  # diffusers' index t = s - 1
    scheduler = DDPMScheduler(num_train_timesteps=21, beta_schedule="squaredcos_cap_v2")
    vanilla = (denoiser(scheduler.add_noise(heads, noise, timesteps), timesteps + 1, prototypes) - noise).pow(2).flatten(1).mean(1)

    def denoise(x, s):
        return denoiser(x.flatten(0, 1), s.flatten(), prototypes).view(x.shape)

    boundaries = torch.tensor(loss_boundaries("mvdi", T, 1))
    local = local_consistency_loss(denoise, heads[:, None], noise[:, None], (timesteps + 1)[:, None], alpha_bars(), boundaries)
    assert torch.equal(local, vanilla)


def segment_oracle(targets: torch.Tensor, boundaries: list[int]):
    """The denoiser that knows which target each noisy state comes from (its position along k):
    ε = √(1−ᾱ(s)) (x − √r θ_i)/(1 − r), which makes ``local_consistency_loss`` exactly zero."""
    low = torch.tensor(boundaries)

    def denoise(x, s):  # x (B, k, D), s (B, k)
        ratio = (ALPHA_BAR[s] / ALPHA_BAR[low]).unsqueeze(-1)
        return (1 - ALPHA_BAR[s]).sqrt().unsqueeze(-1) * (x - ratio.sqrt() * targets) / (1 - ratio)

    return denoise


def optimal_denoiser(targets: torch.Tensor, boundaries: list[int]):
    """The exact minimiser of the loss for point targets ``(k, D)`` reached at ``boundaries``.

    At state s the targets i with s_i < s compete with weights λ_i p_i(x): λ_i = 1/(k (T − s_i)) is the
    density with which the loss draws (i, s), p_i = N(√r_i θ_i, (1 − r_i) I) the law of x given i, r_i =
    ᾱ(s)/ᾱ(s_i). Minimising Σ_i λ_i p_i(x) ‖c_i ε_φ − ε‖² with c_i² = (1−r_i)/(1−ᾱ(s)) and the noise
    ε = (x − √r_i θ_i)/√(1−r_i) known given i (a point target) gives
    ε*(x, s) = √(1−ᾱ(s)) Σ_i λ_i p_i (x − √r_i θ_i) / Σ_i λ_i p_i (1 − r_i).
    """
    low = torch.tensor(boundaries)
    weights = 1.0 / (len(boundaries) * (T - low).double())
    dim = targets.shape[-1]

    def denoise(x, s):  # x (B, 1, D), s (B, 1): the sampler moves all draws in step
        state, x = int(s[0, 0]), x[:, 0]
        competing = low < state
        ratio = ALPHA_BAR[state] / ALPHA_BAR[low[competing]]
        variance = 1 - ratio
        residual = x[:, None] - ratio.sqrt()[:, None] * targets[competing]  # (B, m, D)
        log_weight = weights[competing].log() - 0.5 * dim * variance.log() - residual.pow(2).sum(-1) / (2 * variance)
        posterior = log_weight.softmax(-1)
        numerator = (posterior[..., None] * residual).sum(1)
        return ((1 - ALPHA_BAR[state]).sqrt() * numerator / (posterior * variance).sum(1, keepdim=True)).unsqueeze(1)

    return denoise


def trajectory_targets() -> torch.Tensor:
    """Three local targets of a real 4-way head trajectory (d = 15: D = 4 × 16 = 64), in units of θ_M's RMS."""
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(4, 15, generator=generator, dtype=torch.float64)
    items = (means.repeat_interleave(3, 0) + 0.5 * torch.randn(12, 15, generator=generator, dtype=torch.float64)).unsqueeze(0)
    fit = fit_task_heads(items, torch.arange(4).repeat_interleave(3).unsqueeze(0), 4, steps=60, generator=generator)
    targets = fit.targets[0].flatten(1)
    return targets / targets[-1].pow(2).mean().sqrt()


def relative_error(states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (states - target).norm(dim=-1) / target.norm()


def test_the_per_segment_oracle_has_zero_loss():
    # Ties the loss as implemented (r, x, the scale factor) to the closed form the exact minimiser is built from.
    targets = trajectory_targets()
    generator = torch.Generator().manual_seed(1)
    for loss_type in ("mcdi", "twdi", "mvdi"):
        boundaries = loss_boundaries(loss_type, T, 3)
        used = targets[-len(boundaries):]
        states = draw_states(torch.tensor(boundaries), T, 500, generator)
        batch = used.expand(500, -1, -1)
        noise = torch.randn(batch.shape, generator=generator, dtype=torch.float64)
        loss = local_consistency_loss(segment_oracle(used, boundaries), batch, noise, states, ALPHA_BAR, torch.tensor(boundaries))
        assert float(loss.max()) < 1e-20, loss_type


def test_exact_minimiser_mcdi_passes_every_local_target_twdi_does_not_end_at_theta_m():
    targets = trajectory_targets()  # (3, 64)
    noise = torch.randn(200, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    record = segment_boundaries(T, 3)  # states 14, 7, 0
    # Mc-Di: through θ_1 at s = 14, θ_2 at s = 7, θ_M at s = 0, from every draw.
    final, states = sample_chain(optimal_denoiser(targets, loss_boundaries("mcdi", T, 3)), noise, ALPHA_BAR, record)
    for i in range(3):
        assert float(relative_error(states[:, i], targets[i]).max()) < 1e-6, f"target {i + 1}"
    assert torch.equal(states[:, -1], final)
    # Tw-Di: the vanilla loss on every target — every draw ends at a mixture's point, not at θ_M.
    final, _ = sample_chain(optimal_denoiser(targets, loss_boundaries("twdi", T, 3)), noise, ALPHA_BAR, record)
    assert float(relative_error(final, targets[-1]).min()) > 0.05
    # Mv-Di: θ_M alone — ends at θ_M without passing through the local targets.
    final, states = sample_chain(optimal_denoiser(targets[-1:], loss_boundaries("mvdi", T, 3)), noise, ALPHA_BAR, record)
    assert float(relative_error(final, targets[-1]).max()) < 1e-6
    assert float(relative_error(states[:, 0], targets[0]).min()) > 0.05


def test_few_step_sampler_with_every_state_is_the_chain():
    targets = trajectory_targets()
    noise = torch.randn(50, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    record = segment_boundaries(T, 3)
    for loss_type, used in (("mcdi", targets), ("mvdi", targets[-1:])):
        denoise = optimal_denoiser(used, loss_boundaries(loss_type, T, 3))
        chain, chain_states = sample_chain(denoise, noise, ALPHA_BAR, record)
        strided, strided_states = sample_segments(denoise, noise, ALPHA_BAR, loss_boundaries(loss_type, T, 3), T, record)
        torch.testing.assert_close(strided_states, chain_states, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(strided, chain, rtol=1e-9, atol=1e-9)


def test_few_step_sampler_ends_at_theta_m_with_the_exact_minimiser():
    targets = trajectory_targets()
    noise = torch.randn(200, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    record = segment_boundaries(T, 3)
    boundaries = loss_boundaries("mcdi", T, 3)
    for steps in (3, 6, 9):
        final, states = sample_segments(optimal_denoiser(targets, boundaries), noise, ALPHA_BAR, boundaries, steps, record)
        assert float(relative_error(final, targets[-1]).max()) < 1e-6, steps
    # three jumps per segment still pass through every local target; one jump per segment misses θ_1
    assert float(relative_error(states[:, 0], targets[0]).max()) < 1e-6
    _, states = sample_segments(optimal_denoiser(targets, boundaries), noise, ALPHA_BAR, boundaries, 3, record)
    assert float(relative_error(states[:, 0], targets[0]).max()) > 1e-3
    # Mv-Di: a single jump from pure noise lands on θ_M
    final, _ = sample_segments(optimal_denoiser(targets[-1:], [0]), noise, ALPHA_BAR, [0], 1)
    assert float(relative_error(final, targets[-1]).max()) < 1e-9


def test_few_step_schedule_and_its_errors():
    assert segment_schedule(21, [14, 7, 0], 3) == [(21, 14, 14), (14, 7, 7), (7, 0, 0)]
    assert [jump[:2] for jump in segment_schedule(21, [0, 0, 0], 3)] == [(21, 14), (14, 7), (7, 0)]
    for bad in (0, 4, 24):
        with pytest.raises(ValueError, match=r"num_inference_steps=.*choose one of \[3, 6, 9, 12, 15, 18, 21\]"):
            segment_schedule(21, [14, 7, 0], bad)
    with pytest.raises(ValueError, match=r"states \[14\] are not reached"):
        sample_segments(lambda x, s: x, torch.zeros(1, 4), ALPHA_BAR, [0], 2, record=[14])


def test_segment_boundaries_must_be_whole_steps():
    with pytest.raises(ValueError, match=r"divide the 21 diffusion steps.*\[1, 3, 7, 21\]"):
        segment_boundaries(21, 4)
