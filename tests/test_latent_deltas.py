"""OCD's ``delta_mode="latent"``: a weight VAE over the chunks of the harvested deltas (the shared
:mod:`ocd_hf.weight_vae`), diffusion over its latent tokens, decoded in one batch; on a per-token layer of a tiny Bert."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.harvest_fixtures import build_backbone, build_dataset
from torch.nn import functional as F

from ocd_hf import OCDWrapper
from ocd_hf.methods.ocd.configuration import OCDConfig
from ocd_hf.methods.ocd.evaluation import evaluate_reconstruction
from ocd_hf.methods.ocd.harvest import harvest_deltas
from ocd_hf.methods.ocd.training import train_hypernetwork
from ocd_hf.target import model_output_tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGET = "intermediate.dense"  # 32×16, applied to every token
LATENT = {
    "delta_mode": "latent",
    "vae_config": {"latent_size": 6, "hidden_size": 64, "num_layers": 1},  # chunk_size None: one row (16 values) per token
    "latent_denoiser_config": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "embed_dim": 32},
    "condition_hidden_dim": 16,
}
TRAIN = {"num_steps": 30, "batch_size": 8, "learning_rate": 3e-3, "vae_steps": 300, "vae_learning_rate": 3e-3, "logging_steps": 10,
         "progress": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """48 per-token deltas of the tiny Bert's ``intermediate.dense`` (Adam lr 1e-2) and a latent hypernetwork trained on them."""
    tmp_path = tmp_path_factory.mktemp("latent")
    backbone, dataset = build_backbone("bert"), build_dataset("bert", 48)
    harvest_deltas(backbone, dataset, TARGET, tmp_path / "deltas", batch_size=16, lr=1e-2, progress=False)
    torch.manual_seed(0)
    model = train_hypernetwork(tmp_path / "deltas", backbone, tmp_path / "model", config_overrides=LATENT, **TRAIN)
    return tmp_path, backbone, dataset, model


def rows(dataset, count: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    batch = dataset.with_format("torch")[:count]
    return {name: value for name, value in batch.items() if name != "label"}, batch["label"]


def test_chunk_tokens_round_trip_exactly(trained):
    _, _, _, model = trained
    hypernetwork = model.hypernetwork
    deltas = torch.randn(3, *model.config.weight_shape)
    tokens = hypernetwork.delta_tokens(deltas)
    assert tokens.shape == (3, 32, 16)  # one row per token
    # Token j holds row j (row-major chunks), standardised by the training statistics.
    torch.testing.assert_close(tokens[:, 5] * hypernetwork.token_std[5] + hypernetwork.token_mean[5], deltas[:, 5])
    torch.testing.assert_close(hypernetwork.tokens_to_deltas(tokens), deltas, rtol=1e-5, atol=1e-6)


def test_the_vae_gives_back_deltas_that_change_the_outputs_as_the_originals_do(trained):
    tmp_path, backbone, dataset, model = trained
    inputs, labels = rows(dataset, 48)
    from ocd_hf import load_deltas

    deltas = load_deltas(tmp_path / "deltas").with_format("torch")[:48]["delta"].float()
    reconstructed = model.hypernetwork.reconstruct_deltas(deltas)
    cosine = F.cosine_similarity(reconstructed.flatten(1), deltas.flatten(1), dim=1)
    assert float(cosine.mean()) > 0.9, float(cosine.mean())
    # Judged by what the deltas do: applied to their own samples, the losses move as with the harvested deltas.
    base = F.cross_entropy(model_output_tensor(backbone(**inputs)), labels, reduction="none")
    harvested = F.cross_entropy(model_output_tensor(model.forward_with_deltas(deltas, **inputs)), labels, reduction="none")
    through_vae = F.cross_entropy(model_output_tensor(model.forward_with_deltas(reconstructed, **inputs)), labels, reduction="none")
    others = F.cross_entropy(model_output_tensor(model.forward_with_deltas(reconstructed.roll(1, 0), **inputs)), labels, reduction="none")
    gain, kept, control = (base - harvested).mean(), (base - through_vae).mean(), (base - others).mean()
    # The reconstruction keeps most of each delta's own effect; another sample's reconstructed delta (the control) does not.
    assert gain > 0 and kept > 0.8 * gain and control < 0.5 * gain, (float(gain), float(kept), float(control))
    # evaluate_reconstruction reports the same, batch by batch, for rows given in any order (their ids locate the samples).
    def collate(items):
        return {name: torch.tensor([item[name] for item in items]) for name in ("input_ids", "attention_mask")}, [i["label"] for i in items]

    order = torch.randperm(48, generator=torch.Generator().manual_seed(0)).tolist()
    report = evaluate_reconstruction(model, dataset, load_deltas(tmp_path / "deltas").select(order), collate, batch_size=20)
    assert report["num_examples"] == 48
    torch.testing.assert_close(report["cosine"], float(cosine.mean()), rtol=1e-4, atol=1e-6)
    for name, losses in (("base", base), ("harvested", harvested), ("reconstructed", through_vae)):
        torch.testing.assert_close(report[name]["cross_entropy"], float(losses.mean()), rtol=1e-4, atol=1e-6)
    logits = model_output_tensor(model.forward_with_deltas(reconstructed, **inputs))
    assert report["reconstructed"]["accuracy"] == float((logits.argmax(-1) == labels).float().mean())
    # The VAE stage ran its vae_steps (logged every 10) before the diffusion, and its loss fell.
    history = __import__("json").loads((tmp_path / "model" / "training_history.json").read_text())
    losses = [entry["reconstruction_loss"] for entry in history["vae_stage"]["log_history"] if "reconstruction_loss" in entry]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0], losses


def test_batched_generation_equals_each_sample_generated_alone(trained):
    _, _, dataset, model = trained
    inputs, _ = rows(dataset, 5)
    cond = model.conditioning(**inputs)
    noise = torch.randn(5, 3, *model.hypernetwork.denoiser_sample_shape(), generator=torch.Generator().manual_seed(3))
    batched = model.generate_deltas(cond, num_samples=3, noise=noise)
    assert batched.shape == (5, 3, *model.config.weight_shape)
    for index in range(5):
        alone = model.generate_deltas(model.conditioning(**{k: v[index : index + 1] for k, v in inputs.items()}), num_samples=3,
                                      noise=noise[index : index + 1])
        torch.testing.assert_close(alone[0], batched[index], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(batched[0, 0], batched[0, 1])  # the draws differ
    assert not torch.allclose(batched[0, 0], batched[1, 0])  # and so do the inputs' deltas


def test_save_and_load_keep_the_vae_and_refuse_another_layer(trained, tmp_path):
    _, backbone, dataset, model = trained
    model.save_pretrained(tmp_path / "saved")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert {"vae.encoder_in.weight", "vae.positions.weight", "token_mean", "token_std"} <= set(saved)
    loaded = OCDWrapper.from_pretrained(tmp_path / "saved", backbone=backbone)
    assert loaded.config.delta_mode == "latent" and loaded.config.latent_scale == model.config.latent_scale != 1.0
    inputs, _ = rows(dataset, 4)
    noise = torch.randn(4, 2, *model.hypernetwork.denoiser_sample_shape(), generator=torch.Generator().manual_seed(0))
    expected = model.generate_deltas(model.conditioning(**inputs), num_samples=2, noise=noise)
    torch.testing.assert_close(loaded.generate_deltas(loaded.conditioning(**inputs), num_samples=2, noise=noise), expected)
    with pytest.raises(ValueError, match="holds other weights"):
        OCDWrapper.from_pretrained(tmp_path / "saved", backbone=build_backbone("bert", seed=1))


@pytest.mark.parametrize("settings, message", [
    ({"vae_config": {"chunk_size": 24}}, r"chunk_size=24 does not divide the 32×16 = 512 values .* \(16, 32, 64, 128"),
    ({"vae_config": {"latent_size": 16}}, r"latent_size=16 must be an integer in \[1, chunk_size\) = \[1, 16\)"),
    ({"vae_config": {"latent_dim": 4}}, r"vae_config has unknown keys \['latent_dim'\]"),
    ({"vae_config": {"latent_size": 4}, "latent_denoiser_config": {"hidden_size": 30, "num_heads": 4}}, "not divisible by num_heads=4"),
    ({"generator_type": "regression"}, "delta_mode='latent' .* needs generator_type='diffusion'"),
])
def test_bad_latent_settings_name_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        OCDWrapper.attach(build_backbone("bert"), TARGET, delta_mode="latent", **settings)


def test_factorised_mode_on_a_per_token_layer_points_to_latent_mode():
    with pytest.raises(ValueError, match="Use delta_mode='latent'"):
        OCDConfig(target_module=TARGET, per_token=True, delta_mode="factorised")
