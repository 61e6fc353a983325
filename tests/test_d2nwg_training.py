"""Training D2NWG's three stages: a run killed inside the diffusion stage and resumed equals an uninterrupted one,
and an end-to-end smoke test on synthetic tasks (generated heads beat chance on held-out classes)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.d2nwg import TINY
from helpers.mcdi import gaussian_distribution

from ocd_hf.episodes import EpisodeSampler
from ocd_hf.fewshot import episode_accuracy
from ocd_hf.methods.d2nwg import D2NWGTrainingArguments, train_d2nwg
from ocd_hf.methods.d2nwg import training as training_module
from ocd_hf.task_heads import harvest_task_heads, resolve_head_dataset
from ocd_hf.trainer import HISTORY_NAME, list_checkpoints, split_rows

QUIET = {"progress": False, "logging_steps": 2}
SMALL = {"vae_config": {"latent_size": 16, "hidden_size": 64, "num_layers": 1}, "projection_size": 16,
         "encoder_config": {"code_size": 32, "hidden_size": 32, "num_heads": 2, "num_inducing": 4, "num_layers": 1},
         "denoiser_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}}


@pytest.fixture(scope="module")
def split():
    return gaussian_distribution(num_classes=200, per_class=20, dim=16).class_split({"train": range(150), "test": range(150, 200)})


@pytest.fixture(scope="module")
def zoo(split, tmp_path_factory):
    """96 3-way 2-shot tasks on 150 classes, each head fitted on 10 items per class; the last 2 checkpoints kept."""
    directory = tmp_path_factory.mktemp("zoo")
    harvest_task_heads(split["train"], directory, num_tasks=96, n_way=3, k_shot=2, fit_on="pool", pool_size=8, steps=60, lr=0.05,
                       num_targets=2, target_spacing="last", batch_size=96, progress=False, encoder_id="synthetic")
    return directory


def test_a_run_killed_in_the_diffusion_stage_resumes_to_the_same_generator(zoo, split, tmp_path, monkeypatch):
    # The authors' variants (code loss, soft-target alignment) with the pooled paper encoder over model-wise vectors.
    variants = {"vae_loss": "code", "alignment_loss": "soft", "encoder_type": "set_transformer", "vectorization": "model"}
    settings = dict(config_overrides={**TINY, **variants}, distribution=split["train"], vae_steps=3, alignment_steps=3, num_steps=6, checkpointing_steps=2,
                    batch_size=8, validation_fraction=0.25, ema_decay=0.99, seed=3, **QUIET)
    uninterrupted = train_d2nwg(zoo, tmp_path / "full", **settings)

    class Killed(Exception):
        pass

    original, calls = training_module.GeneratorTrainer.training_step, []

    def killed_in_diffusion_step_five(self, *args):
        calls.append(1)
        if len(calls) == 3 + 3 + 5:
            raise Killed
        return original(self, *args)

    monkeypatch.setattr(training_module.GeneratorTrainer, "training_step", killed_in_diffusion_step_five)
    with pytest.raises(Killed):
        train_d2nwg(zoo, tmp_path / "killed", **settings)
    monkeypatch.setattr(training_module.GeneratorTrainer, "training_step", original)
    stages = tmp_path / "killed" / "stages"
    assert [c.name for c in list_checkpoints(stages / "diffusion")] == ["checkpoint-2", "checkpoint-4"]
    assert (stages / "vae" / "component.safetensors").is_file() and not (stages / "diffusion" / "component.safetensors").exists()
    resumed = train_d2nwg(zoo, tmp_path / "killed", resume_from_checkpoint="latest", **settings)
    assert resumed.config.latent_scale == uninterrupted.config.latent_scale and resumed.config.alignment_loss == "soft"
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    history = json.loads((tmp_path / "killed" / HISTORY_NAME).read_text())
    assert history["stages"] == json.loads((tmp_path / "full" / HISTORY_NAME).read_text())["stages"]
    assert "val_denoise_loss" in history["stages"]["diffusion"]["log_history"][-1] and "val_kl_loss" in history["stages"]["vae"]["log_history"][-1]
    with pytest.raises(ValueError, match="must be None or 'latest'"):
        train_d2nwg(zoo, tmp_path / "other", resume_from_checkpoint=stages / "diffusion", **settings)
    with pytest.raises(ValueError, match=r"may not set \['latent_scale'\]"):
        train_d2nwg(zoo, tmp_path / "other", config_overrides={"latent_scale": 2.0})
    with pytest.raises(ValueError, match="num_checkpoints=3 exceeds the 2 checkpoints"):
        train_d2nwg(zoo, tmp_path / "other", args=D2NWGTrainingArguments(num_checkpoints=3))


def test_smoke_generated_heads_beat_chance_on_held_out_classes(zoo, split, tmp_path):
    model = train_d2nwg(zoo, tmp_path, distribution=split["train"], config_overrides=SMALL, vae_steps=150, alignment_steps=60, num_steps=300,
                        batch_size=64, learning_rate=5e-3, vae_learning_rate=3e-3, alignment_learning_rate=3e-3, validation_fraction=0.0,
                        ema_decay=0.99, **QUIET)
    stages = json.loads((tmp_path / HISTORY_NAME).read_text())["stages"]
    for stage, loss in (("vae", "reconstruction_loss"), ("alignment", "alignment_loss"), ("diffusion", "denoise_loss")):
        log = stages[stage]["log_history"]
        assert log[-1][loss] < 0.7 * log[0][loss], (stage, log[0][loss], log[-1][loss])
    episodes = EpisodeSampler(split["test"], 3, 2, q_queries=10, seed=1).sample(100, column="embedding")
    heads = model.generate_heads(episodes.support, episodes.support_labels, generator=torch.Generator().manual_seed(0))[:, 0]
    accuracy = float(episode_accuracy(heads, episodes).mean())
    assert accuracy > 0.45, f"held-out 3-way accuracy {accuracy:.3f} (chance 0.33; measured 0.60 when written, nearest centroid 0.93)"


def test_without_alignment_the_encoder_trains_with_the_denoiser(zoo, tmp_path):
    settings = dict(config_overrides=TINY, vae_steps=2, num_steps=3, batch_size=8, validation_fraction=0.0, ema_decay=None, seed=0, **QUIET)
    frozen = train_d2nwg(zoo, tmp_path / "frozen", alignment_steps=1, **settings)
    joint = train_d2nwg(zoo, tmp_path / "joint", alignment_steps=0, joint_encoder=True, **settings)
    assert sorted(p.name for p in (tmp_path / "joint" / "stages").iterdir()) == ["diffusion", "vae"]
    for name, tensor in frozen.vae.state_dict().items():  # the same seed and VAE stage: the stages are independent
        assert torch.equal(joint.vae.state_dict()[name], tensor), name
    torch.manual_seed(0)
    initial = type(joint)(joint.config).dataset_encoder.state_dict()  # train_d2nwg's seeded initialisation
    moved = [name for name, tensor in initial.items() if not torch.equal(joint.dataset_encoder.state_dict()[name], tensor)]
    assert "out.weight" in moved and len(moved) > len(initial) // 2  # the diffusion loss trained the encoder
    with pytest.raises(ValueError, match="alignment_steps=0 would leave the dataset encoder untrained"):
        D2NWGTrainingArguments(alignment_steps=0)


def test_without_a_vae_the_vae_stage_is_skipped_and_the_tokens_are_aligned_and_diffused(zoo, tmp_path):
    settings = dict(vae_steps=2, alignment_steps=2, num_steps=3, batch_size=8, validation_fraction=0.0, ema_decay=None, seed=0, **QUIET)
    model = train_d2nwg(zoo, tmp_path, config_overrides={**TINY, "use_vae": False}, **settings)
    assert model.vae is None and sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["alignment", "diffusion"]
    assert set(json.loads((tmp_path / HISTORY_NAME).read_text())["stages"]) == {"alignment", "diffusion"}
    # latent_scale is 1 / the std of the standardised tokens of every kept checkpoint (about 1)
    tokens = model.heads_to_tokens(torch.as_tensor(resolve_head_dataset(zoo)[0].with_format("torch")[:]["targets"]).float()).double()
    assert model.config.latent_scale == pytest.approx(1 / float(tokens.std(unbiased=False)), rel=1e-4)
    loaded = type(model).from_pretrained(tmp_path)
    support = torch.randn(2, 6, 16)
    labels = torch.arange(3).repeat_interleave(2).repeat(2, 1)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    heads = loaded.generate_heads(support, labels, num_samples=2, generator=generator())
    assert heads.shape == (2, 2, 3, 17) and torch.equal(heads, model.generate_heads(support, labels, num_samples=2, generator=generator()))


def test_the_zoo_size_ablation_trains_on_the_first_tasks_only(zoo, tmp_path):
    settings = dict(config_overrides=TINY, vae_steps=1, alignment_steps=1, num_steps=1, batch_size=8, validation_fraction=0.25, ema_decay=None,
                    seed=0, **QUIET)
    model = train_d2nwg(zoo, tmp_path, num_tasks=40, **settings)
    stages = json.loads((tmp_path / HISTORY_NAME).read_text())["stages"]
    assert {(s["num_train_tasks"], s["num_validation_tasks"]) for s in stages.values()} == {(30, 10)}
    assert model.config.harvest_config["num_tasks_trained"] == 40
    # the first 40 tasks' statistics, not the whole zoo's
    first = resolve_head_dataset(zoo)[0].select(range(40))
    train, _ = split_rows(first.select_columns(["targets"]), 0.25, 0, item_name="task")
    tokens = torch.as_tensor(train.with_format("torch")[:]["targets"]).flatten(0, 2).double()
    torch.testing.assert_close(model.weight_mean[0], tokens.mean(0).float())
    with pytest.raises(ValueError, match="num_tasks=97 exceeds the 96 tasks of the zoo"):
        train_d2nwg(zoo, tmp_path / "other", num_tasks=97, **settings)
