"""Two-process DDP training run for tests/test_training.py.

Usage: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/scripts/train_ddp.py OUTPUT_DIR
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from conftest import tiny_bert  # tests/ is on PYTHONPATH (see helpers.subprocess_env)
from test_training import QUIET, TINY_OVERRIDES, harvest_tiny

from ocd_hf.methods.ocd.training import train_hypernetwork

torch.set_num_threads(1)


def main(output_dir: str) -> None:
    backbone = tiny_bert()  # seeded: identical on both processes
    deltas = harvest_tiny(backbone, num_samples=40)
    accelerator = Accelerator()
    assert accelerator.num_processes == 2, "launch with two processes"
    model = train_hypernetwork(
        deltas, backbone, output_dir, config_overrides=TINY_OVERRIDES, num_steps=4, batch_size=8, logging_steps=2,
        checkpointing_steps=2, accelerator=accelerator, **QUIET,
    )
    assert not model.hypernetwork.training
    # Each process trained on its own shard: only synchronised gradients keep the weights identical.
    checksum = torch.stack([p.double().sum() for p in model.hypernetwork.parameters()]).sum().view(1)
    gathered = accelerator.gather(checksum)
    assert torch.equal(gathered[0], gathered[1]), gathered.tolist()
    # Destroy the process group before the interpreter exits: left alive, gloo's threads can abort the process
    # at shutdown ("terminate called without an active exception"), seen once in CI.
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
