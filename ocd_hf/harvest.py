"""The resumable shard loop every harvest runs: this process's missing shards, each written atomically.

A method supplies the schema of its rows and a function that harvests rows ``[start, end)`` of its
source; the loop handles sharding across processes, resumption (finished shards that pass
verification are skipped), the atomic shard files of :mod:`ocd_hf.weight_datasets` with the record
of each (row count, ids, size, sha256, and the sums of ``summed_columns``) and one progress bar.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch
from datasets import Features
from tqdm.auto import tqdm

from .weight_datasets import ShardWriter, pending_shards, shard_path, write_shard_record

Columns = Mapping[str, torch.Tensor | np.ndarray]
# Rows [start, end) -> their columns, or (columns, {reason: ids of the rows left out for that reason}).
HarvestRowsFn = Callable[[int, int], Columns | tuple[Columns, Mapping[str, Sequence[int]]]]


def harvest_shards(
    output_dir: str | os.PathLike,
    metadata: Mapping[str, Any],
    features: Features,
    harvest_rows: HarvestRowsFn,
    *,
    state: Any,
    batch_size: int,
    weight_columns: Collection[str] = (),
    summed_columns: Collection[str] = (),
    progress: bool = True,
    description: str = "Harvesting",
) -> None:
    """Harvest this process's missing shards of the weight dataset described by ``metadata``.

    ``metadata`` needs ``num_shards``, ``harvest_config`` (``shard_size``, ``dtype``) and
    ``source.num_rows``; ``harvest_rows(start, end)`` returns the columns of ``features`` for the
    source rows it could harvest among ``[start, end)`` (rows it skips are simply absent), optionally
    with ``{reason: skipped ids}``, kept in the shard's record (``skipped``) and summed up by
    :func:`~ocd_hf.weight_datasets.finalize_weight_dataset`. The float64 sum and the count of every column of
    ``summed_columns`` the rows hold (a column of ``features`` or one that is only summed, not stored) go into the
    shard's record (``sums``), so a summary over the whole dataset needs no re-read (:func:`~ocd_hf.weight_datasets.column_mean`).
    ``state`` is an Accelerate ``PartialState``/``Accelerator``: process ``i`` of ``n`` writes shards ``i, i+n, …``.
    """
    settings = metadata["harvest_config"]
    num_shards, shard_size, num_rows = metadata["num_shards"], settings["shard_size"], metadata["source"]["num_rows"]
    shards = pending_shards(output_dir, num_shards, state.process_index, state.num_processes)
    bounds = [(index * shard_size, min((index + 1) * shard_size, num_rows)) for index in shards]
    bar = tqdm(
        total=sum(end - start for start, end in bounds), desc=description, unit="sample",
        disable=not (progress and state.is_local_main_process),
    )
    with bar:
        for index, (shard_start, shard_end) in zip(shards, bounds):
            path = shard_path(output_dir, index, num_shards)
            skipped: dict[str, list[int]] = {}
            sums: dict[str, dict[str, float]] = {}
            with ShardWriter(path, features, settings["dtype"], weight_columns) as writer:
                for start in range(shard_start, shard_end, batch_size):
                    end = min(start + batch_size, shard_end)
                    rows = harvest_rows(start, end)
                    if isinstance(rows, tuple):
                        rows, reasons = rows
                        for reason, ids in reasons.items():
                            if len(ids):
                                skipped.setdefault(reason, []).extend(int(i) for i in ids)
                    for name in summed_columns:
                        if name in rows:
                            total = sums.setdefault(name, {"sum": 0.0, "count": 0})
                            total["sum"] += float(torch.as_tensor(rows[name]).double().sum())
                            total["count"] += len(rows[name])
                    writer.write(rows)
                    bar.update(end - start)
            record = {**writer.record(), "skipped": skipped, **({"sums": sums} if sums else {})}
            write_shard_record(output_dir, index, num_shards, record)
