"""A loopback stand-in for the Hugging Face Hub HTTP API, for tests (stdlib only).

It speaks the subset of the Hub API that the real ``huggingface_hub`` client (``HfApi``, ``hf_hub_download``,
``snapshot_download``, ``HfFileSystem``) and ``datasets`` (``push_to_hub`` / ``load_dataset``) use to push and
pull model and dataset repos. Clients must run with ``HF_HUB_DISABLE_XET=1``: uploads go through the Git LFS
batch protocol, whose upload URL this server also serves.

Storage under ``root``::

    objects/<sha256>                              file contents, content-addressed (LFS and regular files)
    repos/<models|datasets>/<namespace>/<name>.json   refs and commits; a commit maps each path to its blob

Errors carry the ``X-Error-Code`` header from which ``huggingface_hub.utils.hf_raise_for_status`` builds
``RepositoryNotFoundError`` ("RepoNotFound"), ``RevisionNotFoundError`` ("RevisionNotFound") and
``RemoteEntryNotFoundError`` ("EntryNotFound").
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socketserver
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

REPO_TYPES = {"model": "models", "dataset": "datasets"}  # client repo_type -> URL/storage kind
URL_PREFIX = {"models": "", "datasets": "datasets/"}
# Like the Hub (default .gitattributes, 10 MB limit, no binary blobs in git), these go to LFS.
LFS_SUFFIXES = (".bin", ".safetensors", ".parquet", ".arrow", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                ".npy", ".npz", ".gguf", ".zip", ".gz", ".tar")
LFS_MIN_SIZE = 10 * 1024 * 1024

_API = r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+(?:/[^/]+)?)"
_WEB = r"/(?:(?P<kind>datasets)/)?(?P<repo>[^/]+(?:/[^/]+)?)"
ROUTES = [(methods, re.compile(pattern), name) for methods, pattern, name in [
    (("GET",), r"/api/whoami-v2", "whoami"),
    (("POST",), r"/api/validate-yaml", "validate_yaml"),
    (("POST",), r"/api/repos/create", "create_repo"),
    (("GET",), _API + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    (("GET",), _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    (("POST",), _API + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
    (("POST",), _API + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    (("POST",), _API + r"/commit/(?P<rev>[^/]+)", "commit"),
    (("POST",), _API + r"/branch/(?P<branch>[^/]+)", "create_branch"),
    (("POST",), _WEB + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    (("PUT",), r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    (("GET", "HEAD"), _WEB + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]]


class HubError(Exception):
    """An API error, sent as ``{"error": message}`` with ``X-Error-Code``/``X-Error-Message`` headers."""

    def __init__(self, status: int, message: str, code: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    """Git blob id of ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _file_entry(sha256: str, size: int, lfs: bool, data: bytes = b"") -> dict[str, Any]:
    """A commit's record of one file; ``oid`` is the git blob id (of the pointer file, for LFS files)."""
    return {"sha256": sha256, "size": size, "lfs": lfs, "oid": _git_oid(_lfs_pointer(sha256, size) if lfs else data)}


def _file_info(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    """``tree``/``paths-info`` item for a file (see ``huggingface_hub.hf_api.RepoFile``)."""
    info = {"type": "file", "path": path, "oid": entry["oid"], "size": entry["size"]}
    if entry["lfs"]:
        pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
        info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return info


def _folder_info(path: str, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``tree``/``paths-info`` item for a folder; its oid hashes the files below it."""
    below = sorted((p, e["oid"]) for p, e in files.items() if p.startswith(path + "/"))
    return {"type": "directory", "path": path, "oid": hashlib.sha1(json.dumps(below).encode()).hexdigest(), "size": 0}


def _tree(files: dict[str, dict[str, Any]], base: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries below folder ``base`` ("" is the root), sorted by path; folders listed like the Hub does."""
    prefix = base + "/" if base else ""
    out: dict[str, dict[str, Any]] = {}
    for path, entry in files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        folders = [prefix + "/".join(parts[:i]) for i in range(1, len(parts))]
        for folder in folders if recursive else folders[:1]:
            out.setdefault(folder, _folder_info(folder, files))
        if recursive or len(parts) == 1:
            out[path] = _file_info(path, entry)
    if base and not out:
        raise HubError(404, f"{base} does not exist", "EntryNotFound")
    return [out[path] for path in sorted(out)]


def _resolve(state: dict[str, Any], rev: str) -> str:
    """Commit id of branch or commit ``rev``."""
    oid = state["refs"].get(rev, rev)
    if oid not in state["commits"]:
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
    return oid


def _add_commit(state: dict[str, Any], branch: str, files: dict[str, Any], title: str) -> str:
    """Record a commit of ``files`` on top of ``branch`` and move the branch to it."""
    parent = state["refs"].get(branch)
    oid = hashlib.sha1(json.dumps([parent, title, time.time_ns(), files], sort_keys=True).encode()).hexdigest()
    state["commits"][oid] = {"parent": parent, "title": title, "date": _now(), "files": files}
    state["refs"][branch] = oid
    return oid


class LoopbackHub:
    """Hub server on 127.0.0.1 (free port) serving from ``root``, in a daemon thread.

    ``start()`` returns the endpoint (``http://127.0.0.1:PORT``), ``stop()`` shuts it down; also a context
    manager. ``user`` is the namespace of repos created without one (and ``whoami``'s name). All state is
    on disk under ``root``; ``page_size`` may be lowered to exercise the client's ``tree`` pagination.
    """

    page_size = 1000  # entries per `tree` page, as on the Hub

    def __init__(self, root: Path, user: str = "user") -> None:
        self.root, self.user = Path(root), user
        self.endpoint = ""
        self.lock = threading.Lock()  # serializes repo mutations
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        # A short poll interval makes `shutdown()` (hence `stop()`) return quickly.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> LoopbackHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def web_url(self, kind: str, repo: str) -> str:
        return f"{self.endpoint}/{URL_PREFIX[kind]}{repo}"

    def blob(self, sha256: str) -> Path:
        """Where the content with this sha256 is (or would be) stored."""
        return self.root / "objects" / sha256

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 (atomically) and return that sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        self._write(self.blob(sha256), data)
        return sha256

    def repo_state(self, kind: str, repo: str) -> Path:
        """JSON file holding the refs and commits of ``repo`` (``kind`` is "models" or "datasets")."""
        return self.root / "repos" / kind / f"{repo}.json"

    def load(self, kind: str, repo: str) -> dict[str, Any]:
        """State (``private``, ``createdAt``, ``refs``, ``commits``) of ``repo``; 404 RepoNotFound if absent."""
        if "/" not in repo or not self.repo_state(kind, repo).is_file():
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        return json.loads(self.repo_state(kind, repo).read_text())

    def save(self, kind: str, repo: str, state: dict[str, Any]) -> None:
        self._write(self.repo_state(kind, repo), json.dumps(state).encode())

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # clients upload/download with several threads
    hub: LoopbackHub

    def server_bind(self) -> None:
        """Bind without ``HTTPServer``'s reverse DNS lookup (``getfqdn``) of the host."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    """Routes each request (see ``ROUTES``) to the method of the same name."""

    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def _dispatch(self) -> None:
        self.hub = self.server.hub
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", ""):
                raise HubError(411, "Chunked request bodies are not supported, send a Content-Length")
            self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            for methods, pattern, name in ROUTES:
                match = pattern.fullmatch(url.path)
                if match and self.command in methods:
                    args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    if "repo" in args:
                        args.setdefault("kind", "models")
                    return getattr(self, name)(**args)
            raise HubError(404, f"No route for {self.command} {url.path}")
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message}, err.status, headers)
        except Exception as err:  # a server bug: report it to the client rather than dropping the connection
            self._json({"error": f"{type(err).__name__}: {err}"}, 500)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _files(self, kind: str, repo: str, rev: str) -> tuple[str, dict[str, dict[str, Any]]]:
        """Commit id and files of ``rev`` in ``repo``."""
        state = self.hub.load(kind, repo)
        oid = _resolve(state, rev)
        return oid, state["commits"][oid]["files"]

    # ---- endpoints -------------------------------------------------------------------------------------

    def whoami(self) -> None:
        """``GET /api/whoami-v2``: any bearer token is valid and belongs to ``hub.user``."""
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")
        token = {"displayName": "loopback", "role": "write"}
        self._json({"type": "user", "name": self.hub.user, "fullname": self.hub.user, "orgs": [],
                    "auth": {"type": "access_token", "accessToken": token}})

    def validate_yaml(self) -> None:
        """``POST /api/validate-yaml`` (README metadata): everything is valid."""
        self._json({"errors": [], "warnings": []})

    def create_repo(self) -> None:
        """``POST /api/repos/create``: an empty repo whose ``main`` is an initial commit with no files."""
        payload = json.loads(self.body)
        kind = REPO_TYPES.get(payload.get("type") or "model")
        if kind is None:
            raise HubError(400, f"Unsupported repo type {payload['type']}")
        repo = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        with self.hub.lock:
            if self.hub.repo_state(kind, repo).is_file():  # the client reads `url` when exist_ok=True
                error = f"You already created this {payload.get('type') or 'model'} repo"
                return self._json({"error": error, "url": self.hub.web_url(kind, repo)}, 409)
            private = payload.get("visibility") == "private" or payload.get("private") is True  # huggingface_hub 2.x / 1.x
            state = {"private": private, "createdAt": _now(), "refs": {}, "commits": {}}
            _add_commit(state, "main", {}, "initial commit")
            self.hub.save(kind, repo, state)
        self._json({"url": self.hub.web_url(kind, repo), "name": repo, "id": repo})

    def repo_info(self, kind: str, repo: str, rev: str = "main") -> None:
        """``GET /api/{kind}/{repo}[/revision/{rev}]``: model/dataset info with ``sha`` and ``siblings``."""
        state = self.hub.load(kind, repo)
        oid = _resolve(state, rev)
        commit = state["commits"][oid]
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
            if entry["lfs"]:
                lfs = _file_info(path, entry)["lfs"]
                sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        self._json({"id": repo, "author": repo.split("/")[0], "sha": oid, "private": state["private"],
                    "gated": False, "disabled": False, "tags": [], "createdAt": state["createdAt"],
                    "lastModified": commit["date"], "siblings": siblings})

    def tree(self, kind: str, repo: str, rev: str, path: str = "") -> None:
        """``GET /api/{kind}/{repo}/tree/{rev}[/{path}]``, paginated with a ``Link: <...>; rel="next"`` header."""
        _, files = self._files(kind, repo, rev)
        entries = _tree(files, path.strip("/"), self.query.get("recursive", "").lower() in ("1", "true"))
        start = int(self.query.get("cursor", 0))
        end = start + self.hub.page_size
        headers = {}
        if end < len(entries):
            next_url = f"{self.hub.endpoint}{urlsplit(self.path).path}?{urlencode({**self.query, 'cursor': end})}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(entries[start:end], headers=headers)

    def paths_info(self, kind: str, repo: str, rev: str) -> None:
        """``POST /api/{kind}/{repo}/paths-info/{rev}`` (form ``paths=...``): info on the paths that exist."""
        _, files = self._files(kind, repo, rev)
        out = []
        for path in parse_qs(self.body.decode()).get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(_file_info(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append(_folder_info(path, files))
        self._json(out)

    def preupload(self, kind: str, repo: str, rev: str) -> None:
        """``POST /api/{kind}/{repo}/preupload/{rev}``: upload mode per file, and the oid already in the repo."""
        _, files = self._files(kind, repo, rev)
        out = []
        for item in json.loads(self.body)["files"]:
            path, sample = item["path"], base64.b64decode(item["sample"])
            lfs = item["size"] >= LFS_MIN_SIZE or path.endswith(LFS_SUFFIXES) or b"\0" in sample
            entry = files.get(path)
            remote_oid = None if entry is None else entry["sha256"] if entry["lfs"] else entry["oid"]
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": remote_oid})
        self._json({"files": out})

    def lfs_batch(self, kind: str, repo: str) -> None:
        """``POST /{repo}.git/info/lfs/objects/batch`` (upload): a PUT url for each object not stored yet."""
        self.hub.load(kind, repo)
        objects = []
        for obj in json.loads(self.body)["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.hub.blob(obj["oid"]).is_file():
                item["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(item)
        self._json({"transfer": "basic", "objects": objects})

    def lfs_upload(self, oid: str) -> None:
        """``PUT /lfs-upload/{sha256}``: store an LFS object; its content must hash to the url's sha256."""
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match sha256 {oid}")
        self.hub.put_blob(self.body)
        self._send(200, b"", {})

    def commit(self, kind: str, repo: str, rev: str) -> None:
        """``POST /api/{kind}/{repo}/commit/{branch}[?create_pr=1]``: NDJSON header + file operations."""
        header, *operations = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        with self.hub.lock:
            state = self.hub.load(kind, repo)
            if rev not in state["refs"]:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = state["refs"][rev]
            if header["value"].get("parentCommit", head) != head:
                raise HubError(412, f"Parent commit is not the head of {rev} ({head})")
            files = dict(state["commits"][head]["files"])
            for operation in operations:
                key, value = operation["key"], operation["value"]
                path = value["path"].strip("/")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[path] = _file_entry(self.hub.put_blob(data), len(data), False, data)
                elif key == "lfsFile":
                    if not self.hub.blob(value["oid"]).is_file():
                        raise HubError(400, f"LFS object {value['oid']} of {path} was not uploaded")
                    files[path] = _file_entry(value["oid"], self.hub.blob(value["oid"]).stat().st_size, True)
                elif key in ("deletedFile", "deletedFolder"):
                    doomed = [p for p in files if p == path or (key == "deletedFolder" and p.startswith(path + "/"))]
                    if not doomed:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unsupported commit operation {key}")
            branch, pr_url = rev, None
            if self.query.get("create_pr") == "1":
                number = 1 + sum(ref.startswith("refs/pr/") for ref in state["refs"])
                branch, pr_url = f"refs/pr/{number}", f"{self.hub.web_url(kind, repo)}/discussions/{number}"
                state["refs"][branch] = head
            oid = _add_commit(state, branch, files, header["value"]["summary"])
            self.hub.save(kind, repo, state)
        self._json({"success": True, "commitOid": oid, "commitUrl": f"{self.hub.web_url(kind, repo)}/commit/{oid}",
                    "pullRequestUrl": pr_url})

    def create_branch(self, kind: str, repo: str, branch: str) -> None:
        """``POST /api/{kind}/{repo}/branch/{branch}`` (JSON ``startingPoint``, default ``main``); 409 if it exists."""
        with self.hub.lock:
            state = self.hub.load(kind, repo)
            if branch in state["refs"]:
                raise HubError(409, f"Reference {branch} already exists")
            state["refs"][branch] = _resolve(state, json.loads(self.body or b"{}").get("startingPoint") or "main")
            self.hub.save(kind, repo, state)
        self._json({})

    def resolve(self, kind: str, repo: str, rev: str, path: str) -> None:
        """``GET|HEAD /[datasets/]{repo}/resolve/{rev}/{path}``: file content (``Range`` supported) + Hub headers."""
        oid, files = self._files(kind, repo, rev)
        entry = files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
        size, etag = entry["size"], f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'
        headers = {"X-Repo-Commit": oid, "ETag": etag, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(size)})
        status, start, end = 200, 0, size - 1
        range_match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if range_match:
            start, end = int(range_match[1]), min(int(range_match[2] or size - 1), size - 1)
            if start >= size:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"
        with self.hub.blob(entry["sha256"]).open("rb") as blob:
            blob.seek(start)
            self._send(status, blob.read(end - start + 1), headers)
