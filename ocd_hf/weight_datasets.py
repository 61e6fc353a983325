"""Weight datasets: sharded, resumable, atomically written ``datasets`` storage for harvested weights.

A method passes its schema (``datasets.Features``), the columns that hold weights (stored as float32
or as bfloat16 bit patterns) and the metadata keys that identify a harvest; this module never names
a method. Layout of a weight dataset directory::

    README.md                           dataset card (``load_dataset(dir)`` reads its ``configs``)
    harvest.json                        metadata: where the weights come from, settings, counts, and
                                        each shard's row range, row count, byte size and sha256
    data/train-00000-of-00004.arrow     one Arrow stream file per shard of ``shard_size`` source rows
    .harvest.lock, .harvest.lock.json   the lock a running harvest holds, and who holds it
    .shard_records/                     while harvesting: the record of each finished shard

Shards are Arrow files written by ``datasets``' own writer (features in the schema metadata), so
they memory-map with ``Dataset.from_file`` without any copy, and ``datasets.load_dataset(dir)``
loads them too. A shard is written batch by batch to a hidden temporary file and renamed into place
only once complete: a harvest killed at any point loses at most the shard it was writing. (Written
here because ``datasets`` has no resumable, atomic, append-by-shard writer.)

Every shard is verified: its size, row count and first/last id when loading (and its sha256 with
``verify=True``), its size and sha256 when a harvest resumes, which harvests again any shard that
fails. A file matching the shard pattern that the harvest did not write (a "stray" shard, which
``datasets.load_dataset(dir)`` would read too) is refused, naming it. One harvest at a time may write
into a directory (:func:`harvest_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import filelock
import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets
from datasets.arrow_writer import ArrowWriter

from .checks import check_writable_dir
from .logging import get_logger

logger = get_logger(__name__)

HARVEST_METADATA_NAME = "harvest.json"
DATA_DIR = "data"
SPLIT = "train"
DATA_FILES_PATTERN = f"{DATA_DIR}/{SPLIT}-*.arrow"
STORAGE_DTYPES = ("float32", "bfloat16")
LOCK_NAME = ".harvest.lock"
LOCK_INFO_NAME = ".harvest.lock.json"
RECORDS_DIR = ".shard_records"
HASH_CHUNK = 1 << 20


def check_storage_dtype(dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}.")


def storage_value_type(dtype: str) -> str:
    """The Arrow value type of a weight column stored in ``dtype`` (Arrow has no bfloat16: its bit patterns as int16)."""
    check_storage_dtype(dtype)
    return "float32" if dtype == "float32" else "int16"


def round_to_storage(weights: torch.Tensor, dtype: str) -> torch.Tensor:
    """The float32 values that storing ``weights`` in ``dtype`` keeps (bfloat16 rounding, or none)."""
    check_storage_dtype(dtype)
    if dtype == "bfloat16":
        return weights.to(torch.bfloat16).float()
    return weights.float()


def encode_weights(weights: torch.Tensor, dtype: str) -> np.ndarray:
    """Stored form of ``weights``: float32 values, or bfloat16 bit patterns as int16."""
    check_storage_dtype(dtype)
    if dtype == "bfloat16":
        return weights.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
    return weights.detach().to("cpu", torch.float32).numpy()


def decode_weights(values: np.ndarray | torch.Tensor, dtype: str) -> torch.Tensor:
    """Inverse of :func:`encode_weights`: float32 tensor of the stored values (exact)."""
    check_storage_dtype(dtype)
    tensor = torch.as_tensor(values)
    if dtype == "bfloat16":
        return tensor.to(torch.int16).view(torch.bfloat16).float()
    return tensor.float()


def shard_path(output_dir: str | os.PathLike, index: int, num_shards: int) -> Path:
    """Path of shard ``index`` (Hub naming: ``data/train-00003-of-00010.arrow``)."""
    return Path(output_dir) / DATA_DIR / f"{SPLIT}-{index:05d}-of-{num_shards:05d}.arrow"


class ShardWriter:
    """Context manager writing one shard batch by batch; the file appears only if the block completes.

    Rows go to a hidden temporary file next to the shard, which is flushed to disk and atomically
    renamed to ``path`` on a clean exit, and deleted if the block raises. Columns named in
    ``weight_columns`` are encoded in ``dtype`` (:func:`encode_weights`).
    """

    def __init__(
        self, path: str | os.PathLike, features: Features, dtype: str = "float32", weight_columns: Collection[str] = ()
    ) -> None:
        check_storage_dtype(dtype)
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp")
        self.features = features
        self.dtype = dtype
        self.weight_columns = set(weight_columns)
        self._writer: ArrowWriter | None = None
        self.num_rows = 0
        self.first_id: int | None = None
        self.last_id: int | None = None
        self.num_bytes: int | None = None
        self.sha256: str | None = None

    def __enter__(self) -> "ShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ArrowWriter(features=self.features, path=str(self.tmp_path))
        return self

    def write(self, columns: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Append rows given as ``(batch, ...)`` tensors or arrays, one per column of the features."""
        missing = sorted(set(self.features) - set(columns))
        if missing:
            raise ValueError(f"Missing columns {missing} for this shard; expected {list(self.features)}.")
        batch = {}
        for name in self.features:
            value = columns[name]
            if name in self.weight_columns:
                batch[name] = encode_weights(torch.as_tensor(value), self.dtype)
            else:
                batch[name] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        self._writer.write_batch(batch)
        rows = len(next(iter(batch.values()))) if batch else 0
        self.num_rows += rows
        if rows and "id" in batch:
            ids = np.asarray(batch["id"])
            self.first_id = int(ids[0]) if self.first_id is None else self.first_id
            self.last_id = int(ids[-1])

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._writer.finalize()
        finally:
            self._writer.close()
        if exc_type is not None:
            self.tmp_path.unlink(missing_ok=True)
            return
        with open(self.tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
            self.sha256, self.num_bytes = file_sha256(handle), os.fstat(handle.fileno()).st_size
        os.replace(self.tmp_path, self.path)

    def record(self) -> dict[str, Any]:
        """The shard's record once written: row count, first and last ``id``, byte size and sha256."""
        return {
            "num_rows": self.num_rows, "first_id": self.first_id, "last_id": self.last_id, "num_bytes": self.num_bytes,
            "sha256": self.sha256,
        }


def file_sha256(handle_or_path: Any) -> str:
    """sha256 (hex) of a file given as a path or a binary handle (read from its start)."""
    with contextlib.ExitStack() as stack:
        handle = handle_or_path
        if isinstance(handle_or_path, (str, os.PathLike)):
            handle = stack.enter_context(open(handle_or_path, "rb"))
        handle.seek(0)
        digest = hashlib.sha256()
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
        return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` if the file is missing or unreadable (e.g. half written)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def dataset_sha256(dataset: Dataset, columns: Sequence[str], batch_size: int = 10_000) -> str:
    """sha256 (first 16 hex digits) of the content of ``columns`` of ``dataset``: what a harvest records of
    its inputs, so that resuming with other data is refused.

    Each batch of rows is hashed as one Arrow IPC record batch with contiguous columns, so a selected or
    sliced view hashes like a copy of the same rows. (By hand: ``Dataset._fingerprint`` tracks how a
    dataset was made, not its content, and falls back to a random value for unhashable transforms.)
    """
    view = dataset.select_columns(list(columns)).with_format("arrow")
    digest = hashlib.sha256()
    for start in range(0, len(view), batch_size):
        table = view[start : start + batch_size].combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()[:16]


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex digits) of named tensors (names, dtypes, shapes and values), e.g. a collated batch."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        else:
            digest.update(f"{name}:{value!r}".encode())
    return digest.hexdigest()[:16]


def write_metadata(output_dir: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Write ``harvest.json`` atomically (temporary file + rename).

    Metadata of a complete harvest (``complete`` and its ``shards`` records) replaces the per-shard
    records written while harvesting, which are then removed.
    """
    path = Path(output_dir) / HARVEST_METADATA_NAME
    _write_json(path, dict(metadata))
    if metadata.get("complete") and "shards" in metadata:
        shutil.rmtree(Path(output_dir) / RECORDS_DIR, ignore_errors=True)
    return path


def load_harvest_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``harvest.json`` metadata of the weight dataset in directory ``path``."""
    file = Path(path) / HARVEST_METADATA_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"No {HARVEST_METADATA_NAME} in {str(path)!r}: not a weight dataset. Create one with a harvest "
            "(e.g. ocd_hf.harvest_deltas(...))."
        )
    return json.loads(file.read_text(encoding="utf-8"))


def _differences(existing: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> list[str]:
    differences = []
    for key in sorted(set(existing) | set(expected)):
        old, new = existing.get(key), expected.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences += _differences(old, new, prefix=f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key} (directory: {old!r}, this call: {new!r})")
    return differences


def check_compatible(
    existing: Mapping[str, Any], expected: Mapping[str, Any], output_dir: str | os.PathLike, identity_keys: Sequence[str]
) -> None:
    """Refuse to continue a harvest whose directory was made with other settings (any of ``identity_keys`` differs)."""
    differences = _differences(
        {key: existing.get(key) for key in identity_keys}, {key: expected.get(key) for key in identity_keys}
    )
    if differences:
        raise ValueError(
            f"{str(output_dir)!r} holds a harvest made with other settings or other data, so this call cannot "
            f"continue it: {'; '.join(differences)}. Use another output_dir, or repeat the original call to resume."
        )


# ----- writable directories and the harvest lock ----------------------------------------------------


class DirectoryLockedError(RuntimeError):
    """Another harvest is writing into the directory (it holds :func:`harvest_lock`)."""


def _holder_text(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not written its details yet)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')!r} since {holder.get('since')} "
        f"(command: {holder.get('command')!r})"
    )


@contextlib.contextmanager
def harvest_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[Path]:
    """Hold the harvest lock of ``output_dir`` (created if needed and checked writable) during the block.

    A second harvest into the same directory, in this or any other process, raises
    :class:`DirectoryLockedError` naming the holder (pid, host, start time, command), which is written
    to ``.harvest.lock.json``. The lock is an OS file lock (``filelock``, as ``huggingface_hub`` and
    ``datasets`` use): the kernel releases it when its process dies, even by SIGKILL, so a killed
    harvest never leaves a stale lock; the next harvest warns that it takes over from the dead holder.
    ``enabled=False`` (the non-main processes of a distributed harvest, whose main process holds the
    lock) only checks the directory. A directory this call created is removed again if nothing was
    written into it (a harvest refused after the check).
    """
    created = not Path(output_dir).exists()
    output_dir = check_writable_dir(output_dir)
    if not enabled:
        yield output_dir
        return
    lock = filelock.FileLock(str(output_dir / LOCK_NAME))
    info = output_dir / LOCK_INFO_NAME
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise DirectoryLockedError(
            f"{str(output_dir)!r} is locked by another harvest: {_holder_text(_read_json(info))}. Two harvests into one "
            "directory would mix their rows. Wait for it to finish (then repeat this call to resume or reuse its result), "
            "or pass another output_dir."
        ) from None
    try:
        previous = _read_json(info)
        if previous is not None:
            logger.warning(
                f"{str(output_dir)!r} was locked by {_holder_text(previous)}, which ended without releasing it (killed?); "
                "taking the lock over and resuming its harvest."
            )
        _write_json(info, {
            "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        })
        yield output_dir
    finally:
        info.unlink(missing_ok=True)
        lock.release()
        if created and {path.name for path in output_dir.iterdir()} <= {LOCK_NAME}:  # refused before writing anything
            shutil.rmtree(output_dir, ignore_errors=True)


# ----- shards, their records and their verification ---------------------------------------------------


def shard_file(index: int, num_shards: int) -> str:
    """Path of shard ``index`` inside the dataset directory, as recorded in the metadata."""
    return f"{DATA_DIR}/{SPLIT}-{index:05d}-of-{num_shards:05d}.arrow"


def write_shard_record(output_dir: str | os.PathLike, index: int, num_shards: int, record: Mapping[str, Any]) -> None:
    """Keep the record of a shard just written (see :meth:`ShardWriter.record`) until the harvest completes."""
    name = Path(shard_file(index, num_shards)).name
    _write_json(Path(output_dir) / RECORDS_DIR / f"{name}.json", {**record, "file": shard_file(index, num_shards)})


def shard_records(output_dir: str | os.PathLike, num_shards: int) -> dict[int, dict[str, Any]]:
    """The record of every shard that has one: the complete metadata's ``shards``, updated by the records
    of shards written since (a resumed harvest that wrote some shards again)."""
    output_dir = Path(output_dir)
    metadata = _read_json(output_dir / HARVEST_METADATA_NAME) or {}
    records = {}
    if metadata.get("num_shards") == num_shards:
        records = {index: dict(record) for index, record in enumerate(metadata.get("shards") or [])}
    for index in range(num_shards):
        record = _read_json(output_dir / RECORDS_DIR / f"{Path(shard_file(index, num_shards)).name}.json")
        if record is not None:
            records[index] = record
    return records


def shard_problem(output_dir: str | os.PathLike, index: int, num_shards: int, record: Mapping[str, Any] | None, *, full: bool) -> str | None:
    """Why shard ``index`` does not match its ``record`` (missing, no record, other size, other sha256 when
    ``full``), or ``None`` if it does."""
    path = Path(output_dir) / shard_file(index, num_shards)
    if not path.is_file():
        return "is missing"
    if record is None:
        return "has no record of its size and sha256 (it was not written by this harvest, or its record was lost)"
    size = path.stat().st_size
    if size != record.get("num_bytes"):
        return f"has {size} bytes, but {record.get('num_bytes')} were written (truncated or replaced)"
    if full and file_sha256(path) != record.get("sha256"):
        return f"has sha256 {file_sha256(path)[:16]}…, but {str(record.get('sha256'))[:16]}… was written (its content changed)"
    return None


def stray_shards(output_dir: str | os.PathLike, num_shards: int) -> list[str]:
    """Files matching the shard pattern (which ``datasets.load_dataset(dir)`` would read) that are not shards of
    this ``num_shards``-shard dataset."""
    expected = {shard_file(index, num_shards) for index in range(num_shards)}
    found = sorted(path.relative_to(output_dir).as_posix() for path in Path(output_dir).glob(DATA_FILES_PATTERN))
    return [name for name in found if name not in expected]


def _refuse_strays(output_dir: Path, num_shards: int) -> None:
    strays = stray_shards(output_dir, num_shards)
    if strays:
        raise ValueError(
            f"{str(output_dir)!r} holds files that look like shards but are not among its {num_shards} shards: {strays}. "
            f"datasets.load_dataset({str(output_dir)!r}) would read them as rows too. Delete them (or move them out of "
            f"{DATA_DIR}/)."
        )


def prepare_output_dir(
    output_dir: str | os.PathLike, metadata: Mapping[str, Any], identity_keys: Sequence[str], is_main_process: bool = True
) -> None:
    """Check that a harvest described by ``metadata`` may start or resume in ``output_dir``.

    The main process writes ``harvest.json`` (marked incomplete, with a new ``harvest_id``) when the
    directory is new. Stray shard files are refused.
    """
    output_dir = Path(output_dir)
    metadata_file = output_dir / HARVEST_METADATA_NAME
    if metadata_file.is_file():
        existing = load_harvest_metadata(output_dir)
        check_compatible(existing, metadata, output_dir, identity_keys)
        _refuse_strays(output_dir, metadata["num_shards"])
        if is_main_process and "harvest_id" not in existing:
            write_metadata(output_dir, {**existing, "harvest_id": uuid.uuid4().hex})
        return
    if any((output_dir / DATA_DIR).glob(f"{SPLIT}-*.arrow")):
        raise ValueError(
            f"{str(output_dir / DATA_DIR)!r} holds shard files but {str(output_dir)!r} has no "
            f"{HARVEST_METADATA_NAME}: it was not made by a harvest. Use an empty output_dir."
        )
    if is_main_process:
        write_metadata(output_dir, {**metadata, "complete": False, "harvest_id": uuid.uuid4().hex})


def pending_shards(output_dir: str | os.PathLike, num_shards: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
    """Shards of process ``process_index`` (every ``num_processes``-th) still to harvest: missing, or failing
    verification against their record (size and sha256), which is logged."""
    records = shard_records(output_dir, num_shards)
    pending = []
    for index in range(process_index, num_shards, num_processes):
        if not (Path(output_dir) / shard_file(index, num_shards)).is_file():
            pending.append(index)
            continue
        problem = shard_problem(output_dir, index, num_shards, records.get(index), full=True)
        if problem is not None:
            logger.warning(f"Shard {shard_file(index, num_shards)} of {str(output_dir)!r} {problem}: harvesting it again.")
            pending.append(index)
    return pending


def _open_shard(output_dir: Path, index: int, num_shards: int) -> Dataset:
    path = output_dir / shard_file(index, num_shards)
    try:
        return Dataset.from_file(str(path))
    except (pa.ArrowException, OSError, ValueError) as error:
        raise ValueError(
            f"Shard {shard_file(index, num_shards)} of {str(output_dir)!r} cannot be read ({type(error).__name__}: {error}): "
            f"it is truncated or corrupt. {REPAIR_HINT}"
        ) from error


REPAIR_HINT = (
    "Run the harvest again with the same arguments: it harvests again every shard that fails verification "
    "(or delete the directory and harvest anew)."
)


def _refuse_missing(output_dir: Path, num_shards: int) -> None:
    missing = [index for index in range(num_shards) if not shard_path(output_dir, index, num_shards).is_file()]
    if missing:
        raise ValueError(
            f"Weight dataset {str(output_dir)!r} is incomplete: shards {missing} of {num_shards} are missing. "
            "Run the harvest again with the same arguments to resume."
        )


def open_shards(output_dir: str | os.PathLike, num_shards: int) -> list[Dataset]:
    """Every shard of a weight dataset, memory-mapped; ``ValueError`` naming the missing or unreadable ones."""
    output_dir = Path(output_dir)
    _refuse_missing(output_dir, num_shards)
    return [_open_shard(output_dir, index, num_shards) for index in range(num_shards)]


def _check_shard_rows(output_dir: Path, index: int, num_shards: int, shard: Dataset, record: Mapping[str, Any]) -> None:
    """Refuse a shard whose row count or first/last id differ from its record (a duplicated or swapped shard)."""
    ids = shard.data.column("id") if "id" in shard.column_names else None
    found = {
        "num_rows": shard.num_rows,
        "first_id": int(ids[0].as_py()) if ids is not None and len(ids) else None,
        "last_id": int(ids[-1].as_py()) if ids is not None and len(ids) else None,
    }
    expected = {key: record.get(key) for key in found}
    if found != expected:
        raise ValueError(
            f"Shard {shard_file(index, num_shards)} of {str(output_dir)!r} holds {found} but the harvest wrote {expected}: "
            f"it is a copy of another shard or comes from another harvest. {REPAIR_HINT}"
        )


def summary(values: np.ndarray) -> dict[str, float]:
    """Mean, std, min and max of ``values`` (empty for no values)."""
    if values.size == 0:
        return {}
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()), "max": float(values.max())}


def finalize_weight_dataset(
    output_dir: str | os.PathLike, metadata: Mapping[str, Any], statistics_columns: Sequence[str] = ()
) -> tuple[dict[str, Any], Any]:
    """Validate every shard, count samples and skipped ids, measure sizes; return the final metadata
    (``complete``, counts, ``skipped_ids`` and ``skipped_ids_by_reason``, ``data_bytes``, ``bytes_per_sample``,
    ``shards``: each shard's file, source row range, row count, first/last id, byte size, sha256 and skipped
    ids by reason, ``statistics`` of ``statistics_columns``) and
    the concatenated Arrow table, for a method to add its own figures before :func:`write_metadata`.

    ``metadata`` needs ``num_shards``, ``harvest_config.shard_size`` and ``source.num_rows``. Raises
    ``ValueError`` if a shard is missing, unrecorded, of another size than written or with other rows, if
    a stray shard file is present, or if ids are duplicated, out of order or out of range.
    """
    output_dir = Path(output_dir)
    num_shards = metadata["num_shards"]
    shard_size = metadata["harvest_config"]["shard_size"]
    num_rows = metadata["source"]["num_rows"]
    shards = open_shards(output_dir, num_shards)
    _refuse_strays(output_dir, num_shards)
    records = shard_records(output_dir, num_shards)
    shard_list = []
    for index, shard in enumerate(shards):
        problem = shard_problem(output_dir, index, num_shards, records.get(index), full=False)
        if problem is not None:
            raise ValueError(f"Shard {shard_file(index, num_shards)} of {str(output_dir)!r} {problem}. {REPAIR_HINT}")
        _check_shard_rows(output_dir, index, num_shards, shard, records[index])
        shard_ids = shard.data.column("id").to_numpy()
        if shard_ids.size and (shard_ids[0] < index * shard_size or shard_ids[-1] >= (index + 1) * shard_size):
            raise ValueError(
                f"Shard {index} of {str(output_dir)!r} holds ids outside [{index * shard_size}, {(index + 1) * shard_size}): "
                "it was not written by this harvest. Delete the directory and harvest again."
            )
        row_range = [index * shard_size, min((index + 1) * shard_size, num_rows)]
        shard_list.append({**{key: records[index][key] for key in ("num_rows", "first_id", "last_id", "num_bytes", "sha256")},
                           "file": shard_file(index, num_shards), "row_range": row_range,
                           "skipped": records[index].get("skipped") or {},
                           **({"sums": records[index]["sums"]} if "sums" in records[index] else {})})
    table = concatenate_datasets(shards).data
    ids = table.column("id").to_numpy()
    if ids.size and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= num_rows):
        raise ValueError(
            f"Weight dataset {str(output_dir)!r} is corrupt: ids must be unique, increasing and in [0, {num_rows}). "
            "Delete the directory and harvest again."
        )
    skipped = np.setdiff1d(np.arange(num_rows), ids)
    by_reason: dict[str, list[int]] = {}
    for record in shard_list:
        for reason, reason_ids in record["skipped"].items():
            by_reason.setdefault(reason, []).extend(reason_ids)
    explained = {int(i) for reason_ids in by_reason.values() for i in reason_ids}
    unexplained = [int(i) for i in skipped if int(i) not in explained]
    if unexplained:  # rows a method leaves out without a reason: the non-finite ones every harvest skips
        by_reason.setdefault("non_finite", []).extend(unexplained)
    data_bytes = sum(record["num_bytes"] for record in shard_list)
    existing = _read_json(output_dir / HARVEST_METADATA_NAME) or {}
    final = {
        **metadata,
        "harvest_id": existing.get("harvest_id", metadata.get("harvest_id")),
        "complete": True,
        "num_samples": int(ids.size),
        # Rows a harvest left out: all of them, and by the reason the method gave (none given: "non_finite").
        "skipped_ids": skipped.tolist(),
        "skipped_ids_by_reason": {reason: sorted(reason_ids) for reason, reason_ids in sorted(by_reason.items())},
        "num_skipped_non_finite": len(by_reason.get("non_finite", [])),
        "data_bytes": int(data_bytes),
        "bytes_per_sample": float(data_bytes / ids.size) if ids.size else None,
        "shards": shard_list,
        "statistics": {column: summary(table.column(column).to_numpy()) for column in statistics_columns},
    }
    for tmp in (output_dir / DATA_DIR).glob(".*.tmp"):
        tmp.unlink()
    return final, table


def column_mean(metadata: Mapping[str, Any], column: str) -> tuple[float, int] | None:
    """The mean and count of ``column`` over a finished weight dataset from the sums its shards recorded while
    harvesting (``summed_columns`` of :func:`ocd_hf.harvest.harvest_shards`), or ``None`` when a shard has no such sum
    (written before sums were recorded, or without that column): read the rows instead."""
    shards = metadata.get("shards")
    if not shards or any(column not in (shard.get("sums") or {}) for shard in shards):
        return None
    count = sum(int(shard["sums"][column]["count"]) for shard in shards)
    return (sum(float(shard["sums"][column]["sum"]) for shard in shards) / count if count else math.nan), count


def _numpy_dtype(feature: Any) -> str:
    while not isinstance(feature, Value):
        feature = feature.feature if isinstance(feature, List) else Value(feature.dtype)
    return feature.dtype


def _bfloat16_transform(features: Features, weight_columns: Collection[str]):
    dtypes = {name: _numpy_dtype(feature) for name, feature in features.items()}

    def transform(batch: dict[str, list]) -> dict[str, torch.Tensor]:
        return {
            name: decode_weights(np.asarray(values, dtype=np.int16), "bfloat16")
            if name in weight_columns
            else torch.as_tensor(np.asarray(values, dtype=dtypes[name]))
            for name, values in batch.items()
        }

    return transform


def format_weights(dataset: Dataset, dtype: str, weight_columns: Collection[str]) -> Dataset:
    """``dataset`` (weight columns as stored) as torch tensors, the ``weight_columns`` decoded to float32.

    float32 storage uses the ``"torch"`` format; bfloat16 storage a transform decoding the int16 bit
    patterns (it reads rows as Python lists, about 2 ms per 10k-element matrix).
    """
    check_storage_dtype(dtype)
    if dtype == "bfloat16":
        return dataset.with_transform(_bfloat16_transform(dataset.features, set(weight_columns)))
    return dataset.with_format("torch")


def _check_weight_dtypes(output_dir: Path, dataset: Dataset, dtype: str, weight_columns: Collection[str]) -> None:
    """Refuse weight columns whose stored Arrow type is not the one ``harvest.json``'s ``dtype`` implies."""
    expected = storage_value_type(dtype)
    for name in sorted(set(weight_columns) & set(dataset.column_names)):
        stored = _numpy_dtype(dataset.features[name])
        if stored != expected:
            raise ValueError(
                f"{HARVEST_METADATA_NAME} of {str(output_dir)!r} says dtype {dtype!r} (column {name!r} stored as {expected}), "
                f"but the shards store {name!r} as {stored}: the metadata was edited or belongs to another harvest. Restore "
                f"its harvest_config.dtype, or harvest again."
            )


def open_verified_shards(path: str | os.PathLike, metadata: Mapping[str, Any], verify: bool = False) -> list[Dataset]:
    """The shards of a complete weight dataset, each checked against its record in ``metadata``.

    The fast checks (always): no stray shard file, every shard present with the recorded byte size, row
    count and first/last id. ``verify=True`` also compares every shard's sha256 (reads every byte once).
    ``ValueError`` names the bad file and the fix. Datasets written before shards were recorded load
    with a warning and only the presence check.
    """
    output_dir = Path(path)
    num_shards = metadata["num_shards"]
    _refuse_strays(output_dir, num_shards)
    _refuse_missing(output_dir, num_shards)
    records = metadata.get("shards")
    if records is None:
        logger.warning(
            f"{str(output_dir)!r} was harvested before ocd-hf recorded shard sizes and checksums: its shards cannot be "
            "verified. Harvest it again (in a new directory) to get a verifiable weight dataset."
        )
        return open_shards(output_dir, num_shards)
    if len(records) != num_shards:
        raise ValueError(
            f"{HARVEST_METADATA_NAME} of {str(output_dir)!r} records {len(records)} shards but num_shards is {num_shards}: "
            "it was edited. Harvest again."
        )
    shards = []
    for index, record in enumerate(records):
        problem = shard_problem(output_dir, index, num_shards, record, full=verify)
        if problem is not None:
            raise ValueError(f"Shard {shard_file(index, num_shards)} of weight dataset {str(output_dir)!r} {problem}. {REPAIR_HINT}")
        shard = _open_shard(output_dir, index, num_shards)
        _check_shard_rows(output_dir, index, num_shards, shard, record)
        shards.append(shard)
    return shards


def load_weight_dataset(path: str | os.PathLike, weight_columns: Collection[str], verify: bool = False) -> Dataset:
    """A complete weight dataset, memory-mapped and formatted as torch tensors (:func:`format_weights`).

    Its shards are checked (:func:`open_verified_shards`: sizes, counts and ids; sha256 with ``verify=True``)
    and the stored type of the weight columns against the metadata's ``dtype``.
    """
    metadata = load_harvest_metadata(path)
    if not metadata.get("complete"):
        raise ValueError(
            f"The harvest in {str(path)!r} is not complete. Run the harvest again with the same arguments to resume."
        )
    dataset = concatenate_datasets(open_verified_shards(path, metadata, verify=verify))
    dtype = metadata["harvest_config"]["dtype"]
    _check_weight_dtypes(Path(path), dataset, dtype, weight_columns)
    return format_weights(dataset, dtype, weight_columns)
