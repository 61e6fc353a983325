"""Tests of the loopback Hub server (tests/hub_server.py) with the real huggingface_hub and datasets clients."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest_hub import _refuse_non_loopback
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
    upload_file,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

BINARY = bytes(range(256)) * 64  # has NUL bytes: uploaded through LFS


@pytest.fixture
def api(loopback_hub) -> HfApi:
    return HfApi()  # endpoint and token come from the patched environment


@pytest.fixture
def model(api: HfApi) -> str:
    return api.create_repo("model").repo_id


def test_non_loopback_hosts_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = _refuse_non_loopback(monkeypatch)
    with pytest.raises(OSError):
        socket.create_connection(("hub.invalid", 443), timeout=1)
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(1)
        sock.connect(("192.0.2.1", 443))
    assert refused == ["hub.invalid", ("192.0.2.1", 443)]


def test_whoami_and_create_repo(loopback_hub, api: HfApi) -> None:
    assert api.whoami()["name"] == loopback_hub.user
    model_url = api.create_repo("m")
    dataset_url = api.create_repo("org/d", repo_type="dataset", private=True)
    assert (model_url.repo_id, model_url.repo_type) == (f"{loopback_hub.user}/m", "model")
    assert str(dataset_url) == f"{loopback_hub.endpoint}/datasets/org/d"
    assert api.dataset_info("org/d").private is True
    assert len(api.model_info(model_url.repo_id).sha) == 40
    assert api.list_repo_files("org/d", repo_type="dataset") == []
    assert not api.repo_exists("org/d")  # a model of that name does not exist
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("m")
    assert exc.value.response.status_code == 409
    assert api.create_repo("m", exist_ok=True).repo_id == model_url.repo_id


def test_upload_file_and_download_revisions(loopback_hub, api: HfApi, model: str) -> None:
    first = upload_file(path_or_fileobj=b"v1", path_in_repo="notes.txt", repo_id=model)  # module-level function
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="notes.txt", repo_id=model)
    api.upload_file(path_or_fileobj=BINARY, path_in_repo="weights.bin", repo_id=model)

    assert Path(hf_hub_download(model, "notes.txt")).read_bytes() == b"v2"
    assert Path(hf_hub_download(model, "notes.txt", revision=first.oid)).read_bytes() == b"v1"
    assert Path(hf_hub_download(model, "weights.bin")).read_bytes() == BINARY
    assert hf_hub_download(model, "notes.txt").startswith(str(loopback_hub.cache_dir))

    sha256 = hashlib.sha256(BINARY).hexdigest()
    (weights,) = api.get_paths_info(model, ["weights.bin"])
    assert weights.lfs is not None and (weights.lfs.sha256, weights.lfs.size) == (sha256, len(BINARY))
    assert loopback_hub.server.blob(sha256).read_bytes() == BINARY  # stored content-addressed
    assert api.model_info(model, revision=first.oid).sha == first.oid


def test_upload_folder_tree_and_snapshot(api: HfApi, model: str, tmp_path: Path) -> None:
    files = {"config.json": b'{"a": 1}', "sub/deep/w.safetensors": BINARY, "sub/readme.txt": b"hi"}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    api.upload_folder(folder_path=tmp_path, repo_id=model)

    assert api.list_repo_files(model) == sorted(files)
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(model)}
    assert top == {"config.json": "RepoFile", "sub": "RepoFolder"}
    assert [entry.path for entry in api.list_repo_tree(model, "sub")] == ["sub/deep", "sub/readme.txt"]
    assert [type(info).__name__ for info in api.get_paths_info(model, ["sub", "missing", "config.json"])] == [
        "RepoFolder", "RepoFile"]
    snapshot = Path(snapshot_download(model))
    assert {name: (snapshot / name).read_bytes() for name in files} == files
    assert api.file_exists(model, "sub/readme.txt") and not api.file_exists(model, "readme.txt")


def test_tree_is_paginated(loopback_hub, api: HfApi, model: str) -> None:
    loopback_hub.server.page_size = 2
    names = [f"f{i}.txt" for i in range(5)]
    api.create_commit(model, [CommitOperationAdd(name, name.encode()) for name in names], commit_message="five")
    assert api.list_repo_files(model) == names


def test_create_commit_operations_and_pull_request(api: HfApi, model: str) -> None:
    api.create_commit(model, commit_message="add", operations=[
        CommitOperationAdd("a.txt", b"a"), CommitOperationAdd("dir/x.txt", b"x"),
        CommitOperationAdd("dir/y.bin", BINARY), CommitOperationAdd("gone.txt", b"g")])
    api.create_commit(model, commit_message="change", operations=[
        CommitOperationCopy("a.txt", "copy.txt"), CommitOperationCopy("dir/y.bin", "y_copy.bin"),
        CommitOperationDelete("gone.txt"), CommitOperationDelete("dir/", is_folder=True)])
    assert api.list_repo_files(model) == ["a.txt", "copy.txt", "y_copy.bin"]
    assert Path(hf_hub_download(model, "y_copy.bin")).read_bytes() == BINARY

    pr = api.create_commit(model, [CommitOperationAdd("a.txt", b"proposal")], commit_message="pr", create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert Path(hf_hub_download(model, "a.txt", revision=pr.pr_revision)).read_bytes() == b"proposal"
    assert Path(hf_hub_download(model, "a.txt")).read_bytes() == b"a"

    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("never-there.txt", model)


def test_branches(api: HfApi, model: str) -> None:
    api.upload_file(path_or_fileobj=b"main", path_in_repo="f.txt", repo_id=model)
    api.create_branch(model, branch="dev")
    api.create_branch(model, branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="only-dev.txt", repo_id=model, revision="dev")
    assert api.list_repo_files(model, revision="dev") == ["f.txt", "only-dev.txt"]
    assert api.list_repo_files(model) == ["f.txt"]
    assert api.file_exists(model, "only-dev.txt", revision="dev")
    assert not api.file_exists(model, "only-dev.txt")


def test_missing_repo_revision_and_file_errors(api: HfApi, model: str) -> None:
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=model)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/nope", "x.txt")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/nope")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files("user/nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(model, "x.txt", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(model, revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="y.txt", repo_id=model, revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(model, "missing.txt")
    with pytest.raises(EntryNotFoundError):
        api.list_repo_tree(model, "missing-dir").__next__()
    assert not api.file_exists("user/nope", "x.txt")
    assert not api.file_exists(model, "x.txt", revision="nope")
    assert not api.revision_exists(model, "nope")


def test_parent_commit_and_lfs_content_are_checked(loopback_hub, api: HfApi, model: str) -> None:
    stale = api.model_info(model).sha
    api.upload_file(path_or_fileobj=b"1", path_in_repo="f.txt", repo_id=model)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit(model, [CommitOperationAdd("f.txt", b"2")], commit_message="late", parent_commit=stale)
    assert exc.value.response.status_code == 412
    response = get_session().put(f"{loopback_hub.endpoint}/lfs-upload/{hashlib.sha256(b'a').hexdigest()}", content=b"b")
    assert response.status_code == 400


def test_hf_file_system_range_reads(api: HfApi, model: str) -> None:
    api.upload_file(path_or_fileobj=BINARY, path_in_repo="w.bin", repo_id=model)
    with HfFileSystem().open(f"{model}/w.bin", "rb", block_size=16) as file:
        file.seek(1000)
        assert file.read(20) == BINARY[1000:1020]
    assert HfFileSystem().cat_file(f"{model}/w.bin", start=-10) == BINARY[-10:]


def test_dataset_push_to_hub_and_load_dataset_round_trip(loopback_hub) -> None:
    rng = np.random.default_rng(0)
    matrices = rng.standard_normal((6, 3, 4)).astype(np.float32)
    matrices[0, 0, :3] = [np.nan, -0.0, np.float32(1e-42)]  # bit patterns a lossy path would change
    features = datasets.Features({"x": datasets.Array2D((3, 4), "float32"), "name": datasets.Value("string")})
    original = datasets.Dataset.from_dict({"x": matrices, "name": [f"r{i}" for i in range(6)]}, features=features)

    original.push_to_hub("user/ds")
    loaded = datasets.load_dataset("user/ds", split="train")

    assert loaded.features == features
    assert loaded["name"][:] == original["name"][:]
    assert np.asarray(loaded.with_format("numpy")["x"][:]).tobytes() == matrices.tobytes()
    assert any(path.endswith(".parquet") for path in HfApi().list_repo_files("user/ds", repo_type="dataset"))


_OFFLINE_SCRIPT = """
import json, sys
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
assert constants.HF_HUB_OFFLINE
repo = sys.argv[1]
try:
    hf_hub_download(repo, "other.txt")
    sys.exit("a file that was never downloaded was found")
except LocalEntryNotFoundError:
    pass
snapshot = snapshot_download(repo, allow_patterns=["w.bin"])
print(json.dumps({"file": open(hf_hub_download(repo, "w.bin"), "rb").read().hex(), "snapshot": snapshot}))
"""


def test_offline_redownload_from_cache_after_stop(loopback_hub, api: HfApi, model: str) -> None:
    api.upload_file(path_or_fileobj=BINARY, path_in_repo="w.bin", repo_id=model)
    api.upload_file(path_or_fileobj=b"never downloaded", path_in_repo="other.txt", repo_id=model)
    cached = hf_hub_download(model, "w.bin")
    snapshot = snapshot_download(model, allow_patterns=["w.bin"])
    loopback_hub.stop()

    with pytest.raises(Exception) as refused:  # httpx2 from huggingface_hub 2.0, httpx before
        get_session().head(loopback_hub.endpoint)
    assert type(refused.value).__name__ == "ConnectError"
    assert hf_hub_download(model, "w.bin") == cached  # connection refused: falls back to the cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, model], env=env, capture_output=True,
                            text=True, timeout=60, check=True)
    output = json.loads(result.stdout.splitlines()[-1])
    assert bytes.fromhex(output["file"]) == BINARY
    assert output["snapshot"] == snapshot
