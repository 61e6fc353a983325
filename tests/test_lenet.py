"""LeNet-5 backbone (ocd_hf.backbones) and recipes/lenet_ocd.py: round trips, the fc2 target, batched
per-sample weights, seeded training, the validation carve and a tiny end-to-end run."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DENOISER
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForImageClassification

from ocd_hf import LeNet5Config, LeNet5ForImageClassification, OCDConfig, OCDWrapper, find_target_linear, load_pretrained_backbone

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import lenet_ocd  # recipes/ is on pytest's pythonpath
from data import load_image_classification
from test_recipes_data import write_fashion_mnist

NAMES = ["cat", "dog", "fox"]
TINY_LENET = [
    "--validation-size", "40", "--epochs", "1", "--classifier-batch-size", "64", "--harvest-size", "12", "--train-steps", "2",
    "--batch-size", "4", "--eval-size", "8", "--num-samples", "2", "--sampling-seeds", "1", "--eval-batch-size", "16",
    "--num-threads", "1", "--no-progress",
]


def lenet(image_size: int = 28, num_channels: int = 1, seed: int = 0) -> LeNet5ForImageClassification:
    torch.manual_seed(seed)
    return LeNet5ForImageClassification(LeNet5Config(num_channels=num_channels, image_size=image_size, id2label=dict(enumerate(NAMES))))


def pixels(batch: int, image_size: int = 28, num_channels: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, num_channels, image_size, image_size, generator=torch.Generator().manual_seed(seed))


# ----- the backbone ---------------------------------------------------------------------------


def test_classic_lenet5_layout_and_labels():
    model = lenet()
    assert [name for name, _ in model.named_children()] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert (model.fc1.in_features, model.fc1.out_features, model.fc2.in_features, model.fc2.out_features) == (400, 120, 120, 84)
    assert model.fc3.out_features == 3 and model.conv1.padding == (2, 2)
    assert model.config.num_labels == 3 and model.config.label2id == {"cat": 0, "dog": 1, "fox": 2}
    assert LeNet5Config().num_labels == 10
    assert lenet(image_size=32, num_channels=3).fc1.in_features == 16 * 6 * 6  # 32 -> 16 -> 12 -> 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_labels": 1}, "num_labels must be >= 2"),
        ({"image_size": 8}, "image_size must be an int >= 12"),
        ({"num_labels": 4, "id2label": {0: "a", 1: "b"}}, "id2label names 2 classes"),
    ],
)
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LeNet5Config(**kwargs)


def test_forward_loss_tuple_output_and_shape_error():
    model, x, labels = lenet(), pixels(4), torch.tensor([0, 1, 2, 1])
    out = model(x, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert model(x).loss is None and out.logits.shape == (4, 3)
    loss, logits = model(x, labels=labels, return_dict=False)
    assert torch.equal(logits, out.logits) and torch.equal(loss, out.loss)
    with pytest.raises(ValueError, match=r"expects pixel_values of shape \(batch, 1, 28, 28\)"):
        model(pixels(2, image_size=32))


def test_save_load_round_trip_is_bit_identical_through_every_loader(tmp_path):
    model, x = lenet().eval(), pixels(5)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "ocd-lenet5"
    expected = model(x).logits
    for loaded in (
        LeNet5ForImageClassification.from_pretrained(tmp_path),
        AutoModelForImageClassification.from_pretrained(tmp_path),
        load_pretrained_backbone(str(tmp_path)),  # the class named in config.json's architectures
    ):
        assert type(loaded) is LeNet5ForImageClassification  # post_init's re-initialisation left the loaded weights alone
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[name]), name
        assert torch.equal(loaded.eval()(x).logits, expected)
        assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "fox"}


def test_fc2_is_a_per_sample_target_with_the_papers_shape():
    config = OCDConfig.from_backbone(lenet(), "fc2")
    assert config.target_module == "fc2" and (config.out_features, config.in_features) == (84, 120)
    assert not config.per_token and config.task == "classification" and config.output_dim == 3
    assert config.base_model_class == "LeNet5ForImageClassification"


def test_batched_ocd_forward_equals_a_model_copy_per_sample(tmp_path):
    backbone, x = lenet(image_size=12).eval(), pixels(3, image_size=12)  # 12×12: the smallest LeNet-5
    backbone.save_pretrained(tmp_path / "backbone")
    ocd = OCDWrapper.attach(backbone, "fc2", denoiser_config=TINY_DENOISER, base_model_name_or_path=str(tmp_path / "backbone"))
    deltas = torch.randn(3, 84, 120, generator=torch.Generator().manual_seed(3)) * 0.1
    batched = ocd.forward_with_deltas(deltas, pixel_values=x).logits
    for b in range(3):
        reference = copy.deepcopy(backbone)
        with torch.no_grad():
            find_target_linear(reference, "fc2")[1].weight += deltas[b]
        torch.testing.assert_close(batched[b : b + 1], reference(x[b : b + 1]).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched, backbone(x).logits, atol=1e-4), "deltas had no effect"
    ocd.save_pretrained(tmp_path / "ocd")
    reloaded = OCDWrapper.from_pretrained(tmp_path / "ocd")  # the backbone comes back from base_model_name_or_path
    assert isinstance(reloaded.backbone, LeNet5ForImageClassification) and reloaded.target_name == "fc2"
    assert torch.equal(reloaded.forward_with_deltas(deltas, pixel_values=x).logits, batched)


# ----- recipe pieces --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("idx")
    write_fashion_mnist(directory, train=300, test=50)
    return directory


def test_validation_carve_is_seeded_disjoint_and_complete(idx_dir):
    train, _ = load_image_classification(str(idx_dir))
    rest, validation = lenet_ocd.split_validation(train, 40, seed=0)
    ids, held_out = np.asarray(rest["id"][:]), np.asarray(validation["id"][:])
    assert (len(ids), len(held_out)) == (260, 40) and not set(ids) & set(held_out)
    assert sorted([*ids, *held_out]) == list(range(300)) and (np.diff(ids) > 0).all()
    assert np.array_equal(np.asarray(lenet_ocd.split_validation(train, 40, seed=0)[1]["id"][:]), held_out)
    assert not np.array_equal(np.asarray(lenet_ocd.split_validation(train, 40, seed=1)[1]["id"][:]), held_out)
    expected = train.select(held_out.tolist()).with_format("numpy")[:]
    np.testing.assert_array_equal(validation.with_format("numpy")[:]["image"], expected["image"])
    unsplit, no_validation = lenet_ocd.split_validation(train, 0, seed=0)
    assert unsplit is train and no_validation is None
    with pytest.raises(ValueError, match="--validation-size must be between 0 and 299"):
        lenet_ocd.split_validation(train, 300, seed=0)


def test_train_lenet_is_seeded_learns_and_runs_on_a_subset():
    # Learnable synthetic data: the class is which third of the image is bright.
    rng = np.random.default_rng(0)
    labels = np.arange(96) % 3
    images = rng.integers(0, 60, size=(96, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, :, label * 9 : label * 9 + 10] += 180
    from datasets import Dataset

    dataset = lenet_ocd.with_pixel_values(Dataset.from_dict({"image": images, "label": labels}), num_channels=1)
    assert dataset.features["pixel_values"].shape == (1, 28, 28)
    settings = lenet_ocd.LeNetTraining(epochs=3, batch_size=16, lr=3e-3)
    logs: list[str] = []
    first = lenet_ocd.train_lenet(lenet(), dataset, settings, seed=5, log=logs.append)
    second = lenet_ocd.train_lenet(lenet(), dataset, settings, seed=5, log=logs.append)
    assert len(logs) == 6 and logs[0].startswith("epoch 1/3: training loss")
    assert not first.training
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    inputs = torch.from_numpy(dataset.with_format("numpy")[:]["pixel_values"])
    with torch.no_grad():
        accuracy = (first(inputs).logits.argmax(-1) == torch.from_numpy(labels)).float().mean().item()
    assert accuracy > 0.9
    on_subset = lenet_ocd.train_lenet(lenet(), lenet_ocd.take_rows(dataset, np.arange(0, 96, 2)), settings, seed=5, log=logs.append)
    assert not torch.equal(on_subset.fc2.weight, first.fc2.weight)
    with pytest.raises(ValueError, match=r"lacks the columns \['pixel_values'\]"):
        lenet_ocd.train_lenet(lenet(), dataset.remove_columns("pixel_values"), settings, seed=0)


# ----- the recipe end to end ------------------------------------------------------------------


def finite_metrics(results: dict) -> bool:
    """Every row has a finite accuracy in [0, 1] and a finite cross-entropy, in every run."""
    for row in results["rows"]:
        accuracy, cross_entropy = row["metrics"]["accuracy"], row["metrics"]["cross_entropy"]
        values = [accuracy["mean"], *accuracy["values"], cross_entropy["mean"], *cross_entropy["values"]]
        if not all(math.isfinite(v) for v in values) or not 0 <= accuracy["mean"] <= 1:
            return False
    return True


@pytest.mark.parametrize("eval_split, eval_size, expected_rows", [("test", 8, 8), ("validation", 100, 40)])
def test_lenet_recipe_end_to_end(tmp_path, idx_dir, eval_split, eval_size, expected_rows):
    output = tmp_path / "out"
    summary = lenet_ocd.main([
        "--dataset", str(idx_dir), "--output-dir", str(output), *TINY_LENET, "--eval-split", eval_split, "--eval-size", str(eval_size),
    ])
    assert summary["target_module"] == "fc2" and summary["delta_mode"] == "factorised"  # fc2's Adam deltas are rank-1
    assert summary["sizes"] == {"classifier_train": 260, "validation": 40, "harvest": 12, "eval": expected_rows}
    assert json.loads((output / "summary.json").read_text())["eval_split"] == eval_split
    for ext in ("json", "md", "png"):
        assert (output / "evaluation" / f"results.{ext}").is_file()
    results = json.loads((output / "evaluation" / "results.json").read_text())
    names = {row["name"] for row in results["rows"]}
    assert names >= {"base", "ocd_1", "oracle", "label_free", "nearest_neighbour"}
    assert "ocd_ens2" not in names  # the recipe's regression generator is deterministic: its ensemble is ocd_1 again
    assert results["metadata"]["num_examples"] == expected_rows and finite_metrics(results)
    assert all(math.isfinite(seconds) for seconds in summary["timings_seconds"].values())
    backbone = AutoModelForImageClassification.from_pretrained(output / "backbone")
    assert isinstance(backbone, LeNet5ForImageClassification) and backbone.config.id2label[9] == "Ankle boot"
    reloaded = OCDWrapper.from_pretrained(output / "hypernetwork")  # backbone found from the config
    assert isinstance(reloaded.backbone, LeNet5ForImageClassification) and reloaded.target_name == "fc2"


def test_lenet_recipe_refuses_validation_eval_without_a_validation_split(tmp_path, idx_dir):
    with pytest.raises(ValueError, match="--eval-split validation needs a validation split"):
        lenet_ocd.main(["--dataset", str(idx_dir), "--output-dir", str(tmp_path), "--eval-split", "validation", "--validation-size", "0"])


def test_lenet_recipe_cross_fits_with_a_regression_generator(tmp_path, idx_dir):
    output = tmp_path / "out"
    lenet_ocd.main([
        "--dataset", str(idx_dir), "--output-dir", str(output), *TINY_LENET, "--cross-fit", "2", "--generator", "regression",
        "--conditioning", "input", "output",
    ])
    fold_models = [line for line in (output / "deltas" / "README.md").read_text().splitlines() if "Cross-fitting" in line]
    assert fold_models and "2 folds" in fold_models[0]
    config = json.loads((output / "hypernetwork" / "config.json").read_text())
    assert config["generator_type"] == "regression" and config["condition_components"] == ["input", "output"]
    assert finite_metrics(json.loads((output / "evaluation" / "results.json").read_text()))


def test_lenet_recipe_defaults_are_the_validation_choice():
    args = lenet_ocd.parse_args([])
    assert args.target_module == "fc2" and args.generator == "regression" and args.cross_fit is None
