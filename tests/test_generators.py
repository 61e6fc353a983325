"""The generators besides diffusion: ``"regression"`` (a deterministic MLP over the delta) and
``"label"`` (``q(y | I(x))`` combined with the exact per-label deltas)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.harvest_fixtures import build_backbone, build_dataset
from transformers import BertConfig, BertForSequenceClassification

from ocd_hf import OCDWrapper
from ocd_hf.finetune import overfit_deltas
from ocd_hf.methods.ocd.configuration import OCDConfig
from ocd_hf.methods.ocd.evaluation import evaluate_ocd
from ocd_hf.methods.ocd.harvest import harvest_deltas
from ocd_hf.methods.ocd.training import HISTORY_NAME, train_hypernetwork
from ocd_hf.target import find_target_linear

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMALL = {"factor_denoiser_config": {"hidden_dim": 32, "num_layers": 1, "embed_dim": 16}, "condition_hidden_dim": 16}
TRAIN = {"num_steps": 60, "batch_size": 8, "learning_rate": 3e-3, "logging_steps": 10, "progress": False}


def harvested(tmp_path: Path, kind: str = "bert", target: str = "classifier", num_samples: int = 24, **settings) -> tuple:
    backbone = build_backbone(kind)
    dataset = build_dataset(kind, num_samples)
    harvest_deltas(backbone, dataset, target, tmp_path / "deltas", batch_size=8, shard_size=8, progress=False, **settings)
    return backbone, dataset


def first_rows(dataset, count: int = 5) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    rows = dataset.with_format("torch")[:count]
    return {name: value for name, value in rows.items() if name != "label"}, rows["label"]


def history(path: Path) -> list[dict]:
    return json.loads((path / HISTORY_NAME).read_text())["log_history"]


@pytest.mark.parametrize("kind, target", [("bert", "classifier"), ("bert", "intermediate.dense"), ("deit", "classifier")])
def test_label_deltas_equal_overfitting_with_each_label(kind, target):
    backbone = build_backbone(kind)
    inputs, _ = first_rows(build_dataset(kind, 4))
    model = OCDWrapper.attach(backbone, target, generator="label", harvest_config={"optimizer": "adam", "lr": 1e-2, "steps": 3})
    per_label = model.label_deltas(model.conditioning(**inputs), inputs)
    assert per_label.shape == (4, 3, *model.config.weight_shape)
    for label in range(3):
        expected = overfit_deltas(backbone, model.target_layer, inputs, torch.full((4,), label), lr=1e-2).deltas
        torch.testing.assert_close(per_label[:, label], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(per_label[:, 0], per_label[:, 1])


def test_label_generator_trains_and_combines_the_exact_deltas(tmp_path):
    backbone, dataset = harvested(tmp_path)
    model = train_hypernetwork(tmp_path / "deltas", backbone, tmp_path / "label", config_overrides={"generator": "label", **SMALL}, **TRAIN)
    log = [entry["denoise_loss"] for entry in history(tmp_path / "label") if "denoise_loss" in entry]
    assert log[-1] < log[0]  # the cross-entropy of q(y | I(x)) on the harvested labels falls
    assert not hasattr(model.hypernetwork, "scale_net") and not hasattr(model.hypernetwork, "denoiser")

    inputs, _ = first_rows(dataset)
    cond = model.conditioning(**inputs)
    with torch.no_grad():
        hypernetwork = model.hypernetwork
        q = hypernetwork.label_logits(hypernetwork.embed_condition(hypernetwork.condition_values(cond))).softmax(-1)
    per_label = model.label_deltas(cond)
    expected = torch.einsum("bc,bcoi->boi", q, per_label)
    deltas = model.generate_deltas(cond, num_samples=2)
    torch.testing.assert_close(deltas[:, 0], expected)
    torch.testing.assert_close(deltas[:, 1], expected)

    model.config.label_combination = "sample"
    draws = model.generate_deltas(cond, num_samples=6, generator=torch.Generator().manual_seed(0))
    matches = (draws.unsqueeze(2) - per_label.unsqueeze(1)).flatten(3).abs().amax(-1) == 0  # (batch, draw, label)
    assert bool((matches.sum(-1) >= 1).all())  # every draw is exactly one label's delta
    again = model.generate_deltas(cond, num_samples=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)

    model.config.label_combination = "expectation"
    reloaded = OCDWrapper.from_pretrained(tmp_path / "label", backbone=backbone)
    assert reloaded.config.generator == "label"
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_label_generator_evaluation_has_no_scale_ablation(tmp_path):
    backbone, dataset = harvested(tmp_path)
    model = train_hypernetwork(tmp_path / "deltas", backbone, tmp_path / "label", config_overrides={"generator": "label", **SMALL}, **TRAIN)
    table = evaluate_ocd(model, dataset.select(range(8)), seeds=(0,), num_samples=2, batch_size=4, progress=False)
    names = [row.name for row in table.rows]
    assert "no_scale" not in names and "ocd_1" in names and "label_free" in names
    with pytest.raises(ValueError, match="no_scale row ablates the scale net"):
        evaluate_ocd(model, dataset.select(range(4)), seeds=(0,), rows=["no_scale"], progress=False)
    with pytest.raises(ValueError, match="no scale net"):
        model.generate_deltas(model.conditioning(**first_rows(dataset)[0]), rho=1.0)


@pytest.mark.parametrize("delta_mode", ["factorised", "full"])
def test_regression_generator_learns_the_deltas_deterministically(tmp_path, delta_mode):
    backbone, dataset = harvested(tmp_path)
    overrides = {"generator": "regression", "delta_mode": delta_mode, **SMALL}
    model = train_hypernetwork(tmp_path / "deltas", backbone, tmp_path / "regression", config_overrides=overrides, **TRAIN)
    log = history(tmp_path / "regression")
    train = [entry["denoise_loss"] for entry in log if "denoise_loss" in entry]
    assert train[-1] < train[0]
    assert not hasattr(model.hypernetwork, "denoiser")

    inputs, _ = first_rows(dataset)
    cond = model.conditioning(**inputs)
    draws = model.generate_deltas(cond, num_samples=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draws[:, 0], draws[:, 1]) and torch.equal(draws[:, 0], draws[:, 2])
    expected_shape = (model.config.out_features,) if delta_mode == "factorised" else model.config.weight_shape
    assert draws.shape == (5, 3, *expected_shape) and torch.isfinite(draws).all()
    reloaded = OCDWrapper.from_pretrained(tmp_path / "regression", backbone=backbone)
    torch.testing.assert_close(reloaded.generate_deltas(cond), draws[:, :1])


def test_generator_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="generator_type must be one of"):
        OCDConfig(generator_type="gan")
    with pytest.raises(ValueError, match="needs a classification backbone"):
        OCDConfig(generator="label", task="regression")
    with pytest.raises(ValueError, match="label_combination must be one of"):
        OCDConfig(generator="label", label_combination="mode")
    backbone = build_backbone("bert")
    inputs, _ = first_rows(build_dataset("bert", 2))
    model = OCDWrapper.attach(backbone, "intermediate.dense", generator="label")
    with pytest.raises(ValueError, match="not the model's head.*pass inputs="):
        model.label_deltas(model.conditioning(**inputs))
    model.config.harvest_config = {"loss": "my_module.focal_loss"}
    with pytest.raises(ValueError, match="harvested with the loss 'my_module.focal_loss'"):
        model.label_deltas(model.conditioning(**inputs), inputs)


def test_cross_fitted_harvest_uses_each_folds_own_model(tmp_path):
    dataset = build_dataset("bert", 10)
    base = build_backbone("bert", seed=0)
    calls = []

    def fit_fold(fold: int, rows: list[int]) -> torch.nn.Module:
        calls.append((fold, rows))
        return build_backbone("bert", seed=10 + fold)  # stands in for a model trained without `rows`

    deltas = harvest_deltas(
        base, dataset, "classifier", tmp_path / "cross", cross_fit=3, fit_fold=fit_fold, batch_size=4, shard_size=4,
        delta_storage="full", progress=False,
    )
    assert sorted(calls) == [(0, [0, 3, 6, 9]), (1, [1, 4, 7]), (2, [2, 5, 8])]
    rows = deltas.with_format("torch")[:]
    assert rows["id"].tolist() == list(range(10))
    inputs, labels = first_rows(dataset, 10)
    for fold in range(3):
        model = build_backbone("bert", seed=10 + fold)
        ids = torch.arange(fold, 10, 3)
        _, layer = find_target_linear(model, "classifier")
        expected = overfit_deltas(model, layer, {k: v[ids] for k, v in inputs.items()}, labels[ids]).deltas
        torch.testing.assert_close(rows["delta"][ids], expected, rtol=1e-5, atol=1e-8)
        with torch.no_grad():
            logits = model(**{k: v[ids] for k, v in inputs.items()}).logits
        torch.testing.assert_close(rows["model_output"][ids], logits)
    metadata = json.loads((tmp_path / "cross" / "harvest.json").read_text())
    assert metadata["harvest_config"]["cross_fit"] == 3
    assert metadata["base_layer_fingerprint"] == OCDConfig.from_backbone(base, "classifier").base_layer_fingerprint
    assert "3 folds" in (tmp_path / "cross" / "README.md").read_text()


def test_cross_fit_requests_that_cannot_work_are_refused(tmp_path):
    dataset = build_dataset("bert", 6)
    base = build_backbone("bert")
    with pytest.raises(ValueError, match="cross_fit must be an integer >= 2"):
        harvest_deltas(base, dataset, "classifier", tmp_path / "a", cross_fit=1, fit_fold=lambda f, r: base, progress=False)
    with pytest.raises(ValueError, match="cross_fit=K needs fit_fold="):
        harvest_deltas(base, dataset, "classifier", tmp_path / "b", cross_fit=2, progress=False)
    with pytest.raises(ValueError, match="fit_fold= is only used with cross_fit"):
        harvest_deltas(base, dataset, "classifier", tmp_path / "c", fit_fold=lambda f, r: base, progress=False)
    with pytest.raises(ValueError, match="at least as many rows"):
        harvest_deltas(base, dataset, "classifier", tmp_path / "d", cross_fit=7, fit_fold=lambda f, r: base, progress=False)
    settings = {k: v for k, v in base.config.to_dict().items() if k not in ("id2label", "label2id")}  # else they win over num_labels
    two_labels = BertForSequenceClassification(BertConfig(**settings, num_labels=2))
    with pytest.raises(ValueError, match="same architecture"):
        harvest_deltas(base, dataset, "classifier", tmp_path / "e", cross_fit=2, fit_fold=lambda f, r: two_labels, progress=False)
