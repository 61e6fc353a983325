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

import pyarrow.parquet as pq
from datasets import Dataset, DatasetInfo, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from datasets.utils.py_utils import convert_file_size_to_int
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    DatasetCard,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

try:  # the HTTP client of huggingface_hub: httpx2 from huggingface_hub 2, httpx before
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import TransportError

from .cards import CARD_NAME
from .weight_datasets import HARVEST_METADATA_NAME, SPLIT, file_sha256

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


def snapshot_revision(resolved: str | os.PathLike, path_in_repo: str) -> str | None:
    """The commit of a file :func:`resolve_files` took from the Hub cache (``.../snapshots/<commit>/<path_in_repo>``), so
    that more files can be resolved from the same commit; ``None`` for a file of a local directory."""
    snapshot = Path(resolved).parents[len(Path(path_in_repo).parts) - 1]
    return snapshot.name if snapshot.parent.name == "snapshots" else None


@contextlib.contextmanager
def hub_errors(repo_id: str, filename: str, revision: str | None, repo_type: str, local_files_only: bool) -> Iterator[None]:
    """Re-raise the ``huggingface_hub`` errors of resolving ``filename`` of ``repo_id`` translated by :func:`translate_hub_error`."""
    try:
        yield
    except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError, LocalEntryNotFoundError) as error:
        raise translate_hub_error(error, repo_id, filename, revision, repo_type, local_files_only) from error
    except TransportError as error:
        raise unreachable_hub_error(error) from error


def unreachable_hub_error(error: Exception) -> ConnectionError:
    """A ``ConnectionError`` for a Hub that could not be reached, naming its URL (``HF_ENDPOINT``) and the fixes."""
    return ConnectionError(
        f"Could not reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: {error}). Check HF_ENDPOINT (unset it for "
        "https://huggingface.co) and the network, or set HF_HUB_OFFLINE=1 to use only files already in the cache."
    )


@contextlib.contextmanager
def hub_connection() -> Iterator[None]:
    """Re-raise a failed connection to the Hub as :func:`unreachable_hub_error` (for pushes)."""
    try:
        yield
    except TransportError as error:
        raise unreachable_hub_error(error) from error


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
            f"{filename!r} of the {where} is not in the local cache, and the Hub at {constants.ENDPOINT} was not asked "
            f"(HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}, local_files_only={local_files_only}) or could not be "
            "reached. Check HF_ENDPOINT and the network and download it once while online, or pass the path of a "
            "local directory."
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
    with hub_connection(), tempfile.TemporaryDirectory() as directory:
        repo_id = prepare_repo(api, repo_id, "model", private, revision)
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


HUB_SHARDS_KEY = "hub_shards"
HUB_DATA_FILES = f"data/{SPLIT}-*"
DEFAULT_MAX_SHARD_SIZE = "500MB"


def _weight_dataset_card(card: bytes, dataset: Dataset, parquet_files: Sequence[Path]) -> bytes:
    """``card`` with its YAML pointing ``load_dataset`` at the parquet files on the Hub, and the ``dataset_info``
    (features, split size) that ``Dataset.push_to_hub`` would write."""
    parsed = DatasetCard(card.decode("utf-8"))
    parsed.data.configs = [{"config_name": "default", "data_files": [{"split": SPLIT, "path": HUB_DATA_FILES}]}]
    num_bytes = dataset.data.nbytes
    info = DatasetInfo(
        features=dataset.features, splits=SplitDict({SPLIT: SplitInfo(SPLIT, num_bytes=num_bytes, num_examples=len(dataset))}),
        download_size=sum(path.stat().st_size for path in parquet_files), dataset_size=num_bytes,
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(parsed.data)
    return str(parsed).encode("utf-8")


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
    """Push a weight dataset to a Hub dataset repo in one commit: its rows (parquet shards of at most
    ``max_shard_size``, default 500MB, readable with ``datasets.load_dataset(repo_id, split="train")``), the
    card (its YAML pointing at them) and ``harvest.json`` with the row count and sha256 of every parquet
    file (``hub_shards``). Data files of an earlier push that this one does not rewrite are deleted in the
    same commit, which is made on top of the revision's head as it was read: a push landing in between
    makes this one fail rather than mix. A failure before the commit leaves the repo as it was.

    (Written with ``Dataset.to_parquet`` and ``HfApi.create_commit`` rather than ``Dataset.push_to_hub``,
    which commits only rows and card: the metadata would need a second commit.)
    """
    api = HfApi(token=token)
    num_shards = int(dataset.data.nbytes / convert_file_size_to_int(max_shard_size or DEFAULT_MAX_SHARD_SIZE)) + 1
    with hub_connection(), tempfile.TemporaryDirectory() as directory:
        repo_id = prepare_repo(api, repo_id, "dataset", private, revision)
        head = api.dataset_info(repo_id, revision=revision).sha
        previous = [name for name in api.list_repo_files(repo_id, repo_type="dataset", revision=head) if name.startswith("data/")]
        files, records = [], []
        for index in range(num_shards):
            name = f"data/{SPLIT}-{index:05d}-of-{num_shards:05d}.parquet"
            path = Path(directory) / name
            path.parent.mkdir(exist_ok=True)
            shard = dataset.shard(num_shards, index, contiguous=True)
            shard.to_parquet(str(path))
            files.append(path)
            records.append({"file": name, "num_rows": len(shard), "num_bytes": path.stat().st_size, "sha256": file_sha256(path)})
        pushed_metadata = {**metadata, HUB_SHARDS_KEY: records}
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(record["file"], str(path)) for record, path in zip(records, files)
        ]
        operations += [CommitOperationDelete(name) for name in previous if name not in {record["file"] for record in records}]
        operations += [
            CommitOperationAdd(CARD_NAME, _weight_dataset_card(card, dataset, files)),
            CommitOperationAdd(HARVEST_METADATA_NAME, (json.dumps(pushed_metadata, indent=2, sort_keys=True) + "\n").encode()),
        ]
        return api.create_commit(
            repo_id, operations=operations, commit_message=commit_message, repo_type="dataset", revision=revision,
            parent_commit=head,
        )


def load_weight_dataset_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    verify: bool = False,
) -> tuple[Dataset, dict[str, Any]]:
    """The rows (as stored) and the ``harvest.json`` metadata of a weight dataset pushed with
    :func:`push_weight_dataset`, all from one commit: the revision is resolved once
    (``snapshot_download``) and every file is read from that commit's snapshot (the cached one when offline).

    The row count of every parquet file is checked against the metadata's record of the push (and its
    sha256 with ``verify=True``); ``ValueError`` names the file.
    """
    with hub_errors(repo_id, HARVEST_METADATA_NAME, revision, "dataset", False):
        snapshot = Path(snapshot_download(
            repo_id, repo_type="dataset", revision=revision, token=token, cache_dir=cache_dir,
            allow_patterns=[HARVEST_METADATA_NAME, f"data/{SPLIT}-*.parquet"],
        ))
    metadata_file = snapshot / HARVEST_METADATA_NAME
    if not metadata_file.is_file():
        raise FileNotFoundError(
            f"The dataset repo {repo_id!r} (commit {snapshot.name}) has no {HARVEST_METADATA_NAME}: it is not a weight dataset "
            "pushed with ocd-hf (push_deltas_to_hub)."
        )
    metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    records = metadata.pop(HUB_SHARDS_KEY, None)
    files = sorted(snapshot.glob(f"data/{SPLIT}-*.parquet"))
    if records is not None:
        _check_hub_shards(repo_id, snapshot, files, records, verify)
    dataset = Dataset.from_parquet([str(path) for path in files], cache_dir=str(cache_dir) if cache_dir else None)
    if len(dataset) != metadata.get("num_samples", len(dataset)):
        raise ValueError(
            f"Dataset repo {repo_id!r} holds {len(dataset)} rows but its {HARVEST_METADATA_NAME} says "
            f"{metadata['num_samples']}: the rows and the metadata come from different pushes. Push them again "
            "together."
        )
    return dataset, metadata


def _check_hub_shards(repo_id: str, snapshot: Path, files: Sequence[Path], records: Sequence[Mapping[str, Any]], verify: bool) -> None:
    """Refuse parquet files that are not those the metadata's push recorded (other names, row counts or sha256)."""
    found = sorted(path.relative_to(snapshot).as_posix() for path in files)
    expected = sorted(record["file"] for record in records)
    if found != expected:
        raise ValueError(
            f"Dataset repo {repo_id!r} (commit {snapshot.name}) holds the data files {found}, but its {HARVEST_METADATA_NAME} "
            f"was pushed with {expected}: the rows and the metadata come from different pushes. Push them again together."
        )
    for record in records:
        path = snapshot / record["file"]
        num_rows = pq.ParquetFile(path).metadata.num_rows
        if num_rows != record["num_rows"] or (verify and file_sha256(path) != record["sha256"]):
            raise ValueError(
                f"{record['file']} of dataset repo {repo_id!r} (commit {snapshot.name}) is not the file pushed with its "
                f"{HARVEST_METADATA_NAME} ({num_rows} rows, {record['num_rows']} recorded{', or another sha256' if verify else ''}). "
                "Download it again (force_download) or push the dataset again."
            )
