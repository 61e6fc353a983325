"""Mc-Di's weight preparation: the vectorised head fit equals one Adam per task, per-task early stopping
freezes a stopped head, the local targets are the right trajectory points, and the head harvest is
consistent, resumable after a kill, and refuses a directory made with other settings."""

from __future__ import annotations

import pytest
import torch
from helpers.mcdi import gaussian_distribution, harvest_tiny_heads
from helpers.tolerances import adam_delta_atol

from ocd_hf import task_heads as heads_module
from ocd_hf.task_heads import EarlyStopping, EpisodeTasks, fit_task_heads, harvest_task_heads, load_head_metadata
from ocd_hf.weight_datasets import round_to_storage


def noisy_tasks(num_tasks: int = 6, num_classes: int = 3, per_class: int = 8, dim: int = 8, seed: int = 0):
    """Tasks of growing label noise (some overfit early, some late): items ``(B, n, d)``, labels ``(B, n)``."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(num_tasks, num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class).repeat(num_tasks, 1)
    spread = torch.linspace(0.3, 3.0, num_tasks).view(-1, 1, 1)
    items = means.gather(1, labels.unsqueeze(-1).expand(-1, -1, dim)) + spread * torch.randn(num_tasks, labels.shape[1], dim, generator=generator)
    return items, labels


STOPPING = EarlyStopping(holdout_fraction=0.25, patience=5, min_delta=1e-4, min_steps=4)


@pytest.mark.parametrize("settings", [
    {},
    {"sam_rho": 0.05, "early_stopping": STOPPING},
    {"early_stopping": EarlyStopping(holdout_fraction=0.25, criterion="generalisation_loss", gl_alpha=2.0, min_steps=4)},
], ids=["plain", "sam+patience", "generalisation-loss"])
def test_vectorised_fit_equals_one_adam_per_task(settings):
    items, labels = noisy_tasks()
    steps, lr = 80, 0.005
    theta0 = 0.01 * torch.randn(6, 3, 9, generator=torch.Generator().manual_seed(1))
    batch = fit_task_heads(items, labels, 3, steps=steps, lr=lr, theta0=theta0, **settings)
    atol = adam_delta_atol(lr, steps, reduction_length=items.shape[1] + items.shape[2])
    for b in range(6):
        alone = fit_task_heads(items[b : b + 1], labels[b : b + 1], 3, steps=steps, lr=lr, theta0=theta0[b : b + 1], **settings)
        assert int(alone.num_steps) == int(batch.num_steps[b]) and int(alone.stopped_at) == int(batch.stopped_at[b])
        torch.testing.assert_close(batch.targets[b], alone.targets[0], rtol=0, atol=atol)
        torch.testing.assert_close(batch.losses[b], alone.losses[0], rtol=1e-4, atol=1e-6)
    if "early_stopping" in settings:
        assert len(set(batch.stopped_at.tolist())) > 1  # the tasks stop at different steps
    else:  # without early stopping only the k+1 returned states are kept: the same states as from the whole trajectory
        whole = fit_task_heads(items, labels, 3, steps=steps, lr=lr, theta0=theta0, return_trajectory=True, **settings)
        assert torch.equal(whole.targets, batch.targets) and torch.equal(whole.losses, batch.losses)
        assert torch.equal(whole.trajectory[:, [steps // 3, 2 * steps // 3, steps]], batch.targets)


def test_early_stopping_freezes_a_stopped_head_and_keeps_its_best_step():
    items, labels = noisy_tasks()
    stopping = EarlyStopping(holdout_fraction=0.25, patience=5, min_steps=4)  # min_delta 0: the best step is the argmin
    fit = fit_task_heads(items, labels, 3, steps=120, early_stopping=stopping, num_targets=3, return_trajectory=True,
                         generator=torch.Generator().manual_seed(0))
    trajectory = fit.trajectory  # (B, steps+1, N, d+1)
    first = int(fit.stopped_at.argmin())
    stop = int(fit.stopped_at[first])
    assert stop < 120 and int(fit.stopped_at.max()) > stop  # one task stops while another goes on
    for b in range(6):
        after = trajectory[b, int(fit.stopped_at[b]) :]
        assert torch.equal(after, after[:1].expand_as(after)), "a stopped head changed"
    assert not torch.equal(trajectory[int(fit.stopped_at.argmax()), stop], trajectory[int(fit.stopped_at.argmax()), stop + 1])
    # M is the step of the best held-out loss; the targets are θ_{iM/3}, the last θ_M; stopping came `patience` steps later.
    held = heads_module.holdout_mask(labels, 3, stopping.holdout_fraction).float()
    for b in range(6):
        path = trajectory[b, : int(fit.stopped_at[b]) + 1]
        losses = heads_module.task_losses(path, items[b].expand(len(path), -1, -1), labels[b].expand(len(path), -1), held[b].expand(len(path), -1))
        best = stopping.min_steps + int(losses[stopping.min_steps :].argmin())
        M = int(fit.num_steps[b])
        assert M == best
        assert int(fit.stopped_at[b]) in (M + stopping.patience, 120)
        for i in range(1, 4):
            assert torch.equal(fit.targets[b, i - 1], trajectory[b, i * M // 3])
        torch.testing.assert_close(fit.heldout_losses[b, -1], losses[M])
    assert torch.equal(fit.theta0, trajectory[:, 0])


def test_sam_and_augmentation_change_the_trajectory():
    items, labels = noisy_tasks(num_tasks=2)
    theta0 = 0.01 * torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(1))
    plain = fit_task_heads(items, labels, 3, steps=30, theta0=theta0)
    sam = fit_task_heads(items, labels, 3, steps=30, theta0=theta0, sam_rho=0.5)
    noisy = fit_task_heads(items, labels, 3, steps=30, theta0=theta0, noise_std=0.5, generator=torch.Generator().manual_seed(2))
    again = fit_task_heads(items, labels, 3, steps=30, theta0=theta0, noise_std=0.5, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(plain.targets, sam.targets) and not torch.allclose(plain.targets, noisy.targets)
    assert torch.equal(noisy.targets, again.targets)  # seeded
    assert (plain.losses[:, -1] < plain.losses[:, 0]).all()


def test_fit_errors_name_the_fix():
    items, labels = noisy_tasks(num_tasks=1, per_class=1)
    with pytest.raises(ValueError, match="fit_on='pool'.*early_stopping=None"):
        fit_task_heads(items, labels, 3, steps=10, early_stopping=EarlyStopping())
    with pytest.raises(ValueError, match=r"labels must be integer class indices in \[0, 2\)"):
        fit_task_heads(items, labels, 2, steps=10)
    with pytest.raises(ValueError, match="steps .* must be >= num_targets"):
        fit_task_heads(items, labels, 3, steps=2)
    with pytest.raises(ValueError, match="min_steps .* must be >= num_targets"):
        fit_task_heads(items, labels, 3, steps=10, num_targets=5, early_stopping=EarlyStopping(min_steps=2))
    with pytest.raises(ValueError, match="criterion must be one of"):
        EarlyStopping(criterion="loss")


# ----- the harvest ---------------------------------------------------------------------------------


HARVEST = dict(num_tasks=20, n_way=3, k_shot=2, steps=30, batch_size=4, shard_size=4, progress=False)


def test_harvest_rows_hold_each_tasks_support_and_its_fit(tmp_path):
    distribution = gaussian_distribution(num_classes=10, dim=6)
    dataset = harvest_task_heads(distribution, tmp_path, fit_on="pool", pool_size=5, seed=3, encoder_id="synthetic", **HARVEST)
    metadata = load_head_metadata(tmp_path)
    assert metadata["complete"] and metadata["num_samples"] == 20 and metadata["encoder"]["id"] == "synthetic"
    assert dataset[0]["targets"].shape == (3, 3, 7) and dataset[0]["theta0"].shape == (3, 7)
    features = distribution.features("embedding")
    rows = dataset[:]
    assert torch.equal(rows["id"], torch.arange(20))
    assert torch.equal(rows["support"], features[rows["support_index"].flatten(1)])
    assert torch.equal(rows["support_labels"], torch.tensor([0, 0, 1, 1, 2, 2]).repeat(20, 1))
    labels = torch.from_numpy(distribution.row_labels)
    assert torch.equal(labels[rows["support_index"]], rows["classes"].unsqueeze(-1).expand(-1, -1, 2))
    # Refitting a task alone on its pool from its stored θ_0 gives its stored targets.
    tasks = EpisodeTasks(distribution, 3, 2, fit_on="pool", pool_size=5, seed=3)(8, 12)
    assert tasks.fit_items.shape == (4, 21, 6)
    assert torch.equal(tasks.fit_items.view(4, 3, 7, 6)[:, :, :2], tasks.support.view(4, 3, 2, 6))  # the support is in the pool
    for b in range(4):
        refit = fit_task_heads(tasks.fit_items[b : b + 1], tasks.fit_labels[b : b + 1], 3, steps=30, theta0=rows["theta0"][8 + b : 9 + b])
        torch.testing.assert_close(refit.targets[0], rows["targets"][8 + b], rtol=0, atol=adam_delta_atol(0.005, 30, 21 + 6))
        assert int(rows["steps"][8 + b]) == 30


def test_harvest_resumes_after_a_kill_and_refuses_other_settings(tmp_path, monkeypatch):
    distribution = gaussian_distribution(num_classes=10, dim=6)
    expected = harvest_task_heads(distribution, tmp_path / "uninterrupted", **HARVEST)[:]
    calls, kill_at = [], [3]
    fit = heads_module.fit_task_heads

    class Killed(Exception):
        pass

    def killed_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) in kill_at:
            raise Killed
        return fit(*args, **kwargs)

    monkeypatch.setattr(heads_module, "fit_task_heads", killed_on_third_shard)
    with pytest.raises(Killed):
        harvest_task_heads(distribution, tmp_path / "killed", **HARVEST)
    assert len(list((tmp_path / "killed" / "data").glob("train-*.arrow"))) == 2
    calls.clear()
    kill_at.clear()
    resumed = harvest_task_heads(distribution, tmp_path / "killed", **HARVEST)[:]
    assert len(calls) == 3  # only the 3 missing shards were fitted
    for column, values in expected.items():
        assert torch.equal(resumed[column], values), column
    with pytest.raises(ValueError, match=r"other settings.*harvest_config.lr"):
        harvest_task_heads(distribution, tmp_path / "killed", **{**HARVEST, "lr": 0.01})


def test_bfloat16_storage_holds_the_rounded_heads(tmp_path):
    distribution = gaussian_distribution(num_classes=10, dim=6)
    full = harvest_task_heads(distribution, tmp_path / "float32", **HARVEST)[:]
    half = harvest_task_heads(distribution, tmp_path / "bfloat16", dtype="bfloat16", **HARVEST)[:]
    assert half["targets"].dtype == torch.float32
    assert torch.equal(half["targets"], round_to_storage(full["targets"], "bfloat16"))
    assert torch.equal(half["support"], full["support"])  # embeddings stay float32


def test_harvest_errors_name_the_fix(tmp_path):
    distribution = gaussian_distribution(num_classes=10, dim=6)
    with pytest.raises(ValueError, match="fit_on must be one of"):
        EpisodeTasks(distribution, 3, 1, fit_on="query")
    with pytest.raises(ValueError, match="pool_size >= 1"):
        EpisodeTasks(distribution, 3, 1, fit_on="pool", pool_size=0)
    with pytest.raises(ValueError, match="fewer than k_shot \\+ q_queries = 21 items.*drop_small_classes"):
        EpisodeTasks(distribution, 3, 1, fit_on="pool", pool_size=20)  # 20 items per class
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        harvest_task_heads(distribution, tmp_path, num_tasks=0)
    with pytest.raises(TypeError, match="TaskDistribution or EpisodeTasks"):
        harvest_task_heads(distribution.dataset, tmp_path, num_tasks=4)
    with pytest.raises(ValueError, match=r"theta0 must have shape \(1, 3, 9\)"):
        fit_task_heads(*noisy_tasks(num_tasks=1), 3, steps=5, theta0=torch.zeros(1, 3, 8))
    from ocd_hf.weight_datasets import write_metadata

    write_metadata(tmp_path / "other", {"format_version": 1, "target_module": "fc"})
    with pytest.raises(ValueError, match="not a head dataset; make one with harvest_task_heads"):
        load_head_metadata(tmp_path / "other")


def test_a_head_harvest_has_a_dataset_card_that_keeps_hand_written_text(tmp_path):
    from datasets import load_dataset

    harvest_tiny_heads(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "24 3-way 1-shot heads on `synthetic` embeddings" in card
    assert "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11" in card  # the classes the heads were fitted on
    assert len(load_dataset(str(tmp_path), split="train")) == 24  # the card's configs point datasets at the shards
    (tmp_path / "README.md").write_text(card + "\nNotes of my own.\n")
    harvest_tiny_heads(tmp_path)  # finished: resumes nothing, rewrites the generated block only
    assert (tmp_path / "README.md").read_text().endswith("Notes of my own.\n")
