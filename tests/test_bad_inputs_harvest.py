"""Bad inputs at the harvest, dataset-split and CLI boundary (issue 16): each input -> the exception type and a
phrase of its message, raised before any work or write (the output directory stays empty)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from helpers.harvest_fixtures import CASES, build_backbone, build_dataset

from ocd_hf.cli import evaluate_from_paths, main
from ocd_hf.methods.ocd.deltas import load_harvest_metadata
from ocd_hf.methods.ocd.harvest import harvest_deltas, load_source_dataset


def bert_rows(num_rows: int = 4, length: int = 7, **columns) -> Dataset:
    data = build_dataset("bert", num_rows).to_dict()
    if length != 7:
        data["input_ids"] = [[1] * length for _ in range(num_rows)]
        data["attention_mask"] = [[1] * length for _ in range(num_rows)]
    return Dataset.from_dict({**data, **columns})


def with_value(dataset: Dataset, column: str, row: int, value) -> Dataset:
    data = dataset.to_dict()
    data[column][row] = value
    return Dataset.from_dict(data, features=dataset.features if column != "label" else None)


def nan_pixels() -> Dataset:
    dataset = build_dataset("deit", 4)
    pixels = torch.tensor(dataset["pixel_values"])
    pixels[3, 0, 1, 1] = float("nan")
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "label": dataset["label"]})


HARVEST_CASES = {
    # name: (backbone kind, dataset builder, extra harvest arguments, exception, phrase)
    "label out of range": ("bert", lambda: with_value(bert_rows(), "label", 2, 5), {}, ValueError,
                           r"labels outside \[0, 3\) in 1 row\(s\) \(row: label \{2: 5\}\)"),
    "label -100": ("bert", lambda: with_value(bert_rows(), "label", 1, -100), {}, ValueError,
                   r"-100 \(the Hugging Face ignore index\) in 1 row\(s\) \(row: label \{1: -100\}\).*dataset\.filter"),
    "fractional float label": ("bert", lambda: bert_rows(label=[0.0, 1.5, 2.0, 1.0]), {}, ValueError,
                               r"fractional class labels in 1 row\(s\) \(row: label \{1: 1\.5\}\)"),
    "more class names than classes": ("bert", lambda: bert_rows(label=["a", "b", "c", "d"]), {}, ValueError,
                                      r"has 4 classes \['a', 'b', 'c', 'd'\], but the backbone predicts 3"),
    "NaN pixels": ("deit", nan_pixels, {}, ValueError, r"Input 'pixel_values' has NaN or infinite values in rows \[3\]"),
    "inf from collate_fn": ("mlp", lambda: build_dataset("mlp", 4),
                            {"collate_fn": lambda batch: {"features": torch.tensor(batch["features"]).index_fill(0, torch.tensor([1]), float("inf"))}},
                            ValueError, r"Input 'features' has NaN or infinite values in rows \[1\]"),
    "out-of-vocabulary id": ("bert", lambda: with_value(bert_rows(), "input_ids", 0, [1, 2, 60, 3, 4, 5, 6]), {}, ValueError,
                             r"Input 'input_ids' has token ids outside the vocabulary \[0, 50\) in rows \[0\]"),
    "sequence longer than positions": ("bert", lambda: bert_rows(length=513), {}, ValueError,
                                       r"513 tokens long, but the backbone has max_position_embeddings=512: truncate"),
}


@pytest.mark.parametrize("case", sorted(HARVEST_CASES))
def test_bad_harvest_inputs_are_refused_before_any_work(case, tmp_path):
    kind, build, kwargs, error, phrase = HARVEST_CASES[case]
    with pytest.raises(error, match=phrase):
        harvest_deltas(build_backbone(kind), build(), CASES[f"{kind}-classifier" if kind != "mlp" else "mlp-regression"][1],
                       tmp_path / "out", delta_storage="full", progress=False, **kwargs)
    assert not (tmp_path / "out" / "data").exists() and not (tmp_path / "out" / "harvest.json").exists()


def test_string_labels_are_mapped_to_sorted_class_names_and_recorded(tmp_path):
    names = ["pos", "neg", "neu", "neg"]
    deltas = harvest_deltas(build_backbone("bert"), bert_rows(label=names), "classifier", tmp_path, delta_storage="full",
                            progress=False)
    assert deltas[:]["label"].tolist() == [2, 0, 1, 0]
    assert load_harvest_metadata(tmp_path)["source"]["label_names"] == ["neg", "neu", "pos"]
    class_label = bert_rows().cast_column("label", ClassLabel(names=["x", "y", "z"]))
    harvest_deltas(build_backbone("bert"), class_label, "classifier", tmp_path / "b", delta_storage="full", progress=False)
    assert load_harvest_metadata(tmp_path / "b")["source"]["label_names"] == ["x", "y", "z"]


def test_string_labels_follow_a_backbone_that_names_its_classes(tmp_path):
    backbone = build_backbone("bert")
    backbone.config.id2label = {0: "pos", 1: "neg", 2: "neu"}  # not sorted: sorting would swap pos and neg
    backbone.config.label2id = {name: index for index, name in backbone.config.id2label.items()}
    deltas = harvest_deltas(backbone, bert_rows(label=["pos", "neg", "neu", "neg"]), "classifier", tmp_path, delta_storage="full",
                            progress=False)
    assert deltas[:]["label"].tolist() == [0, 1, 2, 1]
    assert load_harvest_metadata(tmp_path)["source"]["label_names"] == ["pos", "neg", "neu"]
    with pytest.raises(ValueError, match=r"labels \['positive'\] that are not among the class names \['pos', 'neg', 'neu'\] "
                                         r"\(the backbone's config.id2label\)"):
        harvest_deltas(backbone, bert_rows(label=["pos", "positive", "neu", "neg"]), "classifier", tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "harvest.json").exists()


def test_an_evaluation_refuses_string_labels_it_has_no_class_names_for():
    from ocd_hf.methods.ocd.harvest import SampleReader

    hint = "pass the harvest's directory as --deltas"
    with pytest.raises(ValueError, match=r"holds class names \(\['neg', 'pos'\]\) but no class names are known.*--deltas"):
        SampleReader(bert_rows(label=["pos", "neg", "pos", "neg"]), build_backbone("bert"), "classification", missing_label_names=hint)
    reader = SampleReader(bert_rows(label=["pos", "neg", "pos", "pos"]), build_backbone("bert"), "classification",
                          label_names=["neg", "neu", "pos"], missing_label_names=hint)
    assert reader.labels.tolist() == [2, 0, 2, 2]  # by the given names, not by the two present (which would give 1, 0)


# ----- splits (point 8) ---------------------------------------------------------------------------------------


@pytest.fixture
def single(tmp_path) -> Path:
    """A save_to_disk directory of one Dataset, without split names (what `dataset["test"].save_to_disk` writes)."""
    bert_rows().save_to_disk(tmp_path / "single")
    return tmp_path / "single"


@pytest.fixture
def splits(tmp_path) -> Path:
    DatasetDict({"train": bert_rows(), "validation": bert_rows()}).save_to_disk(tmp_path / "splits")
    return tmp_path / "splits"


SPLIT_CASES = {
    "harvest --split on one dataset": (
        lambda d, tmp: ["harvest", "--model", str(tmp / "no-model"), "--dataset", str(d["single"]), "--split", "test",
                        "--target-module", "classifier", "--output-dir", str(tmp / "out")],
        r"holds one dataset without split names, not a split 'test'"),
    "select-layer --split on one dataset": (
        lambda d, tmp: ["select-layer", "--model", str(tmp / "no-model"), "--dataset", str(d["single"]), "--split", "test"],
        r"holds one dataset without split names, not a split 'test'"),
    "evaluate --split on one dataset": (
        lambda d, tmp: ["evaluate", str(tmp / "no-model"), str(d["single"]), str(tmp / "eval"), "--split", "test"],
        r"holds one dataset without split names, not a split 'test'"),
    "harvest --split missing from a DatasetDict": (
        lambda d, tmp: ["harvest", "--model", str(tmp / "no-model"), "--dataset", str(d["splits"]), "--split", "test",
                        "--target-module", "classifier", "--output-dir", str(tmp / "out")],
        r"has no split 'test'; its splits are \['train', 'validation'\]"),
    "evaluate without --split on several splits": (
        lambda d, tmp: ["evaluate", str(tmp / "no-model"), str(d["splits"]), str(tmp / "eval")],
        r"has no split None; its splits are \['train', 'validation'\]"),
    "missing --model path": (
        lambda d, tmp: ["harvest", "--model", str(tmp / "no-model"), "--dataset", str(d["single"]),
                        "--target-module", "classifier", "--output-dir", str(tmp / "out")],
        r"FileNotFoundError: model='.*no-model': no such directory"),
    "train into an unwritable --output-dir": (
        lambda d, tmp: ["train", "--model", str(tmp / "no-model"), "--deltas", str(tmp / "deltas"),
                        "--output-dir", str(d["single"] / "state.json" / "ocd")],
        r"--output-dir=.*is not a writable directory"),
    # The first errors of a user's own paths (were a Hub lookup error, a transformers config error, IndexError, KeyError).
    "missing --dataset directory": (
        lambda d, tmp: ["harvest", "--model", str(tmp / "no-model"), "--dataset", str(tmp / "no-data"),
                        "--target-module", "classifier", "--output-dir", str(tmp / "out")],
        r"FileNotFoundError: dataset='.*no-data': no such directory"),
    "evaluate a missing dataset directory": (
        lambda d, tmp: ["evaluate", str(tmp / "no-model"), str(tmp / "no-data"), str(tmp / "eval")],
        r"FileNotFoundError: dataset='.*no-data': no such directory"),
    "--model is a dataset directory": (
        lambda d, tmp: ["select-layer", "--model", str(d["single"]), "--dataset", str(d["single"])],
        r"model='.*single' is a dataset \(written by save_to_disk\), not a model"),
    "harvest an empty dataset": (
        lambda d, tmp: ["harvest", "--model", str(tmp / "no-model"), "--dataset", str(d["empty"]),
                        "--target-module", "classifier", "--output-dir", str(tmp / "out")],
        r"ValueError: dataset='.*empty' holds an empty dataset"),
    "evaluate an empty dataset": (
        lambda d, tmp: ["evaluate", str(tmp / "no-model"), str(d["empty"]), str(tmp / "eval")],
        r"ValueError: dataset='.*empty' holds an empty dataset"),
    "select-layer without the --label-column": (
        lambda d, tmp: ["select-layer", "--model", str(tmp / "no-model"), "--dataset", str(d["single"]), "--label-column", "y"],
        r"--label-column 'y' is not a column of the dataset \(columns: \['input_ids', 'attention_mask', 'label'\]\)"),
    "aggregate a JSON file that is not a results table": (
        lambda d, tmp: ["aggregate", str(d["single"] / "state.json")],
        r"state\.json' is not a results table: it has no 'rows' list"),
}


@pytest.fixture
def empty(tmp_path) -> Path:
    """A save_to_disk directory of a dataset with 0 rows (datasets writes no data file for it)."""
    bert_rows().select([]).save_to_disk(tmp_path / "empty")
    return tmp_path / "empty"


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_cli_errors_are_one_line_before_any_work(case, single, splits, empty, tmp_path, capsys):
    argv, phrase = SPLIT_CASES[case]
    with pytest.raises(SystemExit) as exit_info:
        main(argv({"single": single, "splits": splits, "empty": empty}, tmp_path))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    assert re.search(phrase, error), error
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()


def test_debug_shows_the_traceback(single, tmp_path):
    with pytest.raises(ValueError, match="not a split 'test'"):
        main(["--debug", "select-layer", "--model", str(tmp_path / "m"), "--dataset", str(single), "--split", "test"])


def test_split_of_a_saved_split_and_library_calls(single, splits, tmp_path):
    assert len(load_source_dataset(str(single))) == 4  # no --split: the directory's dataset
    assert load_source_dataset(str(splits)).num_rows == 4  # no --split: 'train'
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits are \['train', 'validation'\]"):
        load_source_dataset(str(splits), split="test")
    with pytest.raises(ValueError, match="output_dir=.*is not a writable directory"):
        evaluate_from_paths(str(tmp_path / "model"), str(single), str(single / "state.json" / "eval"))


# ----- one delta_mode decision, zero deltas, aggregation (point 12) ------------------------------------------


def test_auto_delta_mode_is_decided_once_on_every_delta_and_training_follows_it(tmp_path):
    from ocd_hf.methods.ocd.deltas import decide_delta_mode, load_deltas
    from ocd_hf.methods.ocd.training import build_config

    harvest_deltas(build_backbone("bert"), bert_rows(8), "classifier", tmp_path, delta_storage="full", progress=False)
    metadata, dataset = load_harvest_metadata(tmp_path), load_deltas(tmp_path)
    decision = metadata["delta_mode_decision"]
    assert decision["delta_mode"] == "factorised" and "over all 8 deltas" in decision["reason"]
    assert build_config(metadata, {}, dataset).delta_mode == "factorised"
    assert build_config({**metadata, "delta_mode_decision": {**decision, "delta_mode": "full"}}, {}, dataset).delta_mode == "full"

    # The case: the first 256 deltas are rank-1, later ones are not. Measured on every delta, so a training
    # split (at least half the rows) never sees a mean residual above training's 0.05 limit.
    residuals = [0.0] * 256 + [0.06] * 300
    stored = Dataset.from_dict({"factor_residual": residuals})
    settings = {"harvest_config": {"optimizer": "adam", "delta_storage": "factorised", "factor_rule": "sign"}}
    decided = decide_delta_mode(settings, stored)
    assert decided["delta_mode"] == "full" and decided["mean_factor_residual"] == pytest.approx(300 * 0.06 / 556)


def test_all_zero_deltas_are_skipped_and_counted_at_harvest(tmp_path, library_logs):
    backbone = build_backbone("mlp")
    dataset = build_dataset("mlp", 6)
    with torch.no_grad():
        predictions = backbone(features=torch.tensor(dataset["features"])).logits.view(-1)
    labels = list(dataset["label"])
    for row in (1, 4):  # fitted exactly: zero loss, zero gradient, an all-zero delta
        labels[row] = float(predictions[row])
    dataset = dataset.remove_columns("label").add_column("label", labels)
    with library_logs.at_level("WARNING"):
        deltas = harvest_deltas(backbone, dataset, "fc2", tmp_path, delta_storage="full", progress=False)
    metadata = load_harvest_metadata(tmp_path)
    assert deltas[:]["id"].tolist() == [0, 2, 3, 5] and bool((deltas[:]["rho"] > 0).all())
    assert metadata["skipped_ids_by_reason"] == {"zero_delta": [1, 4]} and metadata["num_skipped_non_finite"] == 0
    assert "all zeros" in library_logs.text and "[1, 4]" in library_logs.text


def test_aggregate_refuses_results_of_different_configurations(tmp_path, capsys):
    from ocd_hf.results import ResultRow, ResultsTable

    def table(num_samples: int, backbone: str) -> ResultsTable:
        metadata = {"task": "classification", "num_samples": num_samples, "seeds": [0, 1], "base_model_name_or_path": backbone,
                    "configuration_keys": ["task", "num_samples", "seeds"]}
        return ResultsTable([ResultRow("ocd_1", "OCD", "", {"accuracy": [0.5]})], metadata)

    paths = []
    for name, num_samples, backbone in (("a", 5, "seed-0"), ("b", 5, "seed-1"), ("c", 1, "seed-2")):
        table(num_samples, backbone).save(tmp_path / name)
        paths.append(str(tmp_path / name / "results.json"))
    main(["aggregate", *paths[:2]])  # other backbones (seeds) with the same settings: aggregated
    with pytest.raises(SystemExit):
        main(["aggregate", *paths])
    assert re.search(r"different configurations.*num_samples: \[5, 5, 1\]", capsys.readouterr().err)
