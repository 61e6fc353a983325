"""Sharing on the Hugging Face Hub: resolve hypernetwork files, push hypernetworks and delta datasets, pull deltas.

Files resolve local-first and offline-aware, like peft's ``load_peft_weights``: a local directory,
else ``hf_hub_download``, which serves the cache when ``HF_HUB_OFFLINE=1`` (or the Hub is
unreachable) and the Hub otherwise. Client errors become messages that name the repo, the revision
or the file and say what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from datasets import Dataset, load_dataset
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .cards import render_dataset_card
from .deltas import HARVEST_METADATA_NAME, SPLIT, format_deltas, load_deltas, load_harvest_metadata
from .model_card import MODEL_CARD_NAME

if TYPE_CHECKING:
    from .modeling_ocd import OCDWrapper

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def resolve_file(
    path_or_repo: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    repo_type: str = "model",
) -> str:
    """Local path of ``filename`` from a local directory, else from the Hub cache or the Hub.

    Raises ``FileNotFoundError`` for a local directory without the file, and the ``huggingface_hub``
    error (``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``RemoteEntryNotFoundError``,
    ``LocalEntryNotFoundError`` when offline and not cached) with a message saying what is missing.
    """
    local = Path(path_or_repo)
    if local.is_dir():
        if not (local / filename).is_file():
            raise FileNotFoundError(f"{local} has no {filename}; is it a directory written by save_pretrained?")
        return str(local / filename)
    repo_id = str(path_or_repo)
    where = f"{repo_type} repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, token=token, repo_type=repo_type,
            local_files_only=local_files_only, force_download=force_download,
        )
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is neither a local directory nor a valid Hub repo id ('namespace/name'): {error}"
        ) from error
    except RepositoryNotFoundError as error:
        raise RepositoryNotFoundError(
            f"{repo_id!r} is not a local directory, and the Hub ({constants.ENDPOINT}) has no {repo_type} repo of "
            "that name that you can see. Check the name; for a private or gated repo pass token= or log in with "
            "`hf auth login`.",
            response=error.response,
        ) from error
    except RevisionNotFoundError as error:
        raise RevisionNotFoundError(
            f"The {repo_type} repo {repo_id!r} has no revision {revision!r} (branch, tag or commit id). List its "
            f"branches and tags with HfApi().list_repo_refs({repo_id!r}, repo_type={repo_type!r}).",
            response=error.response,
        ) from error
    except RemoteEntryNotFoundError as error:
        raise RemoteEntryNotFoundError(
            f"The {where} has no file {filename!r}. Was it pushed with ocd-hf (OCDWrapper.push_to_hub / "
            "push_deltas_to_hub)?",
            response=error.response,
        ) from error
    except LocalEntryNotFoundError as error:
        raise LocalEntryNotFoundError(
            f"{filename!r} of the {where} is not in the local cache, and the Hub was not asked "
            f"(HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}, local_files_only={local_files_only}) or could not be "
            "reached. Download it once while online, or pass the path of a local directory."
        ) from error


def _prepare_repo(api: HfApi, repo_id: str, repo_type: str, private: bool | None, revision: str | None) -> str:
    """Create the repo (and the ``revision`` branch) if missing; return the full repo id."""
    repo_id = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    return repo_id


def push_hypernetwork_to_hub(
    model: "OCDWrapper",
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    model_card_kwargs: Mapping[str, Any] | None = None,
) -> CommitInfo:
    """Upload ``config.json``, ``model.safetensors`` (the hypernetwork only) and the model card in one commit.

    The repo (and branch ``revision``) is created if missing. A ``README.md`` already on the Hub is
    updated, not replaced: sections written outside the generated block and extra metadata stay.
    ``model_card_kwargs`` are fields of :class:`~ocd_hf.model_card.OCDModelCardData` (``eval_results``,
    ``results_table``, ``training_config``, ``datasets``, ``license``, ...).
    """
    api = HfApi(token=token)
    repo_id = _prepare_repo(api, repo_id, "model", private, revision)
    with tempfile.TemporaryDirectory() as directory:
        try:
            existing_card = api.hf_hub_download(repo_id, MODEL_CARD_NAME, revision=revision)
        except RemoteEntryNotFoundError:
            existing_card = None
        if existing_card is not None:
            shutil.copyfile(existing_card, Path(directory) / MODEL_CARD_NAME)  # save_pretrained updates it
        model.save_pretrained(directory, model_card_kwargs={**(model_card_kwargs or {}), "model_id": repo_id})
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME],
            revision=revision,
            commit_message=commit_message or f"Upload OCD hypernetwork for {model.config.target_module}",
            create_pr=create_pr,
        )


def push_hypernetwork_from_directory(
    model_path: str,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    results_path: str | None = None,
    dataset_id: str | None = None,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
    training_history_path: str | None = None,
) -> CommitInfo:
    """Push the hypernetwork saved in ``model_path`` (for ``ocd-hf push``); its backbone is loaded from the config.

    ``results_path`` (a ``results.json`` of ``ocd_hf.evaluation``) puts the results table in the card
    and, with ``dataset_id``, the OCD rows' metrics in its ``model-index``. The training settings come
    from ``training_history_path``, default ``model_path/training_history.json`` when present.
    """
    from .evaluation import ResultsTable
    from .modeling_ocd import OCDWrapper
    from .model_card import default_task_type, eval_results_from_table
    from .training import HISTORY_NAME

    model = OCDWrapper.from_pretrained(model_path)
    card_kwargs: dict[str, Any] = {}
    if results_path is not None:
        table = ResultsTable.from_json(Path(results_path))
        card_kwargs["results_table"] = table.to_markdown()
        if dataset_id is not None:
            card_kwargs["eval_results"] = eval_results_from_table(
                table, dataset_type=dataset_id, dataset_name=dataset_name or dataset_id, dataset_split=dataset_split,
                task_type=default_task_type(model),
            )
    if dataset_id is not None:
        card_kwargs["datasets"] = [dataset_id]
    history_file = Path(training_history_path or Path(model_path) / HISTORY_NAME)
    if training_history_path is not None or history_file.is_file():
        history = json.loads(history_file.read_text(encoding="utf-8"))
        card_kwargs["training_config"] = {"steps": history.get("global_step"), **history.get("settings", {})}
    return push_hypernetwork_to_hub(
        model, repo_id, revision=revision, private=private, token=token, commit_message=commit_message,
        create_pr=create_pr, model_card_kwargs=card_kwargs,
    )


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
    a ``datasets.Dataset`` with the delta columns plus its harvest ``metadata``. The card and the
    metadata go in a first commit, the rows in a second one (``Dataset.push_to_hub``, which points
    the card's ``configs`` at the parquet files and keeps its text). Read it back with
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
        dataset, card_file = load_deltas(directory), directory / MODEL_CARD_NAME
    card = card_file.read_bytes() if card_file is not None and card_file.is_file() else str(render_dataset_card(metadata)).encode()
    api = HfApi(token=token)
    repo_id = _prepare_repo(api, repo_id, "dataset", private, revision)
    message = commit_message or f"Upload OCD deltas of {metadata.get('target_module')}"
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd(MODEL_CARD_NAME, card),
            CommitOperationAdd(HARVEST_METADATA_NAME, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()),
        ],
        commit_message=f"{message}: card and {HARVEST_METADATA_NAME}",
        repo_type="dataset",
        revision=revision,
    )
    return dataset.push_to_hub(
        repo_id, split=SPLIT, revision=revision, token=token, commit_message=message, max_shard_size=max_shard_size
    )


def load_deltas_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Dataset, dict[str, Any]]:
    """A delta dataset pushed with :func:`push_deltas_to_hub`, and its harvest metadata.

    The dataset is formatted like :func:`ocd_hf.deltas.load_deltas`' (torch tensors, ``delta`` as
    float32 whatever the storage dtype); it comes from the ``datasets`` cache when offline.
    """
    metadata_file = resolve_file(
        repo_id, HARVEST_METADATA_NAME, revision=revision, token=token, cache_dir=cache_dir, repo_type="dataset"
    )
    metadata = json.loads(Path(metadata_file).read_text(encoding="utf-8"))
    dataset = load_dataset(repo_id, split=SPLIT, revision=revision, token=token)
    if len(dataset) != metadata.get("num_samples", len(dataset)):
        raise ValueError(
            f"Dataset repo {repo_id!r} holds {len(dataset)} rows but its {HARVEST_METADATA_NAME} says "
            f"{metadata['num_samples']}: the rows and the metadata come from different pushes. Push them again "
            "together with push_deltas_to_hub."
        )
    return format_deltas(dataset, metadata.get("harvest_config", {}).get("dtype", "float32")), metadata
