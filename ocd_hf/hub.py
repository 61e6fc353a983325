"""Sharing on the Hugging Face Hub: resolve files, push a saved generator or a weight dataset, pull a weight dataset.

Nothing here imports a model or names a method: a generator pushes itself through
:func:`push_saved_directory` with its own ``save_pretrained``, and a method formats the weight
datasets it pulls.

Files resolve local-first and offline-aware, like peft's ``load_peft_weights``: a local directory,
else ``hf_hub_download`` (one file) or ``snapshot_download`` (several files from one commit), which
serve the cache when ``HF_HUB_OFFLINE=1`` (or the Hub is unreachable) and the Hub otherwise. Client errors become messages that name the repo, the revision
or the file and say what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from datasets import Dataset, load_dataset
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .cards import CARD_NAME
from .weight_datasets import HARVEST_METADATA_NAME, SPLIT

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
    with hub_errors(repo_id, filename, revision, repo_type, local_files_only):
        return hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, token=token, repo_type=repo_type,
            local_files_only=local_files_only, force_download=force_download,
        )


def resolve_files(
    path_or_repo: str | os.PathLike,
    filenames: Sequence[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    repo_type: str = "model",
) -> list[str]:
    """Local paths of ``filenames`` (in ``subfolder``), all from the same commit: a local directory, else one
    Hub snapshot.

    On the Hub the revision is resolved once (``huggingface_hub.snapshot_download`` with only these files
    allowed), so a push landing between two downloads cannot pair one commit's config with another's
    weights; offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``) the cached snapshot of the revision is
    used. Errors are those of :func:`resolve_file`: ``FileNotFoundError`` for a local directory without a
    file, and the ``huggingface_hub`` error (``RepositoryNotFoundError``, ``RevisionNotFoundError``,
    ``RemoteEntryNotFoundError`` for a file the commit lacks, ``LocalEntryNotFoundError`` when offline and
    not cached) with a message saying what is missing.
    """
    subfolder = (subfolder or "").strip("/")
    local = Path(path_or_repo)
    if local.is_dir():
        directory = local / subfolder if subfolder else local
        for filename in filenames:
            if not (directory / filename).is_file():
                raise FileNotFoundError(f"{directory} has no {filename}; is it a directory written by save_pretrained?")
        return [str(directory / filename) for filename in filenames]
    repo_id = str(path_or_repo)
    paths_in_repo = [f"{subfolder}/{filename}" if subfolder else filename for filename in filenames]
    hub_kwargs = {"cache_dir": cache_dir, "token": token, "repo_type": repo_type, "local_files_only": local_files_only}
    with hub_errors(repo_id, ", ".join(paths_in_repo), revision, repo_type, local_files_only):
        snapshot = Path(snapshot_download(repo_id, allow_patterns=paths_in_repo, revision=revision, force_download=force_download, **hub_kwargs))
    resolved = []
    for path_in_repo in paths_in_repo:
        path = snapshot / path_in_repo
        if not path.is_file():
            # Not in this commit (or, offline, not cached): let the client raise its own error for the file,
            # at the snapshot's commit, and translate it. Should it find the file after all, use it.
            with hub_errors(repo_id, path_in_repo, revision, repo_type, local_files_only):
                path = Path(hf_hub_download(repo_id, path_in_repo, revision=snapshot.name, **hub_kwargs))
        resolved.append(str(path))
    return resolved


@contextlib.contextmanager
def hub_errors(repo_id: str, filename: str, revision: str | None, repo_type: str, local_files_only: bool) -> Iterator[None]:
    """Re-raise the ``huggingface_hub`` errors of resolving ``filename`` of ``repo_id`` translated by :func:`translate_hub_error`."""
    try:
        yield
    except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError, LocalEntryNotFoundError) as error:
        raise translate_hub_error(error, repo_id, filename, revision, repo_type, local_files_only) from error


def translate_hub_error(
    error: Exception, repo_id: str, filename: str, revision: str | None, repo_type: str, local_files_only: bool
) -> Exception:
    """The ``huggingface_hub`` ``error`` met while resolving ``filename`` of ``repo_id``, with a message naming
    what is missing and what to do (``ValueError`` for an invalid repo id); other errors are returned unchanged."""
    where = f"{repo_type} repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    if isinstance(error, HFValidationError):
        return ValueError(f"{repo_id!r} is neither a local directory nor a valid Hub repo id ('namespace/name'): {error}")
    if isinstance(error, RepositoryNotFoundError):
        return RepositoryNotFoundError(
            f"{repo_id!r} is not a local directory, and the Hub ({constants.ENDPOINT}) has no {repo_type} repo of "
            "that name that you can see. Check the name; for a private or gated repo pass token= or log in with "
            "`hf auth login`.",
            response=error.response,
        )
    if isinstance(error, RevisionNotFoundError):
        return RevisionNotFoundError(
            f"The {repo_type} repo {repo_id!r} has no revision {revision!r} (branch, tag or commit id). List its "
            f"branches and tags with HfApi().list_repo_refs({repo_id!r}, repo_type={repo_type!r}).",
            response=error.response,
        )
    if isinstance(error, RemoteEntryNotFoundError):
        return RemoteEntryNotFoundError(
            f"The {where} has no file {filename!r}. Was it pushed with ocd-hf (the model's push_to_hub, or "
            "push_deltas_to_hub for a weight dataset)?",
            response=error.response,
        )
    if isinstance(error, LocalEntryNotFoundError):
        return LocalEntryNotFoundError(
            f"{filename!r} of the {where} is not in the local cache, and the Hub was not asked "
            f"(HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}, local_files_only={local_files_only}) or could not be "
            "reached. Download it once while online, or pass the path of a local directory."
        )
    return error


def prepare_repo(api: HfApi, repo_id: str, repo_type: str, private: bool | None, revision: str | None) -> str:
    """Create the repo (and the ``revision`` branch) if missing; return the full repo id."""
    repo_id = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    return repo_id


def push_saved_directory(
    save: Callable[[str, str], None],
    repo_id: str,
    *,
    allow_patterns: Sequence[str],
    commit_message: str,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Upload what ``save(directory, repo_id)`` writes (the files matching ``allow_patterns``) in one commit.

    The repo (and branch ``revision``) is created if missing. A ``README.md`` already on the Hub is
    put in the directory first, so a ``save`` that updates cards (:func:`ocd_hf.cards.write_card`)
    keeps the sections written outside the generated block and extra metadata.
    """
    api = HfApi(token=token)
    repo_id = prepare_repo(api, repo_id, "model", private, revision)
    with tempfile.TemporaryDirectory() as directory:
        try:
            existing_card = api.hf_hub_download(repo_id, CARD_NAME, revision=revision)
        except RemoteEntryNotFoundError:
            existing_card = None
        if existing_card is not None:
            shutil.copyfile(existing_card, Path(directory) / CARD_NAME)
        save(directory, repo_id)
        return api.upload_folder(
            repo_id=repo_id, folder_path=directory, allow_patterns=list(allow_patterns), revision=revision,
            commit_message=commit_message, create_pr=create_pr,
        )


def push_weight_dataset(
    dataset: Dataset,
    metadata: Mapping[str, Any],
    card: bytes,
    repo_id: str,
    *,
    commit_message: str,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    max_shard_size: int | str | None = None,
) -> CommitInfo:
    """Push a weight dataset to a Hub dataset repo: the card and ``harvest.json`` in a first commit,
    the rows (parquet, ``Dataset.push_to_hub``, which points the card's ``configs`` at them and keeps
    its text) in a second one. Returns the information of the last commit."""
    api = HfApi(token=token)
    repo_id = prepare_repo(api, repo_id, "dataset", private, revision)
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd(CARD_NAME, card),
            CommitOperationAdd(HARVEST_METADATA_NAME, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()),
        ],
        commit_message=f"{commit_message}: card and {HARVEST_METADATA_NAME}",
        repo_type="dataset",
        revision=revision,
    )
    return dataset.push_to_hub(
        repo_id, split=SPLIT, revision=revision, token=token, commit_message=commit_message, max_shard_size=max_shard_size
    )


def load_weight_dataset_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Dataset, dict[str, Any]]:
    """The rows (as stored) and the ``harvest.json`` metadata of a weight dataset pushed with
    :func:`push_weight_dataset`; from the ``datasets`` cache when offline."""
    metadata_file = resolve_file(
        repo_id, HARVEST_METADATA_NAME, revision=revision, token=token, cache_dir=cache_dir, repo_type="dataset"
    )
    metadata = json.loads(Path(metadata_file).read_text(encoding="utf-8"))
    dataset = load_dataset(repo_id, split=SPLIT, revision=revision, token=token)
    if len(dataset) != metadata.get("num_samples", len(dataset)):
        raise ValueError(
            f"Dataset repo {repo_id!r} holds {len(dataset)} rows but its {HARVEST_METADATA_NAME} says "
            f"{metadata['num_samples']}: the rows and the metadata come from different pushes. Push them again "
            "together."
        )
    return dataset, metadata
