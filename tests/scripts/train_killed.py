"""A Mc-Di training run that SIGKILLs itself inside its second checkpoint save, after Accelerate's files are
written and before the trainer's own (tests/test_faults_training.py).

Usage: python tests/scripts/train_killed.py HEADS_DIR OUTPUT_DIR SETTINGS_JSON
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
from accelerate import Accelerator

from ocd_hf.methods.mcdi import train_head_generator

torch.set_num_threads(1)


def main(heads: str, output_dir: str, settings: str) -> None:
    original = Accelerator.save_state
    calls = []

    def save_state_then_die(self, *args, **kwargs):
        calls.append(1)
        result = original(self, *args, **kwargs)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Accelerator.save_state = save_state_then_die
    train_head_generator(heads, output_dir, **json.loads(settings))


if __name__ == "__main__":
    main(*sys.argv[1:4])
