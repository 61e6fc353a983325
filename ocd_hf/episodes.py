"""Task distributions and few-shot episodes over a labelled ``datasets.Dataset`` (shared by Mc-Di and D2NWG).

A :class:`TaskDistribution` views a dataset as a set of classes. :meth:`TaskDistribution.class_split`
splits it at the class level into meta-train / meta-val / meta-test with disjoint classes;
:meth:`TaskDistribution.from_datasets` + :meth:`TaskDistribution.dataset_split` split several datasets
at the dataset level (meta-train on some, test on another). Both return a :class:`MetaSplit`, which
records how the split was made.

An :class:`EpisodeSampler` draws N-way K-shot episodes with Q queries per class, many at once, as
index tensors ``(E, N, K)`` / ``(E, N, Q)``. Label ``j`` of an episode belongs to class
``episode.classes[:, j]``; which class gets which label is a fresh random permutation in every
episode. Items are grouped by label, so with ``column="embedding"`` an :class:`Episode` holds
``support (E, N·K, d)``, ``support_labels (E, N·K)``, ``query (E, N·Q, d)`` and ``query_labels
(E, N·Q)`` ready for a batched head generator.

:func:`embed_items` computes an embedding once per item and stores it as a fixed-length float32
``datasets`` column, cached on disk under the encoder's identity and the dataset's fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import ClassLabel, Dataset, Features, List, Value, concatenate_datasets
from datasets import config as datasets_config
from datasets.arrow_writer import ArrowWriter

DEFAULT_SPLIT_NAMES = ("train", "val", "test")
EMBEDDING_CACHE_VERSION = 1


def _is_class_list(value: Any) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str)


def _is_text(feature: Any) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


class UnknownSplitError(KeyError):
    """A split name that a :class:`MetaSplit` does not have."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class TaskDistribution:
    """The classes of a labelled dataset and the rows of each class.

    ``dataset`` needs an integer ``label_column``; class names come from a ``name_column`` if present,
    else from a ``ClassLabel`` feature, else from the label values. Splits share their parent's dataset
    and row numbering, so episode indices always refer to rows of ``dataset``.
    """

    def __init__(
        self,
        dataset: Dataset,
        label_column: str = "label",
        *,
        name_column: str = "label_name",
        name: str = "dataset",
    ):
        if label_column not in dataset.column_names:
            raise ValueError(
                f"TaskDistribution: the dataset has no column {label_column!r} (columns: {dataset.column_names}); "
                "pass label_column= naming its integer class column."
            )
        if len(dataset) == 0:
            raise ValueError("TaskDistribution: the dataset is empty.")
        self.dataset = dataset
        self.label_column = label_column
        self.name = name
        labels = np.asarray(dataset.with_format("numpy", columns=[label_column])[:][label_column])
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"TaskDistribution: column {label_column!r} holds {labels.dtype} values, not integer class ids; "
                f"encode it first with dataset.class_encode_column({label_column!r})."
            )
        if (labels < 0).any():
            raise ValueError(
                f"TaskDistribution: {int((labels < 0).sum())} rows have a negative label in {label_column!r} "
                f"(e.g. -1 for unlabelled rows); drop them first with dataset.filter(lambda row: row[{label_column!r}] >= 0)."
            )
        self.row_labels = labels.astype(np.int64)
        self.classes, self.class_sizes = np.unique(self.row_labels, return_counts=True)
        self._rows = np.argsort(self.row_labels, kind="stable")  # rows grouped by class, in the order of self.classes
        self._offsets = np.concatenate([[0], np.cumsum(self.class_sizes)[:-1]]).astype(np.int64)
        self.class_names = self._read_class_names(name_column)
        self._features: dict[str, torch.Tensor] = {}
        self._sources: dict[str, list[int]] = {}

    def _read_class_names(self, name_column: str) -> dict[int, str]:
        if name_column in self.dataset.column_names:
            names = self.dataset.select(self._rows[self._offsets].tolist())[:][name_column]
            return {int(c): str(n) for c, n in zip(self.classes, names)}
        feature = self.dataset.features[self.label_column]
        if isinstance(feature, ClassLabel):
            return {int(c): feature.int2str(int(c)) for c in self.classes}
        return {int(c): str(int(c)) for c in self.classes}

    @property
    def num_classes(self) -> int:
        """How many classes the distribution has."""
        return len(self.classes)

    def rows_of(self, class_id: int) -> np.ndarray:
        """The dataset rows of one class."""
        position = int(np.searchsorted(self.classes, class_id))
        if position >= len(self.classes) or self.classes[position] != class_id:
            raise ValueError(f"TaskDistribution {self.name!r}: no class {class_id} (classes: {self.classes.tolist()}).")
        start = self._offsets[position]
        return self._rows[start : start + self.class_sizes[position]]

    def _subset(self, class_ids: Sequence[int], name: str) -> TaskDistribution:
        """The same dataset restricted to ``class_ids`` (no copy, shared feature cache)."""
        if len(class_ids) == 0:
            raise ValueError(f"TaskDistribution: split {name!r} of {self.name!r} would have no classes; give it at least one.")
        child = object.__new__(TaskDistribution)
        child.dataset, child.label_column, child.name, child.row_labels = self.dataset, self.label_column, name, self.row_labels
        child.classes = np.sort(np.asarray(class_ids, dtype=np.int64))
        positions = np.searchsorted(self.classes, child.classes)
        child.class_sizes = self.class_sizes[positions]
        child._rows = np.concatenate([self._rows[o : o + s] for o, s in zip(self._offsets[positions], child.class_sizes)])
        child._offsets = np.concatenate([[0], np.cumsum(child.class_sizes)[:-1]]).astype(np.int64)
        child.class_names = {int(c): self.class_names[int(c)] for c in child.classes}
        child._features = self._features
        child._sources = {
            source: kept for source, ids in self._sources.items() if (kept := [c for c in ids if c in child.class_names])
        }
        return child

    def drop_small_classes(self, min_items: int) -> TaskDistribution:
        """The distribution without the classes that have fewer than ``min_items`` rows."""
        if not (self.class_sizes >= min_items).any():
            raise ValueError(
                f"drop_small_classes: no class of {self.name!r} has {min_items} items (the largest has {self.class_sizes.max()})."
            )
        return self._subset(self.classes[self.class_sizes >= min_items], self.name)

    def _resolve(self, wanted: Sequence[int | str], split: str) -> list[int]:
        by_name = {name: class_id for class_id, name in self.class_names.items()}
        resolved = []
        for item in wanted:
            class_id = by_name.get(item) if isinstance(item, str) else int(item)
            if class_id is None or class_id not in self.class_names:
                known = ", ".join(f"{c} ({n})" for c, n in list(self.class_names.items())[:10])
                raise ValueError(
                    f"class_split: split {split!r} names class {item!r}, which {self.name!r} does not have; "
                    f"known classes (id and name): {known}{', ...' if self.num_classes > 10 else ''}."
                )
            resolved.append(class_id)
        return resolved

    def class_split(
        self, splits: Sequence[float] | Mapping[str, float] | Mapping[str, Sequence[int | str]] = (0.6, 0.2, 0.2), seed: int = 0
    ) -> MetaSplit:
        """Split the classes into disjoint meta-train / meta-val / meta-test sets.

        ``splits`` is either fractions of the classes (3 values name the splits train/val/test, 2 values
        train/test, or a mapping name -> fraction; they must sum to 1 and every split gets at least one
        class; the classes are shuffled with ``seed``), or a mapping name -> explicit class ids or class
        names (disjoint; classes not listed stay unused).
        """
        if isinstance(splits, Mapping) and all(_is_class_list(v) for v in splits.values()):
            assigned = {name: self._resolve(wanted, name) for name, wanted in splits.items()}
            owner: dict[int, str] = {}
            for split, class_ids in assigned.items():
                for class_id in class_ids:
                    if class_id in owner:
                        raise ValueError(
                            f"class_split: class {class_id} ({self.class_names[class_id]!r}) is in both {owner[class_id]!r} "
                            f"and {split!r}; meta-splits must have disjoint classes."
                        )
                    owner[class_id] = split
            record: dict[str, Any] = {"level": "class", "method": "explicit"}
        else:
            fractions = self._fractions(splits)
            order = np.random.default_rng(seed).permutation(self.classes)
            bounds = np.round(np.cumsum([0.0, *fractions.values()]) * self.num_classes).astype(int)
            assigned = {name: order[lo:hi].tolist() for name, lo, hi in zip(fractions, bounds[:-1], bounds[1:])}
            for name, class_ids in assigned.items():
                if not class_ids:
                    raise ValueError(
                        f"class_split: split {name!r} (fraction {fractions[name]}) gets none of the {self.num_classes} classes "
                        f"of {self.name!r}; give it a larger fraction or pass explicit class lists."
                    )
            record = {"level": "class", "method": "fractions", "fractions": fractions, "seed": seed}
        splits_by_name = {name: self._subset(class_ids, name) for name, class_ids in assigned.items()}
        record["classes"] = {name: part.classes.tolist() for name, part in splits_by_name.items()}
        record["unused_classes"] = sorted(set(self.classes.tolist()) - {c for ids in assigned.values() for c in ids})
        return MetaSplit(splits_by_name, record)

    @staticmethod
    def _fractions(splits: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
        if isinstance(splits, Mapping):
            if not all(isinstance(value, (int, float)) for value in splits.values()):
                raise ValueError(
                    f"class_split: {dict(splits)} mixes fractions and class lists; give either a fraction or a list of "
                    "classes for every split."
                )
            fractions = {str(name): float(value) for name, value in splits.items()}
        elif len(splits) in (2, 3):
            names = DEFAULT_SPLIT_NAMES if len(splits) == 3 else ("train", "test")
            fractions = dict(zip(names, map(float, splits)))
        else:
            raise ValueError(
                f"class_split: got {len(splits)} fractions; pass 3 (train/val/test), 2 (train/test), "
                "or a mapping split name -> fraction or -> class list."
            )
        if any(value <= 0 for value in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
            raise ValueError(
                f"class_split: fractions {fractions} must be positive and sum to 1 (every class goes to exactly one split)."
            )
        return fractions

    @classmethod
    def from_datasets(
        cls, datasets: Mapping[str, Dataset], label_column: str = "label", *, name_column: str = "label_name"
    ) -> TaskDistribution:
        """One distribution over several datasets with the same features (for a dataset-level split).

        Rows are concatenated in the mapping's order; a class of dataset ``name`` with label ``y`` gets
        the id ``offset[name] + y`` (offsets leave room for each dataset's largest label) and the name
        ``"name/<class name>"``. Split it with :meth:`dataset_split`.
        """
        if not datasets:
            raise ValueError("from_datasets: pass at least one dataset, e.g. {'glyphs': glyphs, 'fashion-mnist': fashion}.")
        parts = {name: cls(ds, label_column, name_column=name_column, name=name) for name, ds in datasets.items()}
        first_name, first = next(iter(parts.items()))
        for name, part in parts.items():
            if part.dataset.features != first.dataset.features:
                raise ValueError(
                    f"from_datasets: {name!r} has features {part.dataset.features} but {first_name!r} has "
                    f"{first.dataset.features}; bring them to the same columns first (ds.select_columns(...), ds.cast(...))."
                )
        combined = concatenate_datasets([part.dataset for part in parts.values()])
        offsets = np.cumsum([0] + [int(part.classes.max()) + 1 for part in parts.values()])[:-1]
        distribution = object.__new__(cls)
        distribution.dataset, distribution.label_column, distribution.name = combined, label_column, "+".join(parts)
        distribution.row_labels = np.concatenate([part.row_labels + offset for part, offset in zip(parts.values(), offsets)])
        distribution.classes = np.concatenate([part.classes + offset for part, offset in zip(parts.values(), offsets)])
        distribution.class_sizes = np.concatenate([part.class_sizes for part in parts.values()])
        row_starts = np.cumsum([0] + [len(part.dataset) for part in parts.values()])[:-1]
        distribution._rows = np.concatenate([part._rows + start for part, start in zip(parts.values(), row_starts)])
        distribution._offsets = np.concatenate([[0], np.cumsum(distribution.class_sizes)[:-1]]).astype(np.int64)
        distribution.class_names, distribution._sources, distribution._features = {}, {}, {}
        for (name, part), offset in zip(parts.items(), offsets):
            distribution.class_names.update({int(c + offset): f"{name}/{part.class_names[int(c)]}" for c in part.classes})
            distribution._sources[name] = (part.classes + offset).tolist()
        return distribution

    def dataset_split(self, splits: Mapping[str, Sequence[str]]) -> MetaSplit:
        """Split a :meth:`from_datasets` distribution by source dataset, e.g. ``{"train": ["glyphs"], "test": ["fashion"]}``."""
        if not self._sources:
            raise ValueError(
                f"dataset_split: {self.name!r} was not built from several datasets; "
                "build it with TaskDistribution.from_datasets({...}) or use class_split."
            )
        owner: dict[str, str] = {}
        for split, names in splits.items():
            for name in names:
                if name not in self._sources:
                    raise ValueError(f"dataset_split: split {split!r} names dataset {name!r}; known datasets: {list(self._sources)}.")
                if name in owner:
                    raise ValueError(f"dataset_split: dataset {name!r} is in both {owner[name]!r} and {split!r}.")
                owner[name] = split
        parts = {split: self._subset([c for name in names for c in self._sources[name]], split) for split, names in splits.items()}
        record = {
            "level": "dataset",
            "datasets": {split: list(names) for split, names in splits.items()},
            "classes": {split: part.classes.tolist() for split, part in parts.items()},
            "unused_datasets": [name for name in self._sources if name not in owner],
        }
        return MetaSplit(parts, record)

    def features(self, column: str) -> torch.Tensor:
        """Column ``column`` of the whole dataset as one float32 tensor ``(rows, ...)``, read once and shared by splits."""
        if column not in self._features:
            if column not in self.dataset.column_names:
                raise ValueError(
                    f"TaskDistribution {self.name!r}: no column {column!r} (columns: {self.dataset.column_names}); "
                    "compute embeddings with embed_items(dataset, encode_fn, column=...) first."
                )
            if _is_text(self.dataset.features[column]):
                raise ValueError(
                    f"TaskDistribution {self.name!r}: column {column!r} holds text; embed it with embed_items(...) "
                    "and sample the embedding column instead."
                )
            values = self.dataset.with_format("numpy", columns=[column])[:][column]
            self._features[column] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        return self._features[column]

    def __repr__(self) -> str:
        return (
            f"TaskDistribution({self.name!r}, {self.num_classes} classes, {int(self.class_sizes.sum())} items, "
            f"{int(self.class_sizes.min())}-{int(self.class_sizes.max())} per class)"
        )


class MetaSplit(Mapping[str, TaskDistribution]):
    """Named meta-splits (e.g. train/val/test) with disjoint classes, and ``record``: how they were made (JSON-ready)."""

    def __init__(self, splits: dict[str, TaskDistribution], record: dict[str, Any]):
        self._splits = splits
        self.record = record

    def __getitem__(self, name: str) -> TaskDistribution:
        if name not in self._splits:
            raise UnknownSplitError(f"unknown split {name!r}; this meta-split has {list(self._splits)}.")
        return self._splits[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)

    def benchmark_episodes(
        self, n_way: int, k_shot: int, q_queries: int, num_episodes: int, column: str | None = None, seed: int = 10_000
    ) -> dict[str, "Episode"]:
        """The fixed episodes every row of a benchmark is scored on: ``num_episodes`` per split other than
        ``"train"``, drawn with seed ``seed + position`` among those splits (val and test never share episodes)."""
        scored = [name for name in self if name != "train"]
        return {
            name: EpisodeSampler(self[name], n_way, k_shot, q_queries, seed=seed + offset).sample(num_episodes, column=column)
            for offset, name in enumerate(scored)
        }

    def __repr__(self) -> str:
        return f"MetaSplit({self.record['level']}: " + ", ".join(f"{k}={v.num_classes} classes" for k, v in self.items()) + ")"


@dataclasses.dataclass(frozen=True)
class Episode:
    """A batch of ``E`` few-shot episodes (``E = 1`` for one).

    ``support_index`` ``(E, N, K)`` and ``query_index`` ``(E, N, Q)`` are rows of the distribution's
    dataset; ``[:, j]`` holds the items of label ``j``, whose original class id is ``classes[:, j]``.
    ``support`` ``(E, N·K, ...)`` and ``query`` ``(E, N·Q, ...)`` hold their features when sampled with
    a column, in the order of ``support_labels`` / ``query_labels``.
    """

    support_index: torch.Tensor
    query_index: torch.Tensor
    classes: torch.Tensor
    support: torch.Tensor | None = None
    query: torch.Tensor | None = None

    @property
    def n_way(self) -> int:
        return self.support_index.shape[1]

    @property
    def k_shot(self) -> int:
        return self.support_index.shape[2]

    @property
    def q_queries(self) -> int:
        return self.query_index.shape[2]

    @property
    def support_labels(self) -> torch.Tensor:
        """``(E, N·K)`` labels in ``0..N-1``, label ``j`` for class ``classes[:, j]``."""
        return torch.arange(self.n_way).repeat_interleave(self.k_shot).repeat(len(self), 1)

    @property
    def query_labels(self) -> torch.Tensor:
        """``(E, N·Q)`` labels in ``0..N-1``."""
        return torch.arange(self.n_way).repeat_interleave(self.q_queries).repeat(len(self), 1)

    def with_features(self, features: torch.Tensor) -> Episode:
        """The episodes with ``support``/``query`` gathered from ``features`` ``(rows, ...)``, one row per dataset row."""
        needed = int(max(self.support_index.max(), self.query_index.max() if self.q_queries else 0))
        if features.shape[0] <= needed:
            raise ValueError(
                f"Episode.with_features: the episodes use row {needed} but the features have {features.shape[0]} rows; "
                "pass the features of the whole dataset the episodes were sampled from."
            )
        shape = features.shape[1:]
        support = features[self.support_index.reshape(-1)].reshape(len(self), -1, *shape)
        query = features[self.query_index.reshape(-1)].reshape(len(self), -1, *shape)
        return dataclasses.replace(self, support=support, query=query)

    def __len__(self) -> int:
        return self.support_index.shape[0]

    def __getitem__(self, item: int | slice) -> Episode:
        """Episodes ``item`` (an int keeps a batch dimension of 1)."""
        if isinstance(item, int) and not -len(self) <= item < len(self):
            raise IndexError(f"episode {item} out of range for a batch of {len(self)}")
        index = slice(item, item + 1 or None) if isinstance(item, int) else item
        return Episode(**{f.name: None if (v := getattr(self, f.name)) is None else v[index] for f in dataclasses.fields(self)})


def _random_subsets(sizes: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """``(R, m)``: for each row r, m distinct values of ``0..sizes[r]-1`` in random order (uniform).

    Floyd's algorithm, vectorised over rows (m steps), then a random shuffle of each row.
    """
    picks = torch.empty(len(sizes), m, dtype=torch.int64)
    for i in range(m):
        top = sizes - m + i
        draw = (torch.rand(len(sizes), dtype=torch.float64, generator=generator) * (top + 1)).long().clamp_(max=top)
        taken = (picks[:, :i] == draw[:, None]).any(dim=1)
        picks[:, i] = torch.where(taken, top, draw)
    order = torch.rand(len(sizes), m, generator=generator).argsort(dim=1)
    return picks.gather(1, order)


class EpisodeSampler:
    """Seeded N-way, K-shot episodes with ``q_queries`` queries per class from a :class:`TaskDistribution`.

    Two samplers with the same seed give the same episodes; successive :meth:`sample` calls continue the
    seeded stream. Every class of an episode is distinct, support and query items are distinct, and
    the class -> label assignment is a uniformly random permutation per episode.
    """

    def __init__(self, distribution: TaskDistribution, n_way: int, k_shot: int, q_queries: int = 15, seed: int = 0):
        for name, value, least in (("n_way", n_way, 1), ("k_shot", k_shot, 1), ("q_queries", q_queries, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"EpisodeSampler: {name} must be an integer >= {least}, got {value!r}.")
        if n_way > distribution.num_classes:
            raise ValueError(
                f"EpisodeSampler: {n_way}-way episodes need {n_way} classes but {distribution.name!r} has "
                f"{distribution.num_classes}; lower n_way or give this split more classes."
            )
        per_class = k_shot + q_queries
        small = distribution.class_sizes < per_class
        if small.any():
            listed = ", ".join(
                f"{distribution.class_names[int(c)]!r} (id {int(c)}): {int(n)}"
                for c, n in zip(distribution.classes[small][:20], distribution.class_sizes[small][:20])
            )
            raise ValueError(
                f"EpisodeSampler: {int(small.sum())} classes of {distribution.name!r} have fewer than k_shot + q_queries = "
                f"{per_class} items: {listed}{', ...' if small.sum() > 20 else ''}. Lower k_shot/q_queries, or drop them "
                f"with distribution.drop_small_classes({per_class})."
            )
        self.distribution = distribution
        self.n_way, self.k_shot, self.q_queries, self.seed = n_way, k_shot, q_queries, seed
        self._generator = torch.Generator().manual_seed(seed)
        self._rows = torch.from_numpy(distribution._rows)
        self._offsets = torch.from_numpy(distribution._offsets)
        self._sizes = torch.from_numpy(distribution.class_sizes).long()
        self._class_ids = torch.from_numpy(distribution.classes)

    def sample(self, num_episodes: int = 1, column: str | None = None) -> Episode:
        """``num_episodes`` episodes in one vectorised draw; with ``column``, also their features from that column."""
        if not isinstance(num_episodes, int) or num_episodes < 1:
            raise ValueError(f"EpisodeSampler.sample: num_episodes must be an integer >= 1, got {num_episodes!r}.")
        num_classes = self.distribution.num_classes
        chosen = _random_subsets(torch.full((num_episodes,), num_classes), self.n_way, self._generator)  # (E, N)
        per_class = self.k_shot + self.q_queries
        picks = _random_subsets(self._sizes[chosen].reshape(-1), per_class, self._generator)  # (E·N, K+Q)
        rows = self._rows[self._offsets[chosen].reshape(-1, 1) + picks].reshape(num_episodes, self.n_way, per_class)
        episode = Episode(rows[..., : self.k_shot], rows[..., self.k_shot :], self._class_ids[chosen])
        return episode if column is None else episode.with_features(self.distribution.features(column))


def embed_items(
    dataset: Dataset,
    encode_fn: Callable[[Any], Any],
    column: str = "text",
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    *,
    encoder_id: str,
    output_column: str = "embedding",
) -> Dataset:
    """``dataset`` with an ``output_column`` of float32 embeddings (a fixed-length ``List``), one per row.

    ``encode_fn`` takes a batch of ``column`` values (a list of strings for a text column, else a numpy
    array ``(B, ...)``) and returns ``(B, d)`` (numpy, torch or nested lists). Embeddings are computed
    once: they are written to ``cache_dir`` (default: the ``datasets`` cache) under a key made of
    ``encoder_id``, the dataset's fingerprint and ``column``, and reused memory-mapped on the next call.
    ``encoder_id`` names the encoder and every setting that changes its output (e.g.
    ``"sentence-transformers/all-MiniLM-L6-v2 normalize=True"``): a hash of ``encode_fn`` is no
    identity, since encoders change state on their first call (a SentenceTransformer's hash does).
    Any change to the dataset changes its fingerprint and so recomputes.
    """
    if not isinstance(encoder_id, str) or not encoder_id.strip():
        raise ValueError(
            f"embed_items: encoder_id must name the encoder and its settings, e.g. "
            f"'sentence-transformers/all-MiniLM-L6-v2 normalize=True'; got {encoder_id!r}."
        )
    if column not in dataset.column_names:
        raise ValueError(f"embed_items: the dataset has no column {column!r} (columns: {dataset.column_names}).")
    if output_column in dataset.column_names:
        raise ValueError(
            f"embed_items: the dataset already has a column {output_column!r}; pass another output_column= "
            f"or drop it with dataset.remove_columns({output_column!r})."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"embed_items: batch_size must be an integer >= 1, got {batch_size!r}.")
    if len(dataset) == 0:
        raise ValueError("embed_items: the dataset is empty.")
    key = json.dumps([EMBEDDING_CACHE_VERSION, encoder_id, dataset._fingerprint, column])
    directory = Path(cache_dir) if cache_dir is not None else Path(datasets_config.HF_DATASETS_CACHE) / "ocd_hf_embeddings"
    path = directory / f"embeddings-{hashlib.sha256(key.encode()).hexdigest()[:24]}.arrow"
    if not path.exists():
        _write_embeddings(dataset, encode_fn, column, batch_size, output_column, path)
    cached = Dataset.from_file(str(path))
    if len(cached) != len(dataset) or cached.column_names != [output_column]:
        raise ValueError(
            f"embed_items: the cache file {path} does not match the dataset ({len(cached)} rows of {cached.column_names}, "
            f"expected {len(dataset)} rows of [{output_column!r}]); delete it to recompute."
        )
    return concatenate_datasets([dataset, cached], axis=1)


def _write_embeddings(dataset: Dataset, encode_fn: Callable, column: str, batch_size: int, output_column: str, path: Path) -> None:
    source = dataset.select_columns([column]) if _is_text(dataset.features[column]) else dataset.select_columns([column]).with_format("numpy")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer, width = None, None
    try:
        for start in range(0, len(dataset), batch_size):
            values = source[start : start + batch_size][column]
            output = encode_fn(values)
            array = np.asarray(output.detach().cpu() if torch.is_tensor(output) else output, dtype=np.float32)
            rows = min(batch_size, len(dataset) - start)
            if array.ndim != 2 or array.shape[0] != rows or (width is not None and array.shape[1] != width):
                expected = f"({rows}, {width if width is not None else 'd'})"
                raise ValueError(
                    f"embed_items: encode_fn returned shape {tuple(array.shape)} for rows {start}..{start + rows - 1}; "
                    f"it must return {expected}: one embedding vector per input."
                )
            if not np.isfinite(array).all():
                raise ValueError(f"embed_items: encode_fn returned non-finite values for rows {start}..{start + rows - 1}.")
            if writer is None:
                width = array.shape[1]
                features = Features({output_column: List(Value("float32"), length=width)})
                writer = ArrowWriter(path=str(partial), features=features)
            writer.write_table(pa.table({output_column: pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), width)}))
        writer.finalize()
        os.replace(partial, path)
    finally:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
