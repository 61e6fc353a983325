"""The study script's own machinery: cached heads give the full model's logits, cross-fitted rows go
back to their order, and the summary pairs every configuration with its own seed's base model."""

from __future__ import annotations

import json

import gain_study
import pytest
import torch
from conftest import tiny_deit
from datasets import Dataset


def test_cached_head_reproduces_the_full_models_logits():
    model = tiny_deit()
    rows = Dataset.from_dict({"pixels": torch.randn(5, 1, 8, 8).numpy(), "label": [0, 1, 2, 3, 0], "id": list(range(5))})
    cached = gain_study.head_features(model, "classifier", rows, lambda batch: {"pixel_values": torch.tensor(batch["pixels"])}, batch_size=2)
    head = gain_study.CachedHead.from_layer(model.classifier)
    with torch.no_grad():
        expected = model(pixel_values=torch.tensor(rows["pixels"])).logits
        torch.testing.assert_close(head(torch.tensor(cached["features"])).logits, expected)
    assert cached["label"] == rows["label"] and cached["id"] == rows["id"]


def test_interleave_restores_the_row_order_of_the_folds():
    folds = [Dataset.from_dict({"id": list(range(f, 7, 3))}) for f in range(3)]
    assert gain_study.interleave(folds, 7, 3)["id"] == list(range(7))


def test_summary_pairs_each_configuration_with_its_seeds_base(tmp_path):
    def result(base_acc: float, ocd_acc: float, base_ce: float, ocd_ce: float) -> dict:
        split = {"base": {"accuracy": base_acc, "cross_entropy": base_ce}, "ocd_1": {"accuracy": ocd_acc, "cross_entropy": ocd_ce}}
        return {"validation": split, "test": split}

    results = {
        "0/plain/all/lr=0.001/regression": result(0.80, 0.82, 0.50, 0.45),
        "1/plain/all/lr=0.001/regression": result(0.70, 0.73, 0.60, 0.54),
        "0/cross/output/lr=0.001/regression": result(0.80, 0.79, 0.50, 0.52),
        "1/cross/output/lr=0.001/regression": result(0.70, 0.69, 0.60, 0.61),
    }
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "records.json").write_text(json.dumps({"results": results}))
    markdown = gain_study.summarise("toy", tmp_path, tmp_path / "toy.md")
    assert "| plain/all/lr=0.001/regression | 2 | +2.50 ± 0.71 | -0.0550 ± 0.0071 |" in markdown
    assert "Chosen on validation cross-entropy: `plain/all/lr=0.001/regression`" in markdown
    assert "test accuracy +2.5 ± 0.71 (more than 2 sd better)" in markdown
    assert (tmp_path / "toy.md").read_text() == markdown


def test_study_refuses_to_run_without_a_task():
    with pytest.raises(SystemExit):
        gain_study.parse_args([])
