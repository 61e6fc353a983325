"""Hypernetwork training throughput: optimizer steps per second of ``train_hypernetwork``.

    python bench/train.py [--steps 2] [--warmup 1] [--batch-size 4] [--threads 1]
                          [--deit-hidden 192 --deit-classes 10] [--denoisers small paper factorised]

Cases: (a) a LeNet-5 fc2 delta (120 -> 84, the paper's MNIST layer), (b) a DeiT classification
head (default DeiT-Ti width 192 and 10 classes; ``--deit-hidden 768 --deit-classes 200`` is the
paper's DeiT-B/16 TinyImageNet head). Denoisers: "small" (the default ``OCDConfig`` UNet,
32/64/64 channels), "paper" (128 channels, 6 levels) and "factorised" (the MLP over the left
factor of rank-1 deltas). The deltas are synthetic rank-1 Adam-like deltas ``u sign(x)ᵀ``:
throughput depends on shapes only.

The real training loop runs (``train_hypernetwork``, EMA on, no validation split); a timing
tracker registered with the ``Accelerator`` stamps every logged step, and the first ``--warmup``
steps are excluded. Process CPU time is reported beside wall time because the machine may be
shared. Prints a markdown table and writes ``bench/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from datasets import Array2D, Dataset, Features, List, Value
from torch import nn

from ocd_hf.configuration_ocd import FACTOR_DENOISER_CONFIG, PAPER_DENOISER_CONFIG
from ocd_hf.target import layer_fingerprint
from ocd_hf.training import train_hypernetwork

RESULTS = Path(__file__).parent / "results" / "train.json"
DENOISERS: dict[str, dict[str, Any]] = {
    "small": {},
    "paper": {"denoiser_config": PAPER_DENOISER_CONFIG},
    "factorised": {"delta_mode": "factorised", "factor_denoiser_config": FACTOR_DENOISER_CONFIG},
}


class StepTimer(GeneralTracker):
    """An accelerate tracker that records the wall and process CPU time of every logged step."""

    name = "step_timer"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[tuple[int, float, float]] = []

    @property
    def tracker(self) -> "StepTimer":
        return self

    def store_init_configuration(self, values: dict) -> None:
        """Nothing to store."""

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.stamps.append((step, time.perf_counter(), time.process_time()))


class TargetOnly(nn.Module):
    """A stand-in backbone holding the target Linear under its usual name (training never runs it)."""

    def __init__(self, name: str, in_features: int, out_features: int) -> None:
        super().__init__()
        self.add_module(name, nn.Linear(in_features, out_features))


def synthetic_deltas(backbone: nn.Module, name: str, output_dim: int, num_samples: int, seed: int = 0) -> tuple[Dataset, dict]:
    """Rank-1 Adam-like deltas ``u sign(x)ᵀ`` (post-ReLU inputs) in the delta-dataset contract."""
    layer = getattr(backbone, name)
    generator = torch.Generator().manual_seed(seed)
    layer_input = torch.relu(torch.randn(num_samples, layer.in_features, generator=generator))
    factors = 1.5e-3 * torch.randn(num_samples, layer.out_features, generator=generator).sign()
    deltas = factors.unsqueeze(-1) * layer_input.sign().unsqueeze(1)
    features = Features({
        "id": Value("int64"),
        "delta": Array2D((layer.out_features, layer.in_features), "float32"),
        "layer_input": List(Value("float32")),
        "layer_output": List(Value("float32")),
        "model_output": List(Value("float32")),
    })
    dataset = Dataset.from_dict({
        "id": list(range(num_samples)),
        "delta": deltas.numpy(),
        "layer_input": layer_input.tolist(),
        "layer_output": torch.randn(num_samples, layer.out_features, generator=generator).tolist(),
        "model_output": torch.randn(num_samples, output_dim, generator=generator).tolist(),
    }, features=features)
    metadata = {
        "target_module": name, "in_features": layer.in_features, "out_features": layer.out_features, "output_dim": output_dim,
        "task": "classification", "base_layer_fingerprint": layer_fingerprint(layer), "harvest_config": {"optimizer": "adam"},
    }
    return dataset, metadata


def run_case(case: str, name: str, in_features: int, out_features: int, output_dim: int, denoiser: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    backbone = TargetOnly(name, in_features, out_features)
    total = args.warmup + args.steps
    deltas = synthetic_deltas(backbone, name, output_dim, num_samples=args.batch_size * total)
    timer = StepTimer()
    accelerator = Accelerator(log_with=[timer])
    accelerator.init_trackers("bench-train")
    with tempfile.TemporaryDirectory() as output_dir:
        model = train_hypernetwork(
            deltas, backbone, output_dir, config_overrides=DENOISERS[denoiser], num_steps=total, batch_size=args.batch_size,
            validation_fraction=0.0, logging_steps=1, progress=False, accelerator=accelerator,
        )
    accelerator.end_training()
    timed = timer.stamps[args.warmup - 1:] if args.warmup else timer.stamps
    steps = len(timed) - 1
    wall = timed[-1][1] - timed[0][1]
    cpu = timed[-1][2] - timed[0][2]
    parameters = sum(p.numel() for p in model.hypernetwork.parameters())
    return {
        "case": case,
        "delta_shape": [out_features, in_features],
        "denoiser": denoiser,
        "denoiser_input": list(model.hypernetwork.denoiser_sample_shape()),
        "parameters": parameters,
        "batch_size": args.batch_size,
        "timed_steps": steps,
        "steps_per_s": steps / wall,
        "samples_per_s": steps * args.batch_size / wall,
        "cpu_s_per_step": cpu / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--deit-hidden", type=int, default=192)
    parser.add_argument("--deit-classes", type=int, default=10)
    parser.add_argument("--denoisers", nargs="+", default=list(DENOISERS), choices=list(DENOISERS))
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first timed stamp ends the warm-up).")
    torch.set_num_threads(args.threads)
    cases = [
        ("LeNet-5 fc2", "fc2", 120, 84, 10),
        (f"DeiT head ({args.deit_hidden}->{args.deit_classes})", "classifier", args.deit_hidden, args.deit_classes, args.deit_classes),
    ]
    rows = []
    for case, name, in_features, out_features, output_dim in cases:
        for denoiser in args.denoisers:
            row = run_case(case, name, in_features, out_features, output_dim, denoiser, args)
            rows.append(row)
            print(f"{case} / {denoiser}: {row['steps_per_s']:.3f} steps/s", flush=True)

    print(f"\nTraining throughput, batch {args.batch_size}, {args.threads} thread(s), {args.steps} timed steps after {args.warmup} warm-up\n")
    print("| case | delta | denoiser | denoiser input | params | steps/s | samples/s | CPU s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['case']} | {row['delta_shape'][0]}×{row['delta_shape'][1]} | {row['denoiser']} | "
            f"{'×'.join(map(str, row['denoiser_input']))} | {row['parameters'] / 1e6:.2f}M | {row['steps_per_s']:.3f} | "
            f"{row['samples_per_s']:.2f} | {row['cpu_s_per_step']:.2f} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "settings": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "results": rows,
    }, indent=2))
    print(f"\nWrote {RESULTS}")


if __name__ == "__main__":
    main()
