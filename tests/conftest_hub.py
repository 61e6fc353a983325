"""Pytest fixture ``loopback_hub``: a ``LoopbackHub`` server that the already-imported clients talk to.

Enable it from ``tests/conftest.py`` with ``from conftest_hub import loopback_hub  # noqa: F401`` (``tests/`` is
on pytest's ``pythonpath``).

The fixture is function-scoped: every test gets an empty Hub on a new port, a new ``HF_HOME`` (so a new
download cache), and the settings below, all undone at teardown. ``huggingface_hub`` and ``datasets`` read
their environment variables once, at import, so besides setting the variables (for subprocesses) the fixture
patches the module-level copies that the clients consult at call time.

While it runs, resolving or connecting to any host but the loopback one is refused (the client sees a
connection error) and fails the test at teardown, even if the client swallowed the error.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hub_server import LoopbackHub
from huggingface_hub import HfFileSystem, constants, hf_api

TOKEN = "hf_loopback_dummy_token"
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


@dataclass
class HubEnv:
    """What a test needs to know about the running hub; ``server`` gives access to its storage."""

    endpoint: str
    token: str
    cache_dir: Path  # huggingface_hub download cache (HF_HUB_CACHE)
    hf_home: Path
    server: LoopbackHub

    @property
    def user(self) -> str:
        """Namespace of repos created without one."""
        return self.server.user

    def stop(self) -> None:
        """Stop the server (idempotent); clients then get connection errors, as when offline."""
        self.server.stop()


def _forget_transformers_client() -> None:
    """transformers keeps one ``HfApi`` (with the endpoint of its creation time): make it build a new one."""
    if "transformers.utils.hub" in sys.modules:
        sys.modules["transformers.utils.hub"]._hf_api = None


def _refuse_non_loopback(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Refuse name lookups of and connections to other hosts; returns the list of refused attempts."""
    refused: list[object] = []
    getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

    def guarded_getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host is not None and host not in LOOPBACK_HOSTS:  # None: a local (bind) address lookup
            refused.append(host)
            raise socket.gaierror(f"loopback_hub: {host!r} is not reachable from tests")
        return getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock: socket.socket, address):  # type: ignore[no-untyped-def]
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK_HOSTS:
            refused.append(address)
            raise ConnectionRefusedError(f"loopback_hub: {address!r} is not reachable from tests")
        return connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return refused


@pytest.fixture
def loopback_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubEnv]:
    """Start a loopback Hub and point ``huggingface_hub``, ``datasets`` and ``transformers`` at it."""
    refused = _refuse_non_loopback(monkeypatch)
    base = tmp_path_factory.mktemp("loopback_hub")
    hf_home = base / "hf_home"
    cache_dir = hf_home / "hub"
    server = LoopbackHub(base / "server")
    endpoint = server.start()

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache_dir),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",  # the server speaks the LFS upload protocol, not Xet
        "HF_HUB_OFFLINE": "0",  # also overrides TRANSFORMERS_OFFLINE
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",  # datasets would ping an S3 bucket on load_dataset
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    # huggingface_hub.constants: read at call time by HfApi(), hf_hub_url, hf_hub_download, snapshot_download...
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # The module-level functions (huggingface_hub.create_repo, upload_file, ...) are methods of this instance.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)

    try:
        from datasets import config as ds_config
    except ImportError:
        ds_config = None
    if ds_config is not None:
        datasets_cache = hf_home / "datasets"
        monkeypatch.setattr(ds_config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(ds_config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
        monkeypatch.setattr(ds_config, "HF_CACHE_HOME", str(hf_home))
        monkeypatch.setattr(ds_config, "HF_DATASETS_CACHE", datasets_cache)
        monkeypatch.setattr(ds_config, "HF_MODULES_CACHE", hf_home / "modules")
        monkeypatch.setattr(ds_config, "DOWNLOADED_DATASETS_PATH", datasets_cache / "downloads")
        monkeypatch.setattr(ds_config, "EXTRACTED_DATASETS_PATH", datasets_cache / "downloads" / "extracted")
        monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(ds_config, "HF_DATASETS_OFFLINE", False)
        monkeypatch.setattr(ds_config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
        # The dataset viewer (datasets-server.<endpoint host>) is not served: don't ask it for parquet exports.
        monkeypatch.setattr(ds_config, "USE_PARQUET_EXPORT", False)

    _forget_transformers_client()
    yield HubEnv(endpoint=endpoint, token=TOKEN, cache_dir=cache_dir, hf_home=hf_home, server=server)
    server.stop()
    _forget_transformers_client()
    HfFileSystem.clear_instance_cache()  # cached instances hold listings of this (now gone) hub
    assert not refused, f"the test tried to reach hosts other than 127.0.0.1: {refused}"
