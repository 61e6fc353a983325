"""recipes/fewshot_mcdi.py end to end at tiny scale: a local CSV dataset, a tiny random sentence-transformers model."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sentence_transformers = pytest.importorskip("sentence_transformers")

import fewshot_mcdi  # recipes/ is on pytest's pythonpath  # noqa: E402
from test_backbones import WORDS, tiny_sentence_transformer, write_tiny_bert  # noqa: E402

from ocd_hf import load_head_metadata  # noqa: E402


def test_recipe_runs_from_items_to_the_benchmark(tmp_path):
    model = tiny_sentence_transformer(write_tiny_bert(tmp_path / "bert"), normalize=False)
    model.save(str(tmp_path / "encoder"))
    generator = torch.Generator().manual_seed(0)
    rows = ["text,label"] + [
        f"{' '.join(WORDS[i] for i in torch.randint(0, len(WORDS), (4,), generator=generator).tolist())} {WORDS[c]},{c}"
        for c in range(10) for _ in range(12)
    ]
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "train.csv").write_text("\n".join(rows) + "\n")
    summary = fewshot_mcdi.main([
        "--source", str(tmp_path / "items"), "--model", str(tmp_path / "encoder"), "--items-per-class", "0",
        "--split-fractions", "0.4", "0.3", "0.3", "--n-way", "3", "--shots", "1", "--queries", "4", "--episodes", "20",
        "--num-tasks", "16", "--pool-size", "5", "--head-steps", "5", "--train-steps", "3", "--batch-size", "4", "--output-dir", str(tmp_path / "out"),
        "--no-progress", "--ablations", "mvdi", "fit_on_support",
    ])
    for split in ("val", "test"):
        rows = summary["1shot"][split]
        generated = {"mcdi", "mcdi_mean5", "mcdi_state_s14", "mcdi_state_s7", "mcdi_then_adam1", "mcdi_then_adam5", "mcdi_then_adam25"}
        adam = {"random_then_adam0", "random_then_adam1", "random_then_adam5", "random_then_adam25"}  # the median M is 5 here
        assert {"logistic_regression", "nearest_centroid", "mvdi", "fit_on_support", "query_label_bound"} | generated | adam == set(rows)
        assert all(0.0 <= mean <= 1.0 for mean, _ in rows.values())
    root = tmp_path / "out" / "3way-1shot"
    assert {"results.json", "results.md", "results.png"} <= {p.name for p in (root / "results-test").iterdir()}
    card = (root / "generator" / "README.md").read_text()
    assert "| mcdi_then_adam5 |" in card and "`num_steps` | 3" in card, "the card carries the meta-test table and the settings"
    for generator in ("generator", "generator-mvdi", "generator-fit_on_support"):
        assert (root / generator / "model.safetensors").is_file()
    assert load_head_metadata(root / "heads-support")["source"]["fit_on"] == "support"
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(saved["split"]["classes"]) == {"train", "val", "test"}
    assert not set(saved["split"]["classes"]["train"]) & set(saved["split"]["classes"]["test"]), "disjoint classes"
