"""D2NWG's weight VAE and zoo: the zoo keeps the last checkpoints of each task's training, and a VAE trained on it
(each loss, each vectorisation) gives back heads as accurate on their tasks as the originals."""

from __future__ import annotations

import pytest
import torch
from helpers.d2nwg import DIM, TINY
from helpers.mcdi import gaussian_distribution

from ocd_hf.methods.d2nwg import D2NWGConfig, D2NWGHeadGenerator, head_accuracy
from ocd_hf.methods.d2nwg.training import VAEStage, token_statistics
from ocd_hf.task_heads import fit_task_heads, harvest_task_heads


def test_the_last_spacing_keeps_the_last_checkpoints():
    items, labels = torch.randn(3, 6, DIM), torch.arange(3).repeat(2).repeat(3, 1)
    fit = fit_task_heads(items, labels, 3, steps=12, num_targets=4, target_spacing="last", return_trajectory=True,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(fit.targets, fit.trajectory[:, 9:13])
    quick = fit_task_heads(items, labels, 3, steps=12, num_targets=4, target_spacing="last", theta0=fit.theta0)  # only the kept states
    assert torch.equal(quick.targets, fit.targets)
    with pytest.raises(ValueError, match=r"target_spacing must be one of \('even', 'last'\)"):
        fit_task_heads(items, labels, 3, steps=12, target_spacing="first")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """24 3-way tasks over 12 Gaussian classes in d = 8, each head fitted on 10 items per class; its last 3 checkpoints."""
    distribution = gaussian_distribution(num_classes=12, per_class=20, dim=DIM, spread=0.7)
    heads = harvest_task_heads(distribution, tmp_path_factory.mktemp("zoo"), num_tasks=24, n_way=3, k_shot=2, fit_on="pool", pool_size=8,
                               steps=40, lr=0.05, num_targets=3, target_spacing="last", batch_size=24, progress=False)
    assert heads.info is not None and heads[0]["steps"] == 40
    return distribution, heads.with_format("torch")


def task_items(distribution, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of each task's classes ``(B, N·20, d)`` and their labels (the task's label of their class)."""
    features = distribution.features("embedding")
    rows = torch.stack([torch.stack([torch.as_tensor(distribution.rows_of(int(c))) for c in task]) for task in classes])  # (B, N, 20)
    labels = torch.arange(classes.shape[1]).repeat_interleave(rows.shape[2]).repeat(len(classes), 1)
    return features[rows.flatten(1)], labels


@pytest.mark.parametrize("vectorization, vae_loss", [("row", "paper"), ("model", "code"), ("layer", "paper")])
def test_a_vae_trained_on_the_zoo_gives_back_heads_as_accurate_as_the_originals(zoo, vectorization, vae_loss):
    distribution, heads = zoo
    torch.manual_seed(0)
    vae = {"latent_size": 8, "hidden_size": 64, "num_layers": 1}
    config = D2NWGConfig(embedding_dim=DIM, max_num_classes=3, max_shots=2, vectorization=vectorization, chunk_size=7, vae_loss=vae_loss,
                         encoder_type="row_aligned" if vectorization == "row" else "mlp", **{**TINY, "vae_config": vae})
    model = D2NWGHeadGenerator(config)
    batch = heads[:]
    mean, std = token_statistics(model, heads, [0, 1, 2])
    model.weight_mean.copy_(mean)
    model.weight_std.copy_(std)
    loss = VAEStage(model, [0, 1, 2], None)
    optimizer = torch.optim.Adam(model.vae.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        total = sum(value.mean() for value in loss(batch, generator).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    final = batch["targets"][:, -1]
    reconstructed = model.reconstruct_heads(final)
    assert float((reconstructed - final).pow(2).mean() / final.pow(2).mean()) < 0.05
    items, labels = task_items(distribution, batch["classes"])
    original_accuracy, accuracy = head_accuracy(final, items, labels), head_accuracy(reconstructed, items, labels)
    assert float(original_accuracy.mean()) > 0.8  # the heads are worth keeping
    assert float(accuracy.mean()) > float(original_accuracy.mean()) - 0.02, (float(accuracy.mean()), float(original_accuracy.mean()))
    if vae_loss == "code":
        assert float(model.vae.logvar.detach()) < -1.0  # the learned log-variance follows the shrinking L1 error
