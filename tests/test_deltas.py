"""The delta dataset: bf16 round trip, card, loading with datasets, atomic shards, metadata checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Array2D, Dataset, load_dataset
from helpers.harvest_fixtures import CASES, build_backbone, build_dataset
from huggingface_hub import DatasetCard

from ocd_hf.methods.ocd.deltas import (
    HARVEST_METADATA_NAME,
    check_compatible,
    decode_deltas,
    delta_features,
    encode_deltas,
    finalize_delta_dataset,
    load_deltas,
    load_harvest_metadata,
    shard_path,
)
from ocd_hf.methods.ocd.harvest import harvest_deltas
from ocd_hf.weight_datasets import ShardWriter

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bert_harvest(tmp_path_factory):
    """A finished harvest of the tiny Bert's per-token layer, with a name and revision to record."""
    kind, target = CASES["bert-intermediate"]
    out = tmp_path_factory.mktemp("bert")
    harvest_deltas(
        build_backbone(kind), build_dataset(kind, 7), target, out, batch_size=3, shard_size=4, progress=False,
        base_model_name_or_path="tiny/bert", base_model_revision="abc1234",
    )
    return out


def test_bfloat16_storage_round_trips_exactly_and_halves_the_delta(tmp_path):
    kind, target = CASES["deit-classifier"]
    dataset = build_dataset(kind, 5)
    full = harvest_deltas(
        build_backbone(kind), dataset, target, tmp_path / "f32", store_trajectory=True, delta_storage="full", progress=False
    )
    half = harvest_deltas(
        build_backbone(kind), dataset, target, tmp_path / "bf16", store_trajectory=True, dtype="bfloat16",
        delta_storage="full", progress=False,
    )
    rows_full, rows_half = full[:], half[:]
    for column in ("delta", "trajectory"):
        assert rows_half[column].dtype == torch.float32
        assert torch.equal(rows_half[column], rows_full[column].to(torch.bfloat16).float())
    assert not torch.equal(rows_half["delta"], rows_full["delta"]), "bf16 storage must round (else the test is vacuous)"
    assert torch.equal(half[2]["delta"], rows_half["delta"][2])  # row access decodes too
    assert half.features["delta"] == Array2D((3, 16), "int16")
    torch.testing.assert_close(rows_half["rho"], rows_half["delta"].pow(2).mean((1, 2)).sqrt())
    meta_full, meta_half = load_harvest_metadata(tmp_path / "f32"), load_harvest_metadata(tmp_path / "bf16")
    assert meta_half["harvest_config"]["dtype"] == "bfloat16"
    assert meta_half["bytes_per_sample"] < meta_full["bytes_per_sample"]
    assert meta_half["delta_bytes_per_sample"] * 2 == meta_full["delta_bytes_per_sample"] == 3 * 16 * 4


def test_encode_decode_bfloat16_is_bit_exact_on_extreme_values():
    values = torch.tensor([[0.0, -0.0, 1e-38, -3.3e38, 1.5e-3, float("inf")]]).to(torch.bfloat16).float()
    encoded = encode_deltas(values, "bfloat16")
    assert encoded.dtype == np.int16
    assert torch.equal(decode_deltas(encoded, "bfloat16"), values)
    assert torch.equal(decode_deltas(encode_deltas(values, "float32"), "float32"), values)


def test_dataset_card_records_backbone_layer_settings_and_measured_size(bert_harvest):
    metadata = load_harvest_metadata(bert_harvest)
    card = DatasetCard.load(bert_harvest / "README.md")
    text = card.text
    for expected in (
        "`tiny/bert` (`BertForSequenceClassification`)",
        "`abc1234`",
        "`bert.encoder.layer.0.intermediate.dense`: Linear(16 → 32), applied to every token",
        f"`{metadata['base_layer_fingerprint']}`",
        "adam, lr 0.0005, 3 steps",
        "7 of 7 source rows (0 skipped",
        f"{metadata['bytes_per_sample']:,.0f} bytes",
        'load_dataset("path/to/this/directory", split="train")',
        "load_deltas(",
    ):
        assert expected in text, expected
    shards = sorted((bert_harvest / "data").glob("train-*.arrow"))
    assert len(shards) == 2
    assert metadata["bytes_per_sample"] == pytest.approx(sum(p.stat().st_size for p in shards) / 7)
    assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*.arrow"
    assert card.data.size_categories == "n<1K"


def test_metadata_follows_the_contract(bert_harvest):
    metadata = load_harvest_metadata(bert_harvest)
    assert metadata["complete"] is True
    assert metadata["base_model_name_or_path"] == "tiny/bert"
    assert metadata["base_model_revision"] == "abc1234"
    assert metadata["target_module"] == "bert.encoder.layer.0.intermediate.dense"
    assert (metadata["in_features"], metadata["out_features"], metadata["output_dim"]) == (16, 32, 3)
    assert metadata["per_token"] is True and metadata["task"] == "classification"
    expected = {"optimizer": "adam", "lr": 5e-4, "steps": 3, "loss": "cross_entropy", "dtype": "float32", "shard_size": 4}
    assert expected.items() <= metadata["harvest_config"].items()
    assert metadata["num_samples"] == 7 and metadata["num_shards"] == 2


def test_load_dataset_and_load_deltas_agree_with_torch_format(bert_harvest, tmp_path):
    mapped = load_deltas(bert_harvest)
    loaded = load_dataset(str(bert_harvest), split="train", cache_dir=str(tmp_path)).with_format("torch")
    assert loaded.column_names == mapped.column_names
    assert len(loaded) == len(mapped) == 7
    for column in ("id", "delta", "layer_input", "rank1_energy"):
        assert torch.equal(loaded[:][column], mapped[:][column])
    assert mapped[:]["delta"].dtype == torch.float32
    assert mapped[:]["delta"].shape == (7, 32, 16)
    assert mapped.cache_files, "load_deltas must memory-map the shard files, not copy them"
    assert {Path(f["filename"]).parent for f in mapped.cache_files} == {bert_harvest / "data"}


def test_shard_writer_is_atomic(tmp_path):
    features = delta_features(in_features=2, out_features=3, output_dim=2, task="classification")
    path = tmp_path / "data" / "train-00000-of-00001.arrow"
    columns = {
        "id": torch.arange(2), "label": torch.tensor([0, 1]), "delta": torch.randn(2, 3, 2), "rho": torch.ones(2),
        "rank1_energy": torch.ones(2), "layer_input": torch.randn(2, 2), "layer_output": torch.randn(2, 3),
        "model_output": torch.randn(2, 2), "loss_before": torch.ones(2), "loss_after": torch.ones(2),
    }
    with pytest.raises(RuntimeError, match="interrupted"):
        with ShardWriter(path, features) as writer:
            writer.write(columns)
            assert writer.tmp_path.is_file() and not path.exists()
            raise RuntimeError("interrupted")
    assert not path.exists() and not list(path.parent.iterdir())
    with ShardWriter(path, features) as writer:
        writer.write(columns)
        writer.write({**columns, "id": torch.arange(2, 4)})
    shard = Dataset.from_file(str(path)).with_format("torch")
    assert shard[:]["id"].tolist() == [0, 1, 2, 3]
    assert torch.equal(shard[:2]["delta"], columns["delta"])
    with pytest.raises(ValueError, match=r"Missing columns \['rho'\]"):
        with ShardWriter(tmp_path / "other.arrow", features) as writer:
            writer.write({name: value for name, value in columns.items() if name != "rho"})


def test_check_compatible_names_every_difference():
    existing = {"target_module": "classifier", "harvest_config": {"lr": 5e-4, "steps": 3}, "num_shards": 2}
    check_compatible(existing, dict(existing), "out")
    with pytest.raises(ValueError) as info:
        check_compatible(existing, {**existing, "target_module": "pooler", "harvest_config": {"lr": 5e-4, "steps": 5}}, "out")
    message = str(info.value)
    assert "target_module (directory: 'classifier', this call: 'pooler')" in message
    assert "harvest_config.steps (directory: 3, this call: 5)" in message
    assert "lr" not in message


def test_incomplete_or_foreign_directories_are_refused_clearly(bert_harvest, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a delta dataset"):
        load_deltas(tmp_path)
    metadata = load_harvest_metadata(bert_harvest)
    broken = tmp_path / "broken"
    (broken / "data").mkdir(parents=True)
    os.link(shard_path(bert_harvest, 0, 2), shard_path(broken, 0, 2))
    (broken / HARVEST_METADATA_NAME).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"shards \[1\] of 2 are missing.*resume"):
        load_deltas(broken)
    with pytest.raises(ValueError, match=r"shards \[1\] of 2 are missing"):
        finalize_delta_dataset(broken, metadata)
    foreign = tmp_path / "foreign"
    (foreign / "data").mkdir(parents=True)
    os.link(shard_path(bert_harvest, 0, 2), foreign / "data" / "train-00000-of-00002.arrow")
    kind, target = CASES["bert-intermediate"]
    with pytest.raises(ValueError, match="has no harvest.json"):
        harvest_deltas(build_backbone(kind), build_dataset(kind, 7), target, foreign, progress=False)
