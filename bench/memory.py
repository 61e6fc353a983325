"""Peak memory of harvest and training: the largest recipe layer, and the SetFit head in both storages.

    python bench/memory.py [--samples 64] [--shard-size 16] [--seq-length 128] [--threads 1]

The backbone is a ``SetFitBackbone`` whose body is a random-weight ``BertModel`` of all-MiniLM-L6-v2's
shape (6 layers, hidden 384, intermediate 1536, vocabulary 30522; memory does not depend on the
weights), on random token sequences of ``--seq-length`` tokens. Measurements:

* ``baseline``: imports, backbone and data only (what every other row includes);
* ``body.encoder.layer.5.output.dense`` (384×1536, per token, so full storage): harvest, and training
  a full-mode hypernetwork with the SetFit recipe's per-token budget (UNet 4/8/8 channels, batch 4);
* the SetFit ``head`` (384 -> 2) harvested with full and with factorised storage, and a factorised
  hypernetwork (the ``"auto"`` choice for both) trained on each.

Each measurement runs in a fresh subprocess and reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). Prints a markdown table and writes
``bench/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PER_TOKEN_TARGET = "body.encoder.layer.5.output.dense"
HEAD_TARGET = "head"
MINILM_SHAPE = {
    "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
# The SetFit recipe's budgets (recipes/setfit_ocd.py): per-token UNet and batch, factorised head batch.
PER_TOKEN_TRAINING = {"config_overrides": {"delta_mode": "full", "denoiser_config": {"block_out_channels": [4, 8, 8], "norm_num_groups": 4}},
                      "batch_size": 4, "num_steps": 4}
HEAD_TRAINING = {"config_overrides": {"delta_mode": "auto"}, "batch_size": 16, "num_steps": 20}
# name -> (kind, target, storage); training rows read the deltas the harvest row of the same layer and storage wrote.
MEASUREMENTS = {
    "baseline": ("baseline", None, None),
    "harvest per-token (full)": ("harvest", PER_TOKEN_TARGET, "full"),
    "train per-token (full)": ("train", PER_TOKEN_TARGET, "full"),
    "harvest head (full)": ("harvest", HEAD_TARGET, "full"),
    "harvest head (factorised)": ("harvest", HEAD_TARGET, "factorised"),
    "train head (full storage)": ("train", HEAD_TARGET, "full"),
    "train head (factorised storage)": ("train", HEAD_TARGET, "factorised"),
}


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """The seeded MiniLM-shaped SetFit backbone and a dataset of random token sequences (the same in every process)."""
    import torch
    from datasets import Dataset
    from transformers import BertConfig

    from ocd_hf import SetFitBackbone, SetFitBackboneConfig

    torch.manual_seed(0)
    config = SetFitBackboneConfig(body_config=BertConfig(**MINILM_SHAPE), num_labels=2)
    backbone = SetFitBackbone(config).eval()
    generator = torch.Generator().manual_seed(1)
    dataset = Dataset.from_dict({
        "input_ids": torch.randint(1000, 30000, (args.samples, args.seq_length), generator=generator).numpy(),
        "attention_mask": torch.ones(args.samples, args.seq_length, dtype=torch.long).numpy(),
        "label": torch.randint(0, 2, (args.samples,), generator=generator).numpy(),
    })
    return backbone, dataset


def deltas_dir(workdir: Path, target: str, storage: str) -> Path:
    return workdir / f"deltas-{target.replace('.', '-')}-{storage}"


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run measurement ``name`` in this process; return its peak RSS, time and sizes."""
    import torch

    from ocd_hf import harvest_deltas, load_harvest_metadata, train_hypernetwork

    torch.set_num_threads(args.threads)
    kind, target, storage = MEASUREMENTS[name]
    backbone, dataset = build(args)
    started = time.perf_counter()
    result: dict[str, Any] = {"name": name, "kind": kind, "target": target, "storage": storage}
    if kind == "harvest":
        output = deltas_dir(args.workdir, target, storage)
        harvest_deltas(backbone, dataset, target, output, batch_size=args.batch_size, shard_size=args.shard_size,
                       delta_storage=storage, progress=False)
        metadata = load_harvest_metadata(output)
        result.update({"data_bytes": metadata["data_bytes"], "bytes_per_sample": metadata["bytes_per_sample"]})
    elif kind == "train":
        settings = PER_TOKEN_TRAINING if target == PER_TOKEN_TARGET else HEAD_TRAINING
        output = args.workdir / f"model-{target.replace('.', '-')}-{storage}"
        model = train_hypernetwork(deltas_dir(args.workdir, target, storage), backbone, output, progress=False, **settings)
        result["delta_mode"] = model.config.delta_mode
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``measure(name)`` in a fresh Python process, so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--child", name, "--workdir", str(args.workdir), "--samples", str(args.samples),
               "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size), "--seq-length", str(args.seq_length),
               "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"measurement {name!r} failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def markdown_table(results: list[dict[str, Any]]) -> str:
    baseline = next(r["peak_rss_mib"] for r in results if r["kind"] == "baseline")
    lines = [
        "| measurement | layer | peak RSS (MiB) | over baseline (MiB) | seconds | delta data on disk | delta mode |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        data = f"{r['data_bytes'] / 2**20:,.2f} MiB ({r['bytes_per_sample']:,.0f} B/sample)" if "data_bytes" in r else ""
        layer = f"`{r['target']}`" if r["target"] else ""
        lines.append(
            f"| {r['name']} | {layer} | {r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] - baseline:+,.0f} | {r['seconds']:.1f} | "
            f"{data} | {r.get('delta_mode', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="harvest batch size")
    parser.add_argument("--seq-length", type=int, default=128, help="tokens per sample")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (the machine may be shared)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    parser.add_argument("--child", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args)))
        return

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = Path(workdir)
        for name in MEASUREMENTS:
            results.append(run_child(name, args))
            print(f"done: {name} ({results[-1]['peak_rss_mib']:,.0f} MiB)", flush=True)
    table = markdown_table(results)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key in ("samples", "shard_size", "batch_size", "seq_length", "threads")}
    report = {
        "settings": {**settings, "per_token_training": PER_TOKEN_TRAINING, "head_training": HEAD_TRAINING, "backbone": MINILM_SHAPE},
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "results": results,
        "table": table,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
