"""Calibration metrics of :class:`MetricAccumulator` (ECE, Brier score, reliability diagrams) against
scikit-learn and a plain numpy reference, batch-split invariance, and the reliability panel of the plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss
from sklearn.preprocessing import label_binarize
from torch.nn import functional as F

from ocd_hf.results import (
    MetricAccumulator,
    ResultRow,
    ResultsTable,
    aggregate_results,
    expected_calibration_error,
    pool_reliability,
)


def reference_ece(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """ECE as Guo et al. (2017) define it, bin by bin in plain numpy: equal-width bins [lo, hi) of the
    top-label confidence (the last bin closed), weighted |accuracy − mean confidence|."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ece = 0.0
    for index, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        in_bin = (confidence >= low) & ((confidence < high) if index < num_bins - 1 else (confidence <= high))
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def accumulate(logits: torch.Tensor, labels: torch.Tensor, splits: list[int] | None = None, num_bins: int = 15) -> MetricAccumulator:
    accumulator = MetricAccumulator("classification", logits.shape[1], num_bins)
    for chunk_logits, chunk_labels in zip(logits.split(splits or [len(labels)]), labels.split(splits or [len(labels)])):
        accumulator.update(chunk_logits, chunk_labels)
    return accumulator


def random_case(num_samples: int = 500, num_classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_samples, num_classes, generator=generator) * 2.0
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return logits, labels


@pytest.mark.parametrize("num_bins", [15, 10])
def test_multiclass_ece_and_brier_match_the_references(num_bins):
    logits, labels = random_case()
    metrics = accumulate(logits, labels, num_bins=num_bins).compute()
    probs = torch.softmax(logits.double(), -1).numpy()
    onehot = label_binarize(labels.numpy(), classes=list(range(4)))
    assert metrics["brier"] == pytest.approx(float(((probs - onehot) ** 2).sum(1).mean()), rel=1e-6)
    assert metrics["ece"] == pytest.approx(reference_ece(probs, labels.numpy(), num_bins), rel=1e-5, abs=1e-7)
    assert metrics["cross_entropy"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_binary_brier_is_twice_sklearns_and_ece_matches():
    """scikit-learn's binary Brier score is (p₁ − y)²; the multi-class sum over both classes doubles it."""
    logits, labels = random_case(num_classes=2, seed=1)
    metrics = accumulate(logits, labels).compute()
    probs = torch.softmax(logits.double(), -1).numpy()
    assert metrics["brier"] == pytest.approx(2 * brier_score_loss(labels.numpy(), probs[:, 1]), rel=1e-6)
    assert metrics["ece"] == pytest.approx(reference_ece(probs, labels.numpy()), rel=1e-5, abs=1e-7)


def test_log_probabilities_and_logits_give_the_same_metrics():
    logits, labels = random_case(seed=2)
    from_logits = accumulate(logits, labels).compute()
    from_log_probs = accumulate(logits.log_softmax(-1) + 0.0, labels).compute()
    shifted = accumulate(logits + 7.0, labels).compute()
    for metric in ("ece", "brier", "cross_entropy", "accuracy"):
        assert from_log_probs[metric] == pytest.approx(from_logits[metric], rel=1e-5, abs=1e-7), metric
        assert shifted[metric] == pytest.approx(from_logits[metric], rel=1e-5, abs=1e-7), metric


def test_batch_split_invariance():
    logits, labels = random_case(num_samples=101, seed=3)
    whole = accumulate(logits, labels)
    split = accumulate(logits, labels, splits=[1, 7, 50, 43])
    assert split.compute() == pytest.approx(whole.compute(), rel=1e-6)  # cross-entropy is summed in float32
    for metric in ("ece", "brier"):  # calibration sums are float64
        assert split.compute()[metric] == pytest.approx(whole.compute()[metric], rel=1e-12), metric
    for key in ("count", "confidence", "accuracy"):
        assert [v if v is None else pytest.approx(v, rel=1e-12) for v in split.reliability()[key]] == whole.reliability()[key], key


def test_an_exactly_calibrated_case_has_zero_ece_and_an_overconfident_one_does_not():
    # Every sample has confidence 0.75 on its predicted class and exactly 3 in 4 predictions are right.
    probs = torch.tensor([[0.75, 0.125, 0.125]]).repeat(400, 1)
    labels = torch.tensor([0, 0, 0, 1] * 100)
    calibrated = accumulate(probs.log(), labels).compute()
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-6)
    assert calibrated["accuracy"] == pytest.approx(0.75)
    overconfident = accumulate(probs.log() * 4.0, labels).compute()  # confidence ≈ 0.99, accuracy 0.75
    assert overconfident["ece"] == pytest.approx(0.99 - 0.75, abs=0.01)


def test_labels_drawn_from_the_predicted_probabilities_give_a_small_ece():
    """Perfect calibration by construction: y ~ Categorical(p). The ECE is only sampling noise (~1e-3)."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(100_000, 5, generator=generator) * 1.5
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    metrics = accumulate(logits, labels, splits=[25_000] * 4).compute()
    assert metrics["ece"] < 0.01
    sharpened = accumulate(logits * 3.0, labels).compute()
    assert sharpened["ece"] > 0.1


def test_reliability_diagram_pools_runs_and_gives_back_the_ece():
    logits, labels = random_case(num_samples=300, seed=5)
    accumulators = [accumulate(logits[:100], labels[:100]), accumulate(logits[100:], labels[100:])]
    pooled = pool_reliability([a.reliability() for a in accumulators])
    whole = accumulate(logits, labels)
    assert pooled["count"] == whole.reliability()["count"] and sum(pooled["count"]) == 300
    assert expected_calibration_error(pooled) == pytest.approx(whole.compute()["ece"], rel=1e-9)
    diagram = whole.reliability()
    assert len(diagram["count"]) == 15
    assert all((c is None) == (n == 0) for c, n in zip(diagram["confidence"], diagram["count"]))
    with pytest.raises(ValueError, match="regression"):
        MetricAccumulator("regression", 1).reliability()


def table_with_reliability() -> ResultsTable:
    logits, labels = random_case(num_samples=200, seed=6)
    diagrams = {
        "base": accumulate(logits, labels).reliability(),
        "ocd_1": accumulate(logits * 0.5, labels).reliability(),
        "ocd_ens5": accumulate(logits * 0.8, labels).reliability(),
        "oracle": accumulate(logits * 3.0, labels).reliability(),
    }
    rows = [
        ResultRow("base", "reference", "", {"accuracy": [0.5], "cross_entropy": [1.2], "ece": [0.1]}),
        ResultRow("ocd_1", "OCD", "", {"accuracy": [0.55, 0.57], "cross_entropy": [1.1, 1.0], "ece": [0.05, 0.04]}),
        ResultRow("ocd_ens5", "OCD", "", {"accuracy": [0.6, 0.6], "cross_entropy": [1.0, 1.0], "ece": [0.03, 0.03]}),
        ResultRow("oracle", "bound", "", {"accuracy": [0.9], "cross_entropy": [0.3], "ece": [0.2]}),
    ]
    return ResultsTable(rows, {"task": "classification", "calibration_bins": 15, "reliability": diagrams})


def test_the_plot_draws_base_and_the_best_generated_row(tmp_path):
    table = table_with_reliability()
    assert table.best_generated_row().name == "ocd_ens5"  # the bound is not a generated row
    assert list(table.reliability_rows()) == ["base", "ocd_ens5"]
    paths = table.save(tmp_path)
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == round(3 * 4.5 * 110)  # accuracy, cross_entropy and the reliability panel
    loaded = ResultsTable.from_json(paths["json"])
    assert loaded.metadata["reliability"] == table.metadata["reliability"]
    assert "- ece: expected calibration error" in paths["markdown"].read_text()
    without = ResultsTable(table.rows, {"task": "classification"})
    assert without.reliability_rows() == {}
    without.plot(tmp_path / "plain.png")
    assert int.from_bytes((tmp_path / "plain.png").read_bytes()[16:20], "big") == round(2 * 4.5 * 110)


def test_aggregate_results_pools_the_reliability_diagrams(tmp_path):
    first, second = table_with_reliability(), table_with_reliability()
    combined = aggregate_results([first, second])
    base = combined.metadata["reliability"]["base"]
    assert base["count"] == [2 * n for n in first.metadata["reliability"]["base"]["count"]]
    expected = first.metadata["reliability"]["base"]
    for key in ("confidence", "accuracy"):
        assert [v if v is None else pytest.approx(v, rel=1e-12) for v in expected[key]] == base[key], key
    combined.save(tmp_path)
    assert (tmp_path / "results.png").is_file()
