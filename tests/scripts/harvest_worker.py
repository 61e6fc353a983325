"""Run one harvest of a tiny seeded backbone; used by tests/test_harvest.py in subprocesses.

Single process:      python tests/scripts/harvest_worker.py --case bert-intermediate --output-dir DIR
Several processes:   accelerate launch --cpu --num_processes 2 tests/scripts/harvest_worker.py ...
Simulated crash:     --die-after-shards K  SIGKILLs this process after K shards were committed and
                     one batch of the next shard was written (a partial temporary file is left behind).
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from helpers.harvest_fixtures import CASES, build_backbone, build_dataset

from ocd_hf.methods.ocd.harvest import harvest_deltas
from ocd_hf.weight_datasets import ShardWriter


def die_after_shards(count: int) -> None:
    """Make the process SIGKILL itself while writing shard number ``count + 1``."""
    committed = {"shards": 0}
    original_exit, original_write = ShardWriter.__exit__, ShardWriter.write

    def exit_and_count(self, *args):
        original_exit(self, *args)
        committed["shards"] += 1

    def write_then_maybe_die(self, columns):
        original_write(self, columns)
        if committed["shards"] == count:
            os.kill(os.getpid(), signal.SIGKILL)

    ShardWriter.__exit__ = exit_and_count
    ShardWriter.write = write_then_maybe_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--die-after-shards", type=int, default=None)
    parser.add_argument("--use-accelerator", action="store_true", help="pass an accelerate.Accelerator explicitly")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if args.die_after_shards is not None:
        die_after_shards(args.die_after_shards)
    accelerator = None
    if args.use_accelerator:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    kind, target = CASES[args.case]
    harvest_deltas(
        build_backbone(kind),
        build_dataset(kind, args.num_samples),
        target,
        args.output_dir,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        accelerator=accelerator,
        progress=False,
    )


if __name__ == "__main__":
    main()
