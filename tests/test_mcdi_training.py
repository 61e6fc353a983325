"""Training a Mc-Di head generator: REPTILE's vectorised inner loops equal a loop over tasks, REPTILE and
single-level runs killed and resumed equal uninterrupted ones, bad settings are refused, and an end-to-end
smoke test: harvest 64 synthetic tasks, train, generate heads that beat chance on held-out classes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from helpers.mcdi import gaussian_distribution, harvest_tiny_heads
from helpers.tolerances import adam_delta_atol

from ocd_hf.episodes import EpisodeSampler
from ocd_hf.methods.mcdi import McDiTrainingArguments, ReptileTrainer, train_head_generator
from ocd_hf.methods.mcdi import training as training_module
from ocd_hf.task_heads import harvest_task_heads
from ocd_hf.trainer import CHECKPOINTS_DIR, HISTORY_NAME, list_checkpoints

TINY = {"denoiser_config": {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 64}}
QUIET = {"progress": False, "logging_steps": 2}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """24 tasks, 3-way 1-shot, d = 6, three local targets each."""
    directory = tmp_path_factory.mktemp("heads")
    harvest_tiny_heads(directory)
    return directory


def state_of(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_reptile_meta_step_equals_one_inner_loop_per_task(heads, tmp_path):
    args = McDiTrainingArguments(reptile=True, meta_batch_size=4, inner_steps=3, meta_optimizer="sgd", meta_lr=1.0, ema_decay=None,
                                 validation_fraction=0.0, num_steps=1, **QUIET)
    dataset, metadata = training_module.resolve_head_dataset(heads)
    train_set = dataset.select_columns(training_module.TRAINING_COLUMNS).with_format("torch")
    torch.manual_seed(0)
    from ocd_hf.methods.mcdi import McDiConfig, McDiHeadGenerator

    model = McDiHeadGenerator(McDiConfig(embedding_dim=6, max_num_classes=3, **TINY))
    for parameter in model.parameters():  # not the zero-initialised output layer: every path matters
        torch.nn.init.normal_(parameter, std=0.1)
    loss = training_module.HeadDiffusionLoss(model, [0, 1, 2])
    trainer = ReptileTrainer(model, loss, train_set, None, args, Accelerator(), tmp_path)
    before = state_of(model.denoiser)
    # The reference: a copy of φ per task, its own Adam, the same draws (taken for the whole meta-batch, as the trainer does).
    generator = torch.Generator().manual_seed(training_module.step_seed(args.seed, 0))
    prototypes, targets = loss.prepare(train_set[trainer.task_indices(0)])
    draws = [loss.draw(targets, generator) for _ in range(args.inner_steps)]
    adapted = []
    for task in range(4):
        copy_ = copy.deepcopy(model.denoiser)
        optimizer = torch.optim.Adam(copy_.parameters(), lr=args.inner_lr)
        for states, noise in draws:
            value = loss.task_loss(copy_, prototypes[task : task + 1], targets[task : task + 1], noise[task : task + 1], states[task : task + 1])
            optimizer.zero_grad()
            value.sum().backward()
            optimizer.step()
        adapted.append(state_of(copy_))
    trainer.meta_step(0)
    after = state_of(model.denoiser)
    # Gradients are float32 sums over k·N = 9 rows of 64-wide layers, summed in another order by vmap; Adam turns their
    # rounding into steps relative to lr. A real bug (another task's gradient, a missing step) moves weights by ~lr.
    atol = adam_delta_atol(args.inner_lr, args.inner_steps, reduction_length=9 * 64)
    for name in before:  # meta_lr = 1: φ becomes the mean of the adapted copies
        expected = torch.stack([weights[name] for weights in adapted]).mean(0)
        torch.testing.assert_close(after[name], expected, rtol=0, atol=atol, msg=name)
        assert not torch.equal(after[name], before[name]), name


def test_reptile_outer_adam_moves_every_weight_by_meta_lr_first(heads, tmp_path):
    model = train_head_generator(heads, tmp_path, config_overrides=TINY, reptile=True, meta_optimizer="adam", meta_lr=1e-3, num_steps=1,
                                 meta_batch_size=4, ema_decay=None, validation_fraction=0.0, seed=0, **QUIET)
    torch.manual_seed(0)  # the same initialisation
    from ocd_hf.methods.mcdi import McDiConfig, McDiHeadGenerator

    initial = McDiHeadGenerator(McDiConfig(**{**model.config.to_dict(), "model_type": None}))
    moved = torch.cat([(a - b).detach().abs().flatten() for a, b in zip(model.denoiser.parameters(), initial.denoiser.parameters())])
    # Adam's first step is lr · g/(|g| + eps): meta_lr for every weight whose REPTILE direction is not ~0
    # (the literal Alg. 2 update, ζ · mean(φ_i − φ), would move them by about 1e-3 · 3 · inner_lr = 1.5e-5).
    assert float(moved.max()) <= 1e-3 * (1 + 1e-4)
    assert float(((moved - 1e-3).abs() < 1e-6).float().mean()) > 0.95


@pytest.mark.parametrize("reptile", [True, False], ids=["reptile", "single-level"])
def test_a_killed_run_resumed_equals_an_uninterrupted_one(heads, tmp_path, monkeypatch, reptile):
    settings = dict(config_overrides=TINY, num_steps=6, checkpointing_steps=2, batch_size=4, meta_batch_size=4, validation_fraction=0.25,
                    ema_decay=0.99, reptile=reptile, meta_optimizer="adam", seed=3, **QUIET)
    uninterrupted = train_head_generator(heads, tmp_path / "full", **settings)

    class Killed(Exception):
        pass

    step = "meta_step" if reptile else "training_step"
    owner = ReptileTrainer if reptile else training_module.GeneratorTrainer
    original = getattr(owner, step)
    calls = []

    def killed_in_step_five(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        return original(self, *args)

    monkeypatch.setattr(owner, step, killed_in_step_five)
    with pytest.raises(Killed):
        train_head_generator(heads, tmp_path / "killed", **settings)
    monkeypatch.setattr(owner, step, original)
    assert [c.name for c in list_checkpoints(tmp_path / "killed")] == ["checkpoint-2", "checkpoint-4"]
    resumed = train_head_generator(heads, tmp_path / "killed", resume_from_checkpoint="latest", **settings)
    for name, tensor in state_of(uninterrupted).items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    history = json.loads((tmp_path / "killed" / HISTORY_NAME).read_text())
    assert history["log_history"] == json.loads((tmp_path / "full" / HISTORY_NAME).read_text())["log_history"]
    assert [entry["step"] for entry in history["log_history"]] == [2, 4, 6] and "val_denoise_loss" in history["log_history"][0]
    assert (tmp_path / "killed" / CHECKPOINTS_DIR / "checkpoint-6").is_dir()


def test_training_saves_a_loadable_generator_and_its_history(heads, tmp_path):
    model = train_head_generator(heads, tmp_path, config_overrides=TINY, num_steps=4, batch_size=8, loss_type="twdi", ema_decay=None, **QUIET)
    config = model.config
    assert (config.loss_type, config.num_targets, config.embedding_dim, config.max_num_classes) == ("twdi", 3, 6, 3)
    assert config.encoder_id == "synthetic" and config.harvest_config["n_way"] == 3 and config.head_scale > 0
    assert json.loads((tmp_path / HISTORY_NAME).read_text())["global_step"] == 4
    mvdi = train_head_generator(heads, tmp_path / "mvdi", config_overrides=TINY, num_steps=1, loss_type="mvdi", ema_decay=None, **QUIET)
    assert mvdi.config.num_targets == 1
    card = (tmp_path / "README.md").read_text()
    assert "`loss_type` | twdi" in card
    source = config.task_distribution
    assert source["classes"] and len(source["class_names"]) == len(source["classes"]) and source["fit_on"] in ("support", "pool")
    assert f"{len(source['classes'])} classes of `{source['distribution']}`" in card and ", ".join(source["class_names"]) in card


def test_training_refuses_bad_settings(heads, tmp_path):
    with pytest.raises(ValueError, match=r"must divide the 3 local targets .* one of \[1, 3\]"):
        train_head_generator(heads, tmp_path, num_targets=2, num_steps=1, **QUIET)
    with pytest.raises(ValueError, match=r"config_overrides may only set .* got \['loss_type'\]"):
        train_head_generator(heads, tmp_path, config_overrides={"loss_type": "mvdi"}, num_steps=1, **QUIET)
    with pytest.raises(TypeError, match=r"Unknown training arguments \['inner_lrr'\]"):
        train_head_generator(heads, tmp_path, inner_lrr=0.1)
    with pytest.raises(ValueError, match="meta_batch_size=64 exceeds the 21 training tasks"):
        train_head_generator(heads, tmp_path, reptile=True, meta_batch_size=64, num_steps=1, **QUIET)


def test_smoke_generated_heads_beat_chance_on_held_out_classes(tmp_path):
    # 200 Gaussian classes in d = 16: harvest 64 5-way 1-shot tasks on 150 of them (each head fitted on a pool of
    # 11 items per class), train 300 steps, generate heads from the 1-shot supports of tasks over the other 50.
    distribution = gaussian_distribution(num_classes=200, per_class=20, dim=16)
    split = distribution.class_split({"train": list(range(150)), "test": list(range(150, 200))})
    harvest_task_heads(split["train"], tmp_path / "heads", num_tasks=64, n_way=5, k_shot=1, fit_on="pool", pool_size=10, steps=100,
                       batch_size=32, shard_size=32, progress=False)
    denoiser = {"denoiser_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}}
    generator = train_head_generator(tmp_path / "heads", tmp_path / "generator", config_overrides=denoiser, num_steps=300, batch_size=16,
                                     learning_rate=1e-3, validation_fraction=0.0, ema_decay=None, progress=False, logging_steps=10)
    log = json.loads((tmp_path / "generator" / HISTORY_NAME).read_text())["log_history"]
    assert log[-1]["denoise_loss"] < 0.5 * log[0]["denoise_loss"]
    episodes = EpisodeSampler(split["test"], 5, 1, q_queries=15, seed=1).sample(100, column="embedding")
    heads = generator.generate_heads(episodes.support, episodes.support_labels, generator=torch.Generator().manual_seed(0))[:, 0]
    logits = torch.baddbmm(heads[:, :, -1].unsqueeze(1), episodes.query, heads[:, :, :-1].transpose(1, 2))
    accuracy = float((logits.argmax(-1) == episodes.query_labels).float().mean())
    assert accuracy > 0.35, f"held-out 5-way accuracy {accuracy:.3f} (chance 0.20)"


def test_settings_that_leave_nothing_to_train_are_refused(heads, tmp_path):
    from ocd_hf.methods.mcdi import McDiConfig
    from ocd_hf.task_heads import load_head_metadata, load_task_heads

    with pytest.raises(ValueError, match="validation_fraction=0.99 of 24 task\\(s\\) leaves none to train on"):
        train_head_generator(heads, tmp_path, validation_fraction=0.99, num_steps=1, **QUIET)
    metadata = load_head_metadata(heads)
    with pytest.raises(ValueError, match="empty or lacks the columns.*harvest_task_heads"):
        train_head_generator((load_task_heads(heads).select([]), metadata), tmp_path, num_steps=1, **QUIET)
    with pytest.raises(ValueError, match="max_num_classes >= 2"):
        McDiConfig(max_num_classes=1)
    with pytest.raises(ValueError, match="head_scale must be positive"):
        McDiConfig(head_scale=0.0)
