"""Factorised (rank-1) delta storage: harvest stores ``u`` and the measured residual instead of ``Δ``;
loading, training, evaluation and the Hub give the same results as full storage of the same deltas."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from helpers.harvest_fixtures import CASES, build_backbone, build_dataset

from ocd_hf import OCDWrapper
from ocd_hf.factorised import RULE_FOR_OPTIMIZER, factorise_deltas
from ocd_hf.methods.ocd.deltas import load_deltas, load_harvest_metadata, materialise_deltas, shard_path, write_metadata
from ocd_hf.methods.ocd.evaluation import evaluate_ocd
from ocd_hf.methods.ocd.harvest import check_factor_residuals, harvest_batch, harvest_deltas
from ocd_hf.methods.ocd.training import HISTORY_NAME, choose_delta_mode, train_hypernetwork
from ocd_hf.target import find_target_linear

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY_UNET = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
}
TINY_FACTOR_DENOISER = {"hidden_dim": 16, "num_layers": 1, "embed_dim": 8}


def harvest_both(tmp_path: Path, case: str, num_samples: int = 6, **settings) -> dict[str, Path]:
    """The same samples harvested with full and with factorised storage."""
    kind, target = CASES[case]
    dataset = build_dataset(kind, num_samples)
    paths = {}
    for storage in ("full", "factorised"):
        paths[storage] = tmp_path / storage
        harvest_deltas(
            build_backbone(kind), dataset, target, paths[storage], batch_size=4, shard_size=4, delta_storage=storage,
            progress=False, **settings,
        )
    return paths


@pytest.mark.parametrize(
    "case, optimizer, trajectory",
    [("bert-classifier", "adam", False), ("bert-classifier", "sgd", False), ("deit-classifier", "adam", True)],
)
def test_factorised_storage_materialises_to_the_full_storage_deltas(tmp_path, case, optimizer, trajectory):
    paths = harvest_both(tmp_path, case, optimizer=optimizer, lr=5e-3, store_trajectory=trajectory)
    full, factorised = load_deltas(paths["full"]), load_deltas(paths["factorised"])
    metadata = load_harvest_metadata(paths["factorised"])
    assert metadata["harvest_config"]["delta_storage"] == "factorised"
    assert metadata["harvest_config"]["factor_rule"] == RULE_FOR_OPTIMIZER[optimizer]
    assert "delta" not in factorised.column_names and "rank1_energy" not in factorised.column_names
    rows, reference = factorised[:], full[:]
    deltas = materialise_deltas(rows, metadata)
    assert deltas.shape == reference["delta"].shape and reference["delta"].abs().amax() > 0
    # Each materialised delta differs from the real one by exactly its stored relative residual.
    error = (deltas - reference["delta"]).flatten(1).norm(dim=1) / reference["delta"].flatten(1).norm(dim=1)
    torch.testing.assert_close(error, rows["factor_residual"], rtol=1e-3, atol=1e-7)
    assert rows["factor_residual"].max() < 1e-3
    torch.testing.assert_close(rows["rho"], reference["rho"], rtol=1e-3, atol=0)
    recomputed = factorise_deltas(reference["delta"], reference["layer_input"], RULE_FOR_OPTIMIZER[optimizer])[0]
    torch.testing.assert_close(rows["delta_factor"], recomputed, rtol=1e-5, atol=1e-9)
    for column in ("id", "label", "layer_input", "model_output", "loss_after"):
        assert torch.equal(rows[column], reference[column]), column
    assert torch.equal(materialise_deltas(factorised[2], metadata), deltas[2:3])  # a single row
    if trajectory:
        steps = materialise_deltas(rows, metadata, column="trajectory")
        assert steps.shape == reference["trajectory"].shape == (6, 3, 3, 16)
        torch.testing.assert_close(steps, reference["trajectory"], rtol=0, atol=1e-3 * reference["trajectory"].abs().amax().item())
        assert torch.equal(steps[:, -1], deltas)
    sizes = load_harvest_metadata(paths["full"])
    assert metadata["delta_bytes_per_sample"] == 3 * 4 and sizes["delta_bytes_per_sample"] == 3 * 16 * 4
    assert metadata["bytes_per_sample"] < sizes["bytes_per_sample"]


def test_bfloat16_factors_are_the_rounded_float32_factors(tmp_path):
    kind, target = CASES["deit-classifier"]
    dataset = build_dataset(kind, 5)
    exact = harvest_deltas(build_backbone(kind), dataset, target, tmp_path / "f32", delta_storage="factorised", progress=False)
    half = harvest_deltas(
        build_backbone(kind), dataset, target, tmp_path / "bf16", delta_storage="factorised", dtype="bfloat16", progress=False
    )
    assert torch.equal(half[:]["delta_factor"], exact[:]["delta_factor"].to(torch.bfloat16).float())
    assert not torch.equal(half[:]["delta_factor"], exact[:]["delta_factor"])
    raw = half.with_format(None)[:2]  # int16 bit patterns, as datasets stores them
    metadata = load_harvest_metadata(tmp_path / "bf16")
    assert torch.equal(materialise_deltas(raw, metadata), materialise_deltas(half[:2], metadata))


def test_materialise_deltas_needs_the_factor_rule_and_the_layer_input(tmp_path):
    kind, target = CASES["bert-classifier"]
    harvest_deltas(build_backbone(kind), build_dataset(kind, 3), target, tmp_path, delta_storage="factorised", progress=False)
    rows = load_deltas(tmp_path)[:]
    with pytest.raises(ValueError, match="names no factor_rule.*load_harvest_metadata"):
        materialise_deltas(rows, {"harvest_config": {"optimizer": "adam"}})
    with pytest.raises(ValueError, match=r"neither 'delta' nor \['layer_input'\]"):
        materialise_deltas({"delta_factor": rows["delta_factor"]}, load_harvest_metadata(tmp_path))


def test_factorised_storage_is_refused_on_a_per_token_layer(tmp_path):
    kind, target = CASES["bert-intermediate"]
    backbone, dataset = build_backbone(kind), build_dataset(kind, 4)
    with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.intermediate.dense' is applied to every token.*delta_storage='full'"):
        harvest_deltas(backbone, dataset, target, tmp_path / "a", delta_storage="factorised", progress=False)
    assert not (tmp_path / "a").exists()
    _, layer = find_target_linear(backbone, target)
    rows = dataset.with_format("torch")[:]
    labels = rows.pop("label")
    with pytest.raises(ValueError, match="applied to every token"):
        harvest_batch(backbone, layer, rows, labels, torch.arange(4), task="classification", delta_storage="factorised")


def test_samples_beyond_the_tolerance_are_refused_by_id(tmp_path, monkeypatch):
    kind, target = CASES["bert-classifier"]
    dataset = build_dataset(kind, 6)
    # Adam deltas with the SGD right factor: not rank-1 with that factor (residual ~0.5).
    monkeypatch.setitem(RULE_FOR_OPTIMIZER, "adam", "input")
    with pytest.raises(ValueError, match=r"6 sample\(s\).*factor_rule 'input'.*factor_tolerance=0.05.*\{0: 0\.\d+, 1: 0\.\d+.*delta_storage='full'"):
        harvest_deltas(build_backbone(kind), dataset, target, tmp_path / "wrong", delta_storage="factorised", progress=False)
    assert not list((tmp_path / "wrong" / "data").glob("train-*.arrow")), "no shard is written with lost deltas"
    auto = harvest_deltas(build_backbone(kind), dataset, target, tmp_path / "auto", progress=False)
    decision = load_harvest_metadata(tmp_path / "auto")["storage_decision"]
    assert "delta" in auto.column_names and decision["reason"].startswith("not rank-1")
    assert decision["first_batch_max_residual"] > 0.05 > decision["threshold"] and decision["first_batch_size"] == 6
    monkeypatch.undo()
    # The right rule passes the default tolerance but not a tolerance below Adam's eps effects.
    with pytest.raises(ValueError, match="exceeds factor_tolerance=1e-12"):
        harvest_deltas(build_backbone(kind), dataset, target, tmp_path / "strict", delta_storage="factorised",
                       factor_tolerance=1e-12, progress=False)


def test_auto_picks_factorised_on_a_head_and_full_on_a_per_token_layer(tmp_path):
    for case, expected in (("bert-classifier", "factorised"), ("deit-classifier", "factorised"), ("bert-intermediate", "full")):
        kind, target = CASES[case]
        harvest_deltas(build_backbone(kind), build_dataset(kind, 5), target, tmp_path / case, batch_size=4, progress=False)
        metadata = load_harvest_metadata(tmp_path / case)
        assert metadata["harvest_config"]["delta_storage"] == expected, case
        decision = metadata["storage_decision"]
        assert decision["requested"] == "auto"
        card = (tmp_path / case / "README.md").read_text()
        assert f"requested `auto`: {decision['reason']}" in card
        if expected == "factorised":
            assert decision["first_batch_size"] == 4 and decision["first_batch_max_residual"] < 1e-3
            assert metadata["statistics"]["factor_residual"]["max"] < 1e-3
            assert "`delta_factor` holds the left factor `u` (3 values)" in card and "materialise_deltas(" in card
        else:
            assert "every token" in decision["reason"] and "first_batch_size" not in decision


def test_a_later_sample_beyond_the_tolerance_stops_a_forced_harvest_but_not_an_auto_one(library_logs):
    ids, residuals = torch.tensor([4, 5, 6]), torch.tensor([0.01, 0.06, 0.02])
    with pytest.raises(ValueError, match=r"1 sample\(s\).*5: 0.06"):
        check_factor_residuals(ids, residuals, 0.05, "sign")
    with library_logs.at_level(logging.WARNING, logger="ocd_hf"):
        check_factor_residuals(ids, residuals, 0.05, "sign", strict=False)
    assert re.search(r"1 sample\(s\) exceed factor_tolerance=0.05.*5: 0.06.*stored as factors", library_logs.text)


def test_auto_storage_records_that_it_only_warns(tmp_path):
    kind, target = CASES["bert-classifier"]
    for storage in ("auto", "factorised"):
        harvest_deltas(build_backbone(kind), build_dataset(kind, 4), target, tmp_path / storage, delta_storage=storage, progress=False)
        settings = load_harvest_metadata(tmp_path / storage)["harvest_config"]
        assert settings["delta_storage"] == "factorised"
        assert settings["factor_tolerance_strict"] is (storage == "factorised")


def test_resume_keeps_the_storage_and_refuses_another(tmp_path):
    kind, target = CASES["bert-classifier"]
    dataset = build_dataset(kind, 8)
    first = harvest_deltas(build_backbone(kind), dataset, target, tmp_path, batch_size=2, shard_size=3, progress=False)
    expected = first[:]["delta_factor"].clone()
    metadata = load_harvest_metadata(tmp_path)
    shard_path(tmp_path, 2, 3).unlink()  # as if killed while writing the last shard
    write_metadata(tmp_path, {**metadata, "complete": False})
    with pytest.raises(ValueError, match=r"harvest_config\.delta_storage \(directory: 'factorised', this call: 'full'\)"):
        harvest_deltas(build_backbone(kind), dataset, target, tmp_path, batch_size=2, shard_size=3, delta_storage="full",
                       progress=False)
    resumed = harvest_deltas(build_backbone(kind), dataset, target, tmp_path, batch_size=2, shard_size=3, progress=False)
    assert torch.equal(resumed[:]["delta_factor"], expected)
    assert load_harvest_metadata(tmp_path)["storage_decision"] == metadata["storage_decision"]


def test_choose_delta_mode_reads_the_stored_residuals(tmp_path):
    kind, target = CASES["bert-classifier"]
    harvest_deltas(build_backbone(kind), build_dataset(kind, 4), target, tmp_path, delta_storage="factorised", progress=False)
    dataset, metadata = load_deltas(tmp_path), load_harvest_metadata(tmp_path)
    assert metadata["delta_mode_decision"]["delta_mode"] == "factorised"
    assert choose_delta_mode(metadata, dataset) == "factorised"
    lossy = dataset.with_format(None).map(lambda row: {"factor_residual": 0.5})
    assert choose_delta_mode(metadata, lossy) == "factorised", "the harvest's decision is followed"
    undecided = {key: value for key, value in metadata.items() if key != "delta_mode_decision"}  # an older harvest
    assert choose_delta_mode(undecided, dataset) == "factorised"
    assert choose_delta_mode(undecided, lossy) == "full"


@pytest.fixture(scope="module")
def bert_harvests(tmp_path_factory):
    return harvest_both(tmp_path_factory.mktemp("bert"), "bert-classifier", num_samples=24)


def train_on_both(harvests: dict[str, Path], tmp_path: Path, overrides: dict) -> dict[str, OCDWrapper]:
    """The same training run (same seed) on the full and on the factorised storage of the same deltas."""
    backbone = build_backbone("bert")
    settings = dict(config_overrides={**overrides, "condition_hidden_dim": 16}, num_steps=4, batch_size=8, learning_rate=2e-3,
                    validation_fraction=0.25, logging_steps=1, seed=1, progress=False)
    return {storage: train_hypernetwork(path, backbone, tmp_path / storage, **settings) for storage, path in harvests.items()}


def test_factorised_training_on_stored_factors_equals_training_on_full_deltas(bert_harvests, tmp_path):
    models = train_on_both(bert_harvests, tmp_path, {"delta_mode": "factorised", "factor_denoiser_config": TINY_FACTOR_DENOISER})
    full, factorised = models["full"], models["factorised"]
    assert full.config.delta_mode == factorised.config.delta_mode == "factorised"
    assert full.config.factor_rule == factorised.config.factor_rule == "sign"
    assert factorised.config.log_rho_mean == pytest.approx(full.config.log_rho_mean, abs=1e-6)
    initial = OCDWrapper(factorised.config, build_backbone("bert")).hypernetwork.state_dict()
    weights = full.hypernetwork.state_dict()
    for name, value in factorised.hypernetwork.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(weights["denoiser.output.weight"], initial["denoiser.output.weight"]), "training must move the weights"


def test_full_mode_training_on_stored_factors_matches_training_on_full_deltas(bert_harvests, tmp_path):
    """Full mode expands the factors to ``u vᵀ``, which differs from the real delta by its residual (~1e-6):
    the losses agree to that precision. (Weights are not compared: AdamW turns such differences in
    near-zero gradients into ±lr steps.)"""
    models = train_on_both(bert_harvests, tmp_path, {"delta_mode": "full", "denoiser_config": TINY_UNET})
    assert models["full"].config.delta_mode == models["factorised"].config.delta_mode == "full"
    logs = {storage: json.loads((tmp_path / storage / HISTORY_NAME).read_text())["log_history"] for storage in models}
    assert len(logs["full"]) == len(logs["factorised"]) == 4
    for expected, entry in zip(logs["full"], logs["factorised"]):
        for key in ("denoise_loss", "val_denoise_loss"):
            assert entry[key] == pytest.approx(expected[key], rel=1e-4), (entry["step"], key)
    assert logs["full"][-1]["denoise_loss"] < logs["full"][0]["denoise_loss"]


def test_auto_delta_mode_on_factorised_storage_is_factorised(bert_harvests, tmp_path):
    model = train_hypernetwork(
        bert_harvests["factorised"], build_backbone("bert"), tmp_path,
        config_overrides={"factor_denoiser_config": TINY_FACTOR_DENOISER, "condition_hidden_dim": 16}, num_steps=1,
        batch_size=8, progress=False,
    )
    assert model.config.delta_mode == "factorised" and model.config.harvest_config["delta_storage"] == "factorised"
    with pytest.raises(ValueError, match="stored as left factors for factor_rule 'sign'"):
        train_hypernetwork(bert_harvests["factorised"], build_backbone("bert"), tmp_path / "x",
                           config_overrides={"delta_mode": "factorised", "factor_rule": "input"}, num_steps=1, progress=False)


def test_nearest_neighbour_row_is_the_same_for_both_storages(bert_harvests):
    backbone = build_backbone("bert")
    model = OCDWrapper.attach(backbone, "classifier", denoiser_config=TINY_UNET, condition_hidden_dim=16)
    test = build_dataset("bert", 10, seed=7).with_format("torch")[:]
    labels = test.pop("label")
    batches = [(test, labels)]
    rows = ["base", "nearest_neighbour", "oracle"]
    tables = {
        storage: evaluate_ocd(model, batches, delta_dataset=path, rows=rows, seeds=(0,), progress=False)
        for storage, path in bert_harvests.items()
    }
    full, factorised = tables["full"]["nearest_neighbour"].values, tables["factorised"]["nearest_neighbour"].values
    assert set(full) == set(factorised) and "delta_cosine" in full
    for metric, values in full.items():
        assert factorised[metric] == pytest.approx(values, rel=1e-4, abs=1e-6), metric
    # A bare dataset takes the factor rule of the model's harvest; a model that has none cannot expand factors.
    bare = load_deltas(bert_harvests["factorised"])
    with pytest.raises(ValueError, match="names no factor_rule"):
        evaluate_ocd(model, batches, delta_dataset=bare, rows=rows, seeds=(0,), progress=False)
    model.config.harvest_config = load_harvest_metadata(bert_harvests["factorised"])["harvest_config"]
    table = evaluate_ocd(model, batches, delta_dataset=bare, rows=rows, seeds=(0,), progress=False)
    assert table["nearest_neighbour"].values == tables["factorised"]["nearest_neighbour"].values


def test_hub_round_trip_of_factorised_storage(loopback_hub, bert_harvests):
    from ocd_hf.methods.ocd.hub import load_deltas_from_hub, push_deltas_to_hub

    path = bert_harvests["factorised"]
    push_deltas_to_hub(path, "ocd-deltas-factorised")
    deltas, metadata = load_deltas_from_hub(f"{loopback_hub.user}/ocd-deltas-factorised")
    assert metadata == load_harvest_metadata(path)
    local = load_deltas(path)[:]
    pulled = deltas[:]
    for name in ("delta_factor", "factor_residual", "layer_input", "rho"):
        assert torch.equal(pulled[name], local[name]), name
    assert torch.equal(materialise_deltas(pulled, metadata), materialise_deltas(local, metadata))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_delta_mode_decision_uses_the_residuals_measured_while_harvesting(tmp_path, dtype):
    from ocd_hf.methods.ocd.deltas import decide_delta_mode

    kind, target = CASES["bert-classifier"]
    dataset = build_dataset(kind, 7)
    harvest_deltas(build_backbone(kind), dataset, target, tmp_path, batch_size=2, shard_size=3, delta_storage="full",
                   dtype=dtype, progress=False)
    metadata, stored = load_harvest_metadata(tmp_path), load_deltas(tmp_path)
    # Reference: the residual of every stored delta, factorised from the rows read back.
    rows = stored[:]
    residuals = factorise_deltas(rows["delta"], rows["layer_input"], RULE_FOR_OPTIMIZER["adam"])[1].double()
    for shard in metadata["shards"]:
        first, last = shard["first_id"], shard["last_id"]
        recorded = shard["sums"]["factor_residual"]
        assert recorded["count"] == last - first + 1
        assert recorded["sum"] == pytest.approx(float(residuals[first : last + 1].sum()), rel=1e-5)
    decision = metadata["delta_mode_decision"]
    assert decision["mean_factor_residual"] == pytest.approx(float(residuals.mean()), rel=1e-5)
    assert "over all 7 deltas" in decision["reason"]
    # The re-read path (a harvest whose shards recorded no sums) decides the same.
    unrecorded = {**metadata, "shards": [{k: v for k, v in shard.items() if k != "sums"} for shard in metadata["shards"]]}
    reread = decide_delta_mode(unrecorded, stored.with_format(None))
    assert reread["delta_mode"] == decision["delta_mode"] and reread["reason"] == decision["reason"]
    assert reread["mean_factor_residual"] == pytest.approx(decision["mean_factor_residual"], rel=1e-6)


def test_a_harvest_resumed_over_shards_without_residual_sums_decides_by_reading_them(tmp_path):
    kind, target = CASES["bert-classifier"]
    dataset = build_dataset(kind, 6)
    settings = dict(batch_size=2, shard_size=3, delta_storage="full", progress=False)
    harvest_deltas(build_backbone(kind), dataset, target, tmp_path, **settings)
    metadata = load_harvest_metadata(tmp_path)
    expected = metadata["delta_mode_decision"]
    # As an older ocd-hf left it: shard 0 finished without sums, shard 1 still to harvest.
    old_shards = [{k: v for k, v in shard.items() if k != "sums"} for shard in metadata["shards"]]
    write_metadata(tmp_path, {**metadata, "complete": False, "shards": old_shards, "delta_mode_decision": None})
    shard_path(tmp_path, 1, 2).unlink()
    harvest_deltas(build_backbone(kind), dataset, target, tmp_path, **settings)
    resumed = load_harvest_metadata(tmp_path)
    assert "sums" not in resumed["shards"][0] and "sums" in resumed["shards"][1]
    decision = resumed["delta_mode_decision"]
    assert decision["delta_mode"] == expected["delta_mode"] and "over all 6 deltas" in decision["reason"]
    assert decision["mean_factor_residual"] == pytest.approx(expected["mean_factor_residual"], rel=1e-6)
