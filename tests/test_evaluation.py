"""Tests of OCD's evaluation and the shared results table on tiny random models (offline, CPU, a few seconds)."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from datasets import Array2D, Dataset, Features, List, Value
from helpers.models import TinyMLPConfig, TinyMLPRegressor
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification

from ocd_hf import OCDWrapper
from ocd_hf.cli import evaluate_from_paths
from ocd_hf.finetune import overfit_deltas
from ocd_hf.methods.ocd.evaluation import NearestNeighbourDeltas, evaluate_ocd
from ocd_hf.results import MetricAccumulator, ResultRow, ResultsTable, aggregate_results, count_flips
from ocd_hf.target import capture_conditioning, inject_deltas

TINY_OCD = {
    "denoiser_config": {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4,
    },
    "condition_hidden_dim": 16,
    "num_inference_steps": 2,
    "log_rho_mean": math.log(1e-3),
    "log_rho_std": 0.1,
}
NUM_CLASSES = 3


def delta_dataset(backbone, layer, inputs, labels, task):
    """A delta dataset in the contract's format, harvested with overfit_deltas."""
    with torch.no_grad():
        cond = capture_conditioning(backbone, layer, inputs)
    result = overfit_deltas(backbone, layer, inputs, labels, task=task)
    out_f, in_f = layer.weight.shape
    features = Features(
        {
            "id": Value("int64"),
            "label": Value("int64" if task == "classification" else "float32"),
            "delta": Array2D((out_f, in_f), "float32"),
            "rho": Value("float32"),
            "layer_input": List(Value("float32")),
            "layer_output": List(Value("float32")),
            "model_output": List(Value("float32")),
            "loss_before": Value("float32"),
            "loss_after": Value("float32"),
        }
    )
    columns = {
        "id": np.arange(labels.shape[0]),
        "label": labels.numpy(),
        "delta": result.deltas.numpy(),
        "rho": result.deltas.pow(2).mean((1, 2)).sqrt().numpy(),
        "layer_input": cond.layer_input.numpy(),
        "layer_output": cond.layer_output.numpy(),
        "model_output": cond.model_output.numpy(),
        "loss_before": result.loss_before.numpy(),
        "loss_after": result.loss_after.numpy(),
    }
    return Dataset.from_dict(columns, features=features), result.deltas


@pytest.fixture(scope="module")
def bert_setup():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=NUM_CLASSES)
    backbone = BertForSequenceClassification(config).eval()
    model = OCDWrapper.attach(backbone, "classifier", **TINY_OCD)
    alternative = OCDWrapper.attach(backbone, "bert.pooler.dense", **TINY_OCD)
    train = {"input_ids": torch.randint(0, 50, (10, 6)), "attention_mask": torch.ones(10, 6, dtype=torch.long)}
    train_labels = torch.randint(0, NUM_CLASSES, (10,))
    deltas, train_deltas = delta_dataset(backbone, model.target_layer, train, train_labels, "classification")
    test = {"input_ids": torch.randint(0, 50, (12, 6)), "attention_mask": torch.ones(12, 6, dtype=torch.long)}
    test["attention_mask"][:4, 4:] = 0
    test_labels = torch.randint(0, NUM_CLASSES, (12,))
    batches = [({k: v[:7] for k, v in test.items()}, test_labels[:7]), ({k: v[7:] for k, v in test.items()}, test_labels[7:])]
    return {
        "backbone": backbone, "model": model, "alternative": alternative, "deltas": deltas, "train": train,
        "train_deltas": train_deltas, "test": test, "test_labels": test_labels, "batches": batches,
    }


@pytest.fixture(scope="module")
def bert_results(bert_setup, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("evaluation")
    table = evaluate_ocd(
        bert_setup["model"], bert_setup["batches"], delta_dataset=bert_setup["deltas"], alternative_model=bert_setup["alternative"],
        seeds=(0, 1), num_samples=3, output_dir=output_dir, progress=False,
    )
    return table, output_dir


ALL_ROWS = ["base", "ocd_1", "ocd_ens3", "ocd_mean3", "no_scale", "nearest_neighbour", "alternative_layer", "oracle", "label_free"]
STOCHASTIC = {"ocd_1", "ocd_ens3", "ocd_mean3", "no_scale", "alternative_layer"}


def test_every_classification_row_is_computed_and_finite(bert_results):
    table, _ = bert_results
    assert [row.name for row in table.rows] == ALL_ROWS
    for row in table.rows:
        assert row.num_runs == (2 if row.name in STOCHASTIC else 1), row.name
        for metric in ("accuracy", "balanced_accuracy", "cross_entropy"):
            assert all(math.isfinite(v) for v in row.values[metric]), (row.name, metric)
        if row.name != "base":
            assert {"flip_rate", "flips_fixed", "flips_broken"} <= set(row.values)
            assert all(f + b <= r * 12 + 1e-9 for f, b, r in zip(row.values["flips_fixed"], row.values["flips_broken"], row.values["flip_rate"]))
    for name in ("ocd_1", "ocd_ens3", "ocd_mean3", "no_scale", "nearest_neighbour", "label_free"):
        assert all(-1.0 <= v <= 1.0 for v in table[name].values["delta_cosine"]), name
    assert table.metadata["num_examples"] == 12
    assert table["oracle"].kind == "bound" and table["label_free"].kind == "bound"


def test_oracle_lowers_the_cross_entropy(bert_results):
    table, _ = bert_results
    assert table["oracle"].mean("cross_entropy") <= table["base"].mean("cross_entropy")


def test_base_row_equals_a_direct_backbone_evaluation(bert_setup, bert_results):
    table, _ = bert_results
    with torch.no_grad():
        logits = bert_setup["backbone"](**bert_setup["test"]).logits
    labels = bert_setup["test_labels"]
    assert table["base"].values["accuracy"] == [pytest.approx((logits.argmax(-1) == labels).float().mean().item())]
    assert table["base"].values["cross_entropy"] == [pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)]


def test_label_free_and_oracle_equal_a_per_label_recomputation(bert_setup, bert_results):
    table, _ = bert_results
    backbone, layer = bert_setup["backbone"], bert_setup["model"].target_layer
    inputs, labels = bert_setup["test"], bert_setup["test_labels"]
    with torch.no_grad():
        probs = backbone(**inputs).logits.softmax(-1)
    per_label = [overfit_deltas(backbone, layer, inputs, torch.full_like(labels, y)).deltas for y in range(NUM_CLASSES)]
    mixed = sum(probs[:, y, None, None] * per_label[y] for y in range(NUM_CLASSES))
    oracle = overfit_deltas(backbone, layer, inputs, labels).deltas
    for name, deltas in (("label_free", mixed), ("oracle", oracle)):
        with torch.no_grad(), inject_deltas(layer, deltas):
            logits = backbone(**inputs).logits
        assert table[name].values["cross_entropy"] == [pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)], name


def test_files_are_written(bert_results):
    table, output_dir = bert_results
    data = json.loads((output_dir / "results.json").read_text())
    assert [row["name"] for row in data["rows"]] == ALL_ROWS
    assert ResultsTable.from_json(output_dir / "results.json").to_markdown() == table.to_markdown()
    markdown = (output_dir / "results.md").read_text()
    for name in ALL_ROWS:
        assert f"| {name}" in markdown
    assert "| oracle † |" in markdown and "n seeds" in markdown and " ± " in markdown
    png = (output_dir / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_every_classification_row_reports_calibration(bert_setup, bert_results):
    """``ece`` and ``brier`` in every row, the base row's equal to a direct computation, each row's
    reliability diagram in the metadata (seeds pooled), in results.md and drawn in results.png."""
    table, output_dir = bert_results
    for row in table.rows:
        assert all(0.0 <= v <= 1.0 for v in row.values["ece"]) and all(0.0 <= v <= 2.0 for v in row.values["brier"]), row.name
        assert len(row.values["ece"]) == len(row.values["brier"]) == row.num_runs
    with torch.no_grad():
        probs = bert_setup["backbone"](**bert_setup["test"]).logits.double().softmax(-1)
    labels = bert_setup["test_labels"]
    brier = (probs - F.one_hot(labels, NUM_CLASSES)).pow(2).sum(1).mean().item()
    confidence, correct = probs.max(1).values, probs.argmax(1) == labels
    bins = (confidence * 15).long().clamp(max=14)
    ece = sum(abs(correct[bins == b].double().sum() - confidence[bins == b].sum()).item() for b in range(15)) / len(labels)
    assert table["base"].values["brier"] == [pytest.approx(brier, rel=1e-5)]
    assert table["base"].values["ece"] == [pytest.approx(ece, rel=1e-5, abs=1e-7)]
    reliability = table.metadata["reliability"]
    assert table.metadata["calibration_bins"] == 15 and list(reliability) == ALL_ROWS
    for row in table.rows:
        assert sum(reliability[row.name]["count"]) == 12 * row.num_runs, row.name
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["metadata"]["reliability"]["base"] == reliability["base"]
    markdown = (output_dir / "results.md").read_text()
    assert "| cross_entropy | ece | brier |" in markdown and "- brier: Brier score" in markdown
    png = (output_dir / "results.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == round(3 * 4.5 * 110)  # accuracy, cross-entropy, reliability
    assert list(table.reliability_rows()) == ["base", table.best_generated_row().name]
    assert table.best_generated_row().kind == "OCD"


def test_calibration_bins_are_a_setting(bert_setup):
    table = evaluate_ocd(bert_setup["model"], bert_setup["batches"], rows=["base"], seeds=(0,), calibration_bins=4, progress=False)
    assert table.metadata["calibration_bins"] == 4 and len(table.metadata["reliability"]["base"]["count"]) == 4
    with pytest.raises(ValueError, match="calibration_bins"):
        evaluate_ocd(bert_setup["model"], bert_setup["batches"], rows=["base"], calibration_bins=0, progress=False)


def test_same_seed_gives_the_same_draws_and_another_seed_does_not(bert_setup):
    table = evaluate_ocd(bert_setup["model"], bert_setup["batches"], rows=["ocd_1"], seeds=(5, 5, 6), progress=False)
    cross_entropy = table["ocd_1"].values["cross_entropy"]
    assert cross_entropy[0] == cross_entropy[1] != cross_entropy[2]


def test_ocd_rows_equal_the_wrappers_own_forward(bert_setup):
    model = bert_setup["model"]
    inputs, labels = bert_setup["batches"][0]
    table = evaluate_ocd(model, [(inputs, labels)], rows=["ocd_1", "ocd_ens3", "ocd_mean3"], seeds=(7,), num_samples=3, progress=False)
    outputs = model(**inputs, num_samples=3, generator=torch.Generator().manual_seed(7), return_draws=True, return_mean_network=True)
    expected = {
        "ocd_1": outputs.draw_logits[:, 0], "ocd_ens3": outputs.logits, "ocd_mean3": outputs.mean_network_logits,
    }
    for name, logits in expected.items():
        assert table[name].values["cross_entropy"] == [pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)], name
        assert table[name].values["accuracy"] == [pytest.approx((logits.argmax(-1) == labels).float().mean().item())], name


def test_evaluate_from_saved_paths(bert_setup, tmp_path):
    bert_setup["backbone"].save_pretrained(tmp_path / "backbone")
    backbone = BertForSequenceClassification.from_pretrained(tmp_path / "backbone").eval()
    OCDWrapper.attach(backbone, "classifier", **TINY_OCD).save_pretrained(tmp_path / "ocd")
    test = bert_setup["test"]
    Dataset.from_dict({
        "input_ids": test["input_ids"].numpy(), "attention_mask": test["attention_mask"].numpy(), "label": bert_setup["test_labels"].numpy(),
    }).save_to_disk(tmp_path / "data")
    table = evaluate_from_paths(
        str(tmp_path / "ocd"), str(tmp_path / "data"), str(tmp_path / "out"), rows=["base", "ocd_1"], seeds=(0,), max_examples=8, progress=False,
    )
    assert table.metadata["num_examples"] == 8
    assert ResultsTable.from_json(tmp_path / "out" / "results.json")["ocd_1"].values == table["ocd_1"].values


def test_a_dataset_gives_the_same_results_as_batches(bert_setup):
    test = bert_setup["test"]
    dataset = Dataset.from_dict({
        "text": ["unused"] * 12,
        "input_ids": test["input_ids"].numpy(),
        "attention_mask": test["attention_mask"].numpy(),
        "label": bert_setup["test_labels"].numpy(),
    })
    from_dataset = evaluate_ocd(bert_setup["model"], dataset, rows=["base", "oracle"], seeds=(0,), batch_size=5, progress=False)
    from_batches = evaluate_ocd(bert_setup["model"], bert_setup["batches"], rows=["base", "oracle"], seeds=(0,), progress=False)
    for name in ("base", "oracle"):
        for metric in ("accuracy", "cross_entropy"):
            assert from_dataset[name].values[metric] == pytest.approx(from_batches[name].values[metric], rel=1e-5)


def test_nearest_neighbour_of_a_training_sample_is_itself(bert_setup):
    neighbours = NearestNeighbourDeltas(bert_setup["deltas"], chunk_size=3)
    with torch.no_grad():
        cond = capture_conditioning(bert_setup["backbone"], bert_setup["model"].target_layer, bert_setup["train"])
    deltas, index, distance = neighbours(cond)
    assert index.tolist() == list(range(10))
    assert distance.max().item() == pytest.approx(0.0, abs=1e-4)
    assert torch.equal(deltas, bert_setup["train_deltas"])


def test_count_flips_on_a_constructed_case():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    base = torch.tensor([0, 0, 2, 1, 1, 0])  # right, wrong, right, wrong, right, wrong
    new = torch.tensor([0, 1, 1, 2, 1, 2])  # same, fixed, broken, wrong->wrong, same, fixed
    flips = count_flips(base, new, labels)
    assert (flips.flipped, flips.fixed, flips.broken) == (4, 2, 1)
    accumulator = MetricAccumulator("classification", 3)
    accumulator.update(F.one_hot(new, 3).float() * 5, labels, F.one_hot(base, 3).float())
    metrics = accumulator.compute()
    assert metrics["flip_rate"] == pytest.approx(4 / 6)
    assert (metrics["flips_fixed"], metrics["flips_broken"]) == (2, 1)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_aggregate_results_mean_and_sd_over_models():
    task = {"task": "classification"}
    first = ResultsTable([ResultRow("base", "reference", "", {"accuracy": [0.5]}), ResultRow("ocd_1", "OCD", "", {"accuracy": [0.1, 0.3]})], task)
    second = ResultsTable([ResultRow("base", "reference", "", {"accuracy": [0.7]}), ResultRow("ocd_1", "OCD", "", {"accuracy": [0.5]})], task)
    combined = aggregate_results([first, second])
    assert combined["ocd_1"].values["accuracy"] == pytest.approx([0.2, 0.5])
    assert combined["ocd_1"].mean("accuracy") == pytest.approx(0.35)
    assert combined["ocd_1"].sd("accuracy") == pytest.approx(np.std([0.2, 0.5], ddof=1))
    markdown = combined.to_markdown()
    assert "n models" in markdown and "0.3500 ± 0.2121" in markdown and "0.6000 ± 0.1414" in markdown
    with pytest.raises(ValueError, match="different tasks"):
        aggregate_results([first, ResultsTable([], {"task": "regression"})])


@pytest.fixture(scope="module")
def regression_setup():
    torch.manual_seed(1)
    backbone = TinyMLPRegressor(TinyMLPConfig(in_features=5, hidden_size=8, num_hidden_layers=1)).eval()
    example = {"features": torch.randn(2, 5)}
    model = OCDWrapper.attach(backbone, "fc1", example_inputs=example, **TINY_OCD)
    train_x, test_x = torch.randn(8, 5), torch.randn(9, 5)
    deltas, _ = delta_dataset(backbone, model.target_layer, {"features": train_x}, torch.randn(8), "regression")
    test_y = torch.randn(9)
    batches = [{"features": test_x[:5], "labels": test_y[:5]}, {"features": test_x[5:], "labels": test_y[5:]}]
    return backbone, model, deltas, test_x, test_y, batches


def test_regression_rows(regression_setup, tmp_path):
    backbone, model, deltas, test_x, test_y, batches = regression_setup
    assert model.config.task == "regression"
    table = evaluate_ocd(model, batches, delta_dataset=deltas, seeds=(0, 1), num_samples=2, output_dir=tmp_path, progress=False)
    assert [row.name for row in table.rows] == ["base", "ocd_1", "ocd_ens2", "ocd_mean2", "no_scale", "nearest_neighbour", "oracle"]
    for row in table.rows:
        assert all(math.isfinite(v) for v in row.values["mse"]), row.name
        assert "accuracy" not in row.values and "flip_rate" not in row.values
        assert "ece" not in row.values and "brier" not in row.values
    assert "reliability" not in table.metadata
    with torch.no_grad():
        direct = F.mse_loss(backbone(features=test_x).logits.view(-1), test_y).item()
    assert table["base"].values["mse"] == [pytest.approx(direct, rel=1e-5)]
    assert table["oracle"].mean("mse") <= table["base"].mean("mse")
    assert (tmp_path / "results.png").is_file() and "| oracle † |" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="classification only"):
        evaluate_ocd(model, batches, rows=["label_free"], progress=False)


def test_bad_inputs_name_the_problem(bert_setup):
    model, batches = bert_setup["model"], bert_setup["batches"]
    with pytest.raises(ValueError, match="delta_dataset="):
        evaluate_ocd(model, batches, rows=["nearest_neighbour"], progress=False)
    with pytest.raises(ValueError, match="alternative_model="):
        evaluate_ocd(model, batches, rows=["alternative_layer"], progress=False)
    with pytest.raises(ValueError, match="Unknown rows"):
        evaluate_ocd(model, batches, rows=["ocd_42"], progress=False)
    with pytest.raises(ValueError, match="labels"):
        evaluate_ocd(model, [bert_setup["test"]], rows=["base"], progress=False)
    with pytest.raises(ValueError, match="class indices"):
        evaluate_ocd(model, [(bert_setup["test"], bert_setup["test_labels"] + NUM_CLASSES)], rows=["base"], progress=False)
    pooler = bert_setup["alternative"].target_layer
    other_layer, _ = delta_dataset(bert_setup["backbone"], pooler, bert_setup["train"], torch.zeros(10, dtype=torch.long), "classification")
    with pytest.raises(ValueError, match="harvested for this layer"):
        evaluate_ocd(model, batches, delta_dataset=other_layer, rows=["nearest_neighbour"], progress=False)


def test_a_factorised_hypernetwork_is_evaluated_on_its_left_factors(bert_setup):
    """Factorised draws are ``(batch, k, out)`` factors: the OCD rows equal the wrapper's own forward and
    their oracle cosines are those of the expanded deltas ``u vᵀ``."""
    model = OCDWrapper.attach(
        bert_setup["backbone"], "classifier", delta_mode="factorised",
        factor_denoiser_config={"hidden_dim": 16, "num_layers": 1, "embed_dim": 8}, **TINY_OCD,
    )
    inputs, labels = bert_setup["batches"][0]
    table = evaluate_ocd(model, [(inputs, labels)], rows=["ocd_1", "ocd_ens3", "ocd_mean3", "no_scale", "oracle"], seeds=(3,),
                         num_samples=3, progress=False)
    outputs = model(**inputs, num_samples=3, generator=torch.Generator().manual_seed(3), return_draws=True, return_mean_network=True)
    for name, logits in {"ocd_1": outputs.draw_logits[:, 0], "ocd_ens3": outputs.logits, "ocd_mean3": outputs.mean_network_logits}.items():
        assert table[name].values["cross_entropy"] == [pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)], name
    cond = model.conditioning(**inputs)
    factors = model.generate_deltas(cond, 3, torch.Generator().manual_seed(3))
    assert factors.shape == (7, 3, 3)
    oracle = overfit_deltas(bert_setup["backbone"], model.target_layer, inputs, labels).deltas
    first = model.full_deltas(factors, cond)[:, 0]
    expected = F.cosine_similarity(first.flatten(1), oracle.flatten(1), dim=1).mean().item()
    assert table["ocd_1"].values["delta_cosine"] == [pytest.approx(expected, rel=1e-4, abs=1e-6)]
