"""Delta datasets on the Hub: push a harvest with its card and metadata, pull it back formatted like :func:`load_deltas`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from datasets import Dataset
from huggingface_hub import CommitInfo

from ...cards import CARD_NAME
from ...hub import load_weight_dataset_from_hub, push_weight_dataset
from .deltas import format_deltas, load_deltas, load_harvest_metadata
from .model_card import delta_dataset_card


def push_deltas_to_hub(
    path_or_dataset: str | os.PathLike | Dataset,
    repo_id: str,
    *,
    metadata: Mapping[str, Any] | None = None,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    max_shard_size: int | str | None = None,
) -> CommitInfo:
    """Push a delta dataset to a Hub dataset repo: its rows (parquet), dataset card and ``harvest.json``.

    ``path_or_dataset`` is a harvest directory (its ``harvest.json`` and ``README.md`` are used), or
    a ``datasets.Dataset`` with the delta columns plus its harvest ``metadata``. Read it back with
    :func:`load_deltas_from_hub` or ``datasets.load_dataset(repo_id, split="train")``.
    Returns the information of the last commit.
    """
    if isinstance(path_or_dataset, Dataset):
        if metadata is None:
            raise ValueError(
                "Pass the harvest metadata with the dataset: push_deltas_to_hub(dataset, repo_id, "
                "metadata=load_harvest_metadata(path)), or pass the harvest directory itself."
            )
        dataset, card_file = path_or_dataset, None
    else:
        directory = Path(path_or_dataset)
        metadata = metadata or load_harvest_metadata(directory)
        dataset, card_file = load_deltas(directory), directory / CARD_NAME
    card = card_file.read_bytes() if card_file is not None and card_file.is_file() else str(delta_dataset_card(metadata)).encode()
    return push_weight_dataset(
        dataset, metadata, card, repo_id, commit_message=commit_message or f"Upload OCD deltas of {metadata.get('target_module')}",
        revision=revision, private=private, token=token, max_shard_size=max_shard_size,
    )


def load_deltas_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Dataset, dict[str, Any]]:
    """A delta dataset pushed with :func:`push_deltas_to_hub`, and its harvest metadata.

    The dataset is formatted like :func:`load_deltas`' (torch tensors, ``delta`` as float32 whatever
    the storage dtype); it comes from the ``datasets`` cache when offline.
    """
    dataset, metadata = load_weight_dataset_from_hub(repo_id, revision=revision, token=token, cache_dir=cache_dir)
    return format_deltas(dataset, metadata.get("harvest_config", {}).get("dtype", "float32")), metadata
