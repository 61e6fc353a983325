"""Writes that a crash cannot leave half done: a file or a directory is written under a temporary name, flushed
to disk and renamed into place, so a reader sees the old version or the new one. By hand because neither
Accelerate (``save_state`` writes into its target file by file) nor ``huggingface_hub`` offers it for local files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

PARTIAL_PREFIX = ".partial-"  # something being written; renamed once complete


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or a directory entry to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(temporary_path)``, flush it to disk, then rename it to ``path``: a crash leaves the old file or the new one."""
    path = Path(path)
    partial = path.with_name(PARTIAL_PREFIX + path.name)
    write(partial)
    fsync_path(partial)
    os.replace(partial, path)


def write_json_atomically(path: str | os.PathLike, value: Any) -> None:
    """Write ``value`` as indented JSON to ``path`` through :func:`replace_atomically`."""
    replace_atomically(path, lambda partial: partial.write_text(json.dumps(value, indent=2)))


def commit_directory(partial: Path, final: Path) -> None:
    """Make a fully written directory ``partial`` appear as ``final`` in one rename, after flushing its files. An
    existing ``final`` (a resumed run saving a step again) is moved aside first and deleted after the rename."""
    for root, _, files in os.walk(partial):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)
    stale = None
    if final.exists():
        stale = final.with_name(f"{PARTIAL_PREFIX}replaced-{final.name}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(partial, final)
    fsync_path(final.parent)
    if stale is not None:
        shutil.rmtree(stale)
