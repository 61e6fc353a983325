"""Layer selection by loss entropy: weights restored bit for bit, ranking, determinism, outputs."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from helpers.models import TinyMLPConfig, TinyMLPRegressor
from matplotlib.image import imread
from scipy.integrate import trapezoid
from scipy.stats import gaussian_kde
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from ocd_hf.methods.ocd.layer_selection import LayerRanking, kde_entropy, reinit_perturbation, select_layer
from ocd_hf.target import linear_layers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = dict(num_draws=6, progress=False)


def tiny_bert() -> tuple[nn.Module, dict, torch.Tensor]:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = BertForSequenceClassification(config)
    input_ids = torch.randint(0, 50, (6, 5))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    return model, inputs, torch.randint(0, 3, (6,))


def tiny_mlp() -> tuple[nn.Module, dict, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyMLPRegressor(TinyMLPConfig(in_features=5, hidden_size=8, unused_layer=True))
    return model, {"features": torch.randn(8, 5)}, torch.randn(8)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bitwise_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(after[name], before[name])]
    assert changed == [], f"parameters changed by layer selection: {changed}"


def ranking_values(ranking: LayerRanking) -> list[tuple]:
    return [(row.name, row.mean_entropy, row.std_entropy, row.num_degenerate) for row in ranking.rows]


@pytest.mark.parametrize("perturbation", ["gaussian", "reinit"])
def test_weights_restored_bitwise(perturbation):
    model, inputs, labels = tiny_bert()
    model.train()
    before = snapshot(model)
    ranking = select_layer(model, inputs, labels, perturbation=perturbation, noise_scale=0.5, **FAST)
    assert_bitwise_equal(model, before)
    assert model.training, "the backbone's training mode must be restored"
    # The perturbation really moved the loss for some layer, so restoring was not a no-op.
    assert any(row.num_degenerate < ranking.num_samples for row in ranking.rows)


def test_weights_restored_after_exception_mid_selection():
    model, inputs, labels = tiny_bert()
    before = snapshot(model)
    calls = {"count": 0, "perturbed_when_raised": False}

    def failing_loss(output, target):
        calls["count"] += 1
        if calls["count"] == 9:  # second candidate, third draw
            current = model.state_dict()
            calls["perturbed_when_raised"] = any(not torch.equal(current[name], before[name]) for name in before)
            raise RuntimeError("injected failure")
        return nn.functional.cross_entropy(output, target, reduction="none")

    with pytest.raises(RuntimeError, match="injected failure"):
        select_layer(model, inputs, labels, loss_fn=failing_loss, **FAST)
    assert calls["perturbed_when_raised"], "the failure must happen while a layer is perturbed"
    assert_bitwise_equal(model, before)


def test_ranking_covers_every_called_linear_and_is_sorted():
    model, inputs, labels = tiny_bert()
    ranking = select_layer(model, inputs, labels, **FAST)
    layers = linear_layers(model)
    assert {row.name for row in ranking.rows} == set(layers)
    means = [row.mean_entropy for row in ranking.rows]
    assert means == sorted(means, reverse=True)
    assert ranking.best == ranking.rows[0].name
    for row in ranking.rows:
        assert row.shape == (layers[row.name].out_features, layers[row.name].in_features)
        assert np.isfinite(row.mean_entropy) and row.std_entropy >= 0
    assert ranking.num_samples == labels.shape[0] and ranking.num_draws == FAST["num_draws"]
    assert ranking.elapsed_seconds > 0


def test_seeded_selection_is_deterministic_and_keeps_caller_rng():
    model, inputs, labels = tiny_mlp()
    rng_state = torch.get_rng_state()
    first = select_layer(model, inputs, labels, seed=3, **FAST)
    assert torch.equal(torch.get_rng_state(), rng_state), "the caller's RNG state must be preserved"
    second = select_layer(model, inputs, labels, seed=3, **FAST)
    other = select_layer(model, inputs, labels, seed=4, **FAST)
    assert ranking_values(first) == ranking_values(second)
    assert ranking_values(first) != ranking_values(other)


@pytest.mark.parametrize("perturbation", ["gaussian", "reinit"])
def test_both_perturbations_on_a_regression_mlp(perturbation):
    model, inputs, labels = tiny_mlp()
    before = snapshot(model)
    ranking = select_layer(model, inputs, labels, perturbation=perturbation, **FAST)
    assert_bitwise_equal(model, before)
    assert {row.name for row in ranking.rows} == {"fc1", "fc2", "head"}
    head = next(row for row in ranking.rows if row.name == "head")
    assert head.num_degenerate == 0 and np.isfinite(head.mean_entropy)
    assert ranking.perturbation == perturbation


def test_reinit_draws_from_the_models_own_initialisation():
    model, _, _ = tiny_bert()
    layer = model.bert.encoder.layer[0].intermediate.dense
    original = layer.weight.detach().clone()
    perturb = reinit_perturbation(model, layer)
    first = perturb(original).clone()
    second = perturb(original).clone()
    assert not torch.equal(first, second)
    # BERT's _init_weights draws N(0, initializer_range); nn.Linear's default would have std ≈ 0.14 here.
    assert abs(first.std().item() - model.config.initializer_range) < 0.005
    assert torch.equal(layer.weight, original)


def test_layer_not_called_in_forward_is_excluded_and_refused():
    model, inputs, labels = tiny_mlp()
    ranking = select_layer(model, inputs, labels, **FAST)
    assert "unused" not in {row.name for row in ranking.rows}
    with pytest.raises(ValueError, match="not called in the forward pass"):
        select_layer(model, inputs, labels, candidates=["unused"], **FAST)


def test_explicit_candidates_resolved_by_name_and_unknown_rejected():
    model, inputs, labels = tiny_bert()
    ranking = select_layer(model, inputs, labels, candidates=["classifier", "attention.self.value"], **FAST)
    assert {row.name for row in ranking.rows} == {"classifier", "bert.encoder.layer.0.attention.self.value"}
    with pytest.raises(ValueError, match="matches no module"):
        select_layer(model, inputs, labels, candidates=["no_such_layer"], **FAST)


def test_output_dir_writes_json_markdown_and_png(tmp_path):
    model, inputs, labels = tiny_mlp()
    ranking = select_layer(model, inputs, labels, output_dir=tmp_path / "selection", **FAST)
    out = tmp_path / "selection"
    assert (out / "ranking.png").read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = imread(out / "ranking.png").shape
    assert height > 50 and width > 50
    assert LayerRanking.from_json(out / "ranking.json") == ranking
    assert json.loads((out / "ranking.json").read_text())["rows"][0]["name"] == ranking.best
    markdown = (out / "ranking.md").read_text()
    assert f"`{ranking.best}`" in markdown and markdown.count("\n| ") == len(ranking.rows) + 1


def test_batches_with_label_keys_match_one_dict_and_num_samples_truncates():
    model, inputs, labels = tiny_mlp()
    features = inputs["features"]
    batches = [{"features": features[:4], "labels": labels[:4]}, {"features": features[4:], "labels": labels[4:]}]
    whole = select_layer(model, inputs, labels, **FAST)
    batched = select_layer(model, batches, **FAST)
    assert [row.name for row in batched.rows] == [row.name for row in whole.rows]
    np.testing.assert_allclose(
        [row.mean_entropy for row in batched.rows], [row.mean_entropy for row in whole.rows], rtol=1e-6
    )
    assert select_layer(model, batches, num_samples=5, **FAST).num_samples == 5


def test_zero_noise_gives_degenerate_but_finite_scores():
    model, inputs, labels = tiny_mlp()
    ranking = select_layer(model, inputs, labels, noise_scale=0.0, **FAST)
    assert all(row.num_degenerate == ranking.num_samples for row in ranking.rows)
    assert all(np.isfinite(row.mean_entropy) for row in ranking.rows)


@pytest.mark.parametrize("bw_method", ["scott", "silverman", 0.4])
def test_kde_entropy_matches_scipy_gaussian_kde(bw_method):
    rng = np.random.default_rng(0)
    rows = np.stack([rng.normal(1.0, 0.1, 40), rng.exponential(1.0, 40), np.r_[rng.normal(0, 0.05, 20), rng.normal(3, 0.05, 20)]])
    entropy, degenerate = kde_entropy(torch.from_numpy(rows), bw_method)
    assert not degenerate.any()
    for row, estimate in zip(rows, entropy.tolist()):
        kde = gaussian_kde(row, bw_method=bw_method)
        width = float(np.sqrt(kde.covariance[0, 0]))
        grid = np.linspace(row.min() - 12 * width, row.max() + 12 * width, 200_001)
        density = kde(grid)
        reference = -trapezoid(density * np.log(np.maximum(density, 1e-300)), grid)
        assert estimate == pytest.approx(reference, abs=5e-3)


def test_kde_entropy_of_a_constant_row_is_finite_flagged_and_lowest():
    values = torch.stack([torch.full((10,), 0.7), torch.linspace(0.5, 0.9, 10)])
    entropy, degenerate = kde_entropy(values)
    assert degenerate.tolist() == [True, False]
    assert torch.isfinite(entropy).all() and entropy[0] < entropy[1]


def test_bad_arguments_raise_clear_errors():
    model, inputs, labels = tiny_mlp()
    with pytest.raises(ValueError, match="perturbation must be one of"):
        select_layer(model, inputs, labels, perturbation="dropout", **FAST)
    with pytest.raises(ValueError, match="at least 2"):
        select_layer(model, inputs, labels, num_draws=1, progress=False)
    with pytest.raises(ValueError, match="No labels"):
        select_layer(model, inputs, **FAST)
    with pytest.raises(ValueError, match="one loss per sample"):
        select_layer(model, inputs, labels, loss_fn=lambda output, target: output.sum(), **FAST)
