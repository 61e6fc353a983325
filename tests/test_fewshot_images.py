"""recipes/fewshot_images.py and ``fewshot_mcdi.py --source glyphs`` at tiny scale: 12 rendered characters,
a fake Fashion-MNIST, one encoder epoch. The encoder must never see a meta-val or meta-test class."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fewshot_images  # recipes/ is on pytest's pythonpath  # noqa: E402
import fewshot_mcdi  # noqa: E402
import lenet_ocd  # noqa: E402
from test_recipes_data import write_fashion_mnist  # noqa: E402

from ocd_hf import LeNet5ForImageClassification  # noqa: E402
from ocd_hf import sources as ocd_sources  # noqa: E402
from ocd_hf.methods.mcdi import encoder_fingerprint  # noqa: E402

CHARACTERS = "ABDEFGHJKLMN"  # 12 Latin capitals: no homoglyph or case pair is removed


@pytest.fixture
def tiny_glyphs(monkeypatch, tmp_path):
    """Few characters and a fake Fashion-MNIST (4 test images per class); records what LeNet-5 is trained on."""
    monkeypatch.setattr(ocd_sources, "render_glyphs", functools.partial(ocd_sources.render_glyphs, {"latin": CHARACTERS}))
    (tmp_path / "fashion").mkdir()
    write_fashion_mnist(tmp_path / "fashion", train=10, test=40)
    trained_on = []
    train_lenet = lenet_ocd.train_lenet

    def spy(model, dataset, settings, seed, log=print):
        trained_on.append(dataset.with_format("numpy", columns=["pixel_values", "label"])[:])
        return train_lenet(model, dataset, settings, seed, log=log)

    monkeypatch.setattr(lenet_ocd, "train_lenet", spy)
    options = [
        "--source", "glyphs", "--glyph-instances", "6", "--encoder-epochs", "1", "--encoder-holdout", "0.2", "--split-fractions", "0.5", "0.25",
        "0.25", "--n-way", "3", "--shots", "1", "--queries", "2", "--fashion-mnist-dir", str(tmp_path / "fashion"), "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    return options, trained_on


def pixel_rows(images: np.ndarray) -> set[bytes]:
    from data import pixel_values_from_arrays

    return {row.tobytes() for row in pixel_values_from_arrays(list(images), num_channels=1).numpy()}


def test_encoder_sees_only_meta_train_classes_and_embeds_every_split(tiny_glyphs):
    options, trained_on = tiny_glyphs
    args = fewshot_mcdi.parse_args(options)
    splits, encoder_id, fingerprint = fewshot_images.image_splits(args)
    assert list(splits) == ["train", "val", "test", "fashion_mnist"]
    assert [splits[name].num_classes for name in splits] == [6, 3, 3, 10]
    record = splits.record
    classes = {name: set(part.classes.tolist()) for name, part in splits.items()}
    assert not any(classes[a] & classes[b] for a in classes for b in classes if a < b), "disjoint class ids"

    # What LeNet-5 was trained on: images of the meta-train classes only, less the held-out ones.
    assert len(trained_on) == 1
    fitted = trained_on[0]
    images = {name: part.dataset.with_format("numpy", columns=["image"])[:]["image"][part._rows] for name, part in splits.items()}
    seen = {row.tobytes() for row in fitted["pixel_values"]}
    assert len(fitted["label"]) == 6 * 5 and set(fitted["label"].tolist()) == set(range(6))
    assert seen <= pixel_rows(images["train"])
    for name in ("val", "test", "fashion_mnist"):
        assert not seen & pixel_rows(images[name]), f"the encoder saw images of {name}"
    encoder = record["encoder"]
    assert encoder["trained_on_classes"] == sorted(classes["train"])
    train_names = [splits["train"].class_names[c].split("/", 1)[1] for c in encoder["trained_on_classes"]]
    assert encoder["trained_on_names"] == train_names
    checkpoint = LeNet5ForImageClassification.from_pretrained(encoder["checkpoint"])
    assert list(checkpoint.config.id2label.values()) == train_names  # the head it was trained with: meta-train classes only
    assert encoder_fingerprint(checkpoint) == fingerprint == encoder["fingerprint"] and encoder["id"] == encoder_id
    assert f"seed={args.seed}" in encoder_id and "epochs=1" in encoder_id and "class_split(0.5/0.25/0.25" in encoder_id
    assert encoder["fit_images"] == 30 and encoder["held_out_images"] == 6 and 0 <= encoder["held_out_accuracy"] <= 1

    # Embeddings: what fc3 reads, 84-d, for every row of every split.
    for name, part in splits.items():
        features = part.features("embedding")
        assert features.shape == (len(part.dataset), 84) and (features >= 0).all()
    part = splits["fashion_mnist"]
    rows = torch.from_numpy(part._rows[:5])
    from data import pixel_values_from_arrays

    expected = fewshot_images.penultimate_features(checkpoint, pixel_values_from_arrays(list(images["fashion_mnist"][:5]), 1))
    torch.testing.assert_close(part.features("embedding")[rows], expected)
    assert record["items_per_class"] == {"train": [6, 6], "val": [6, 6], "test": [6, 6], "fashion_mnist": [4, 4]}
    json.dumps(record)

    # The second call reuses the cached encoder; without the cross-domain split there is no fashion_mnist.
    args.cross_domain = "none"
    again, _, same = fewshot_images.image_splits(args)
    assert len(trained_on) == 1 and same == fingerprint and list(again) == ["train", "val", "test"]


def test_recipe_runs_end_to_end_on_glyphs(tiny_glyphs, tmp_path):
    options, _ = tiny_glyphs
    summary = fewshot_mcdi.main([
        *options, "--episodes", "10", "--num-tasks", "8", "--pool-size", "3", "--head-steps", "3", "--train-steps", "2", "--batch-size", "4",
        "--no-progress",
    ])  # fmt: skip
    for split in ("val", "test", "fashion_mnist"):
        rows = summary["1shot"][split]
        assert {"logistic_regression", "nearest_centroid", "mcdi", "mcdi_mean5", "mcdi_then_adam5", "query_label_bound"} <= set(rows)
        assert all(0.0 <= mean <= 1.0 for mean, _ in rows.values())
    config = json.loads((tmp_path / "out" / "3way-1shot" / "generator" / "config.json").read_text())
    assert config["embedding_dim"] == 84
    assert config["encoder_id"] == summary["split"]["encoder"]["id"] and config["encoder_fingerprint"] == summary["split"]["encoder"]["fingerprint"]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(saved["split"]["classes"]) == {"train", "val", "test", "fashion_mnist"}
