"""OCD on the Hub: delta datasets (push a harvest with its card and metadata, pull it back formatted like
:func:`load_deltas`) and a SetFit model pushed together with its hypernetwork."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from datasets import Dataset
from huggingface_hub import CommitInfo

from ...backbones import SETFIT_MODEL_CLASS, SetFitBackbone
from ...cards import CARD_NAME
from ...hub import load_weight_dataset_from_hub, push_weight_dataset
from ...target import find_target_linear, layer_fingerprint
from .deltas import format_deltas, load_deltas, load_harvest_metadata
from .model_card import delta_dataset_card

if TYPE_CHECKING:
    from .modeling import OCDWrapper


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
    Rows, card and metadata go in one commit (:func:`ocd_hf.hub.push_weight_dataset`), whose information
    is returned.
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
    verify: bool = False,
) -> tuple[Dataset, dict[str, Any]]:
    """A delta dataset pushed with :func:`push_deltas_to_hub`, and its harvest metadata, both from one commit.

    The revision is resolved once and rows and metadata are read from that commit (from the cache when
    offline); every parquet file's row count (``verify=True``: its sha256) is checked against the push's
    record. The dataset is formatted like :func:`load_deltas`' (torch tensors, ``delta`` as float32
    whatever the storage dtype).
    """
    dataset, metadata = load_weight_dataset_from_hub(repo_id, revision=revision, token=token, cache_dir=cache_dir, verify=verify)
    return format_deltas(dataset, metadata.get("harvest_config", {}).get("dtype", "float32")), metadata


@dataclass
class SetFitPairCommits:
    """The commits of :func:`push_setfit_pair`: the SetFit model's (its ``oid`` is the backbone revision the
    hypernetwork's config pins) and the hypernetwork's."""

    setfit: CommitInfo
    ocd: CommitInfo


def push_setfit_pair(
    ocd: "OCDWrapper",
    setfit_model: Any,
    repo_id: str,
    *,
    setfit_repo_id: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    model_card_kwargs: Mapping[str, Any] | None = None,
    eval_results: list[Any] | None = None,
    results_table: str | None = None,
) -> SetFitPairCommits:
    """Push a SetFit model and the OCD hypernetwork attached to it, so that each loads on its own.

    The SetFit model goes to ``setfit_repo_id`` (default ``f"{repo_id}-setfit"``) with
    ``SetFitModel.push_to_hub``: ``SetFitModel.from_pretrained`` loads it as usual. The hypernetwork's
    config then names that repo as its backbone, at the commit that push created (``base_model_revision``;
    ``base_model_class="SetFitModel"``: converted to a :class:`~ocd_hf.SetFitBackbone` on load), and the
    hypernetwork is pushed to ``repo_id`` (:meth:`OCDWrapper.push_to_hub` with the card arguments), so
    ``OCDWrapper.from_pretrained(repo_id)`` loads exactly the SetFit model it was trained on even after
    the SetFit repo moves on. ``ocd.config`` keeps the pinned backbone. A SetFit model whose target layer
    differs from the hypernetwork's (another fingerprint) is refused before anything is pushed.
    """
    converted = SetFitBackbone.from_setfit(setfit_model)
    name, layer = find_target_linear(converted, ocd.config.target_module)
    if layer_fingerprint(layer) != ocd.config.base_layer_fingerprint:
        raise ValueError(
            f"The SetFit model's {name!r} holds other weights (fingerprint {layer_fingerprint(layer)}) than the layer this "
            f"hypernetwork was made for ({ocd.config.base_layer_fingerprint}): push the SetFit model it was trained on."
        )
    setfit_commit = setfit_model.push_to_hub(
        setfit_repo_id or f"{repo_id}-setfit", private=private, token=token, commit_message="Upload SetFit model (OCD backbone)"
    )
    ocd.config.base_model_name_or_path = setfit_commit.repo_url.repo_id
    ocd.config.base_model_revision = setfit_commit.oid
    ocd.config.base_model_class = SETFIT_MODEL_CLASS
    ocd_commit = ocd.push_to_hub(
        repo_id, private=private, token=token, commit_message=commit_message, model_card_kwargs=model_card_kwargs,
        eval_results=eval_results, results_table=results_table,
    )
    return SetFitPairCommits(setfit=setfit_commit, ocd=ocd_commit)
