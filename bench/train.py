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

Time to validation quality (``--quality``; ``--skip-throughput`` runs only this part): both delta
modes train on the same harvested head deltas, and every ``steps // --quality-evals`` optimizer
steps the EMA weights are scored on held-out deltas (never trained on) with a quantity both modes
share, unlike their denoising losses: the mean cosine between a generated delta (1 draw, 10 DDIM
steps, materialised as the full matrix) and the harvested delta of the same sample, and the
cross-entropy of the backbone with the generated delta applied (head layers only: the logits are
``model_output + Δ x``). Training runs in chunks through ``resume_from_checkpoint`` (constant LR, so
the chunked run is the same run as one long run); the training time counts optimizer steps only
(validation, checkpointing and set-up excluded), as process CPU seconds of one thread and as wall
seconds. Two targets: ``--quality-target`` (0.9) × the lower of the two modes' best cosines, and
the cosine of the mean training delta (a label-free constant any useful generator should beat).

    python bench/train.py --quality --skip-throughput [--quality-deltas DIR] [--quality-steps-full 300]
                          [--quality-steps-factorised 3000] [--quality-evals 6] [--quality-batch-size 64]

``--quality-deltas`` is a head delta dataset (e.g. ``recipes/deit_ocd.py``'s ``<output-dir>/deltas``, or
one harvested with ``delta_storage="full"`` from its ``<output-dir>/backbone``); its backbone is loaded
from the harvest metadata. Without it, the DeiT-like head of ``bench/harvest.py`` (random weights,
random images; label = the base model's prediction for 80 % of the samples, else uniform, like a
classifier that fits most of its training set) is harvested with full storage.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from datasets import Array2D, Dataset, Features, List, Value
from torch import nn
from torch.nn import functional as F

from ocd_hf import (
    FACTOR_DENOISER_CONFIG,
    PAPER_DENOISER_CONFIG,
    Conditioning,
    OCDWrapper,
    find_target_linear,
    harvest_deltas,
    layer_fingerprint,
    load_deltas,
    load_harvest_metadata,
    load_pretrained_backbone,
    materialise_deltas,
    train_hypernetwork,
)

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


# ----- time to validation quality ------------------------------------------------------------------

QUALITY_DDIM_STEPS = 10


def synthetic_head_harvest(output_dir: Path, num_samples: int, seed: int = 0) -> tuple[nn.Module, Path]:
    """Harvest (full storage) the DeiT-like head of ``bench/harvest.py`` on random images; returns (backbone, dataset dir)."""
    spec = importlib.util.spec_from_file_location("bench_harvest", Path(__file__).parent / "harvest.py")
    bench_harvest = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench_harvest  # its dataclasses look their module up
    spec.loader.exec_module(bench_harvest)
    case = next(case for case in bench_harvest.CASES if case.target == "classifier")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = case.build().eval()
    inputs = case.data(num_samples, generator)
    with torch.no_grad():
        predicted = torch.cat([backbone(**{k: v[i:i + 256] for k, v in inputs.items()}).logits.argmax(-1) for i in range(0, num_samples, 256)])
    random_labels = torch.randint(0, case.num_labels, (num_samples,), generator=generator)
    labels = torch.where(torch.rand(num_samples, generator=generator) < 0.8, predicted, random_labels)
    dataset = Dataset.from_dict({**{name: value.numpy() for name, value in inputs.items()}, "label": labels.numpy()})
    deltas_dir = output_dir / "synthetic-deltas"
    harvest_deltas(backbone, dataset, case.target, deltas_dir, batch_size=256, delta_storage="full", progress=False)
    return backbone, deltas_dir


def head_conditioning(rows: dict[str, torch.Tensor]) -> Conditioning:
    """``I(x)`` of a head layer rebuilt from delta-dataset columns (pooled = raw input for one vector per sample)."""
    layer_input = rows["layer_input"].float()
    return Conditioning(
        layer_input=layer_input, layer_output=rows["layer_output"].float(), model_output=rows["model_output"].float(),
        raw_input=layer_input, outputs=None, target_is_output=True,
    )


@torch.no_grad()
def validation_quality(model: OCDWrapper, rows: dict[str, torch.Tensor], truth: torch.Tensor, seed: int, ce_ok: bool) -> dict[str, float]:
    """Mean cosine (and its standard error over samples) between one generated delta per held-out
    sample (10 DDIM steps, materialised) and its harvested delta;
    and the cross-entropy with the generated delta applied (heads only)."""
    cond = head_conditioning(rows)
    generated = model.generate_deltas(cond, 1, generator=torch.Generator().manual_seed(seed), num_inference_steps=QUALITY_DDIM_STEPS)
    full = model.full_deltas(generated, cond)[:, 0].float()
    cosine = F.cosine_similarity(full.flatten(1), truth.flatten(1), dim=1)
    result = {"cosine": float(cosine.mean()), "cosine_se": float(cosine.std() / math.sqrt(cosine.numel()))}
    if ce_ok:
        logits = cond.model_output + torch.einsum("boi,bi->bo", full, cond.layer_input)
        result["cross_entropy"] = float(F.cross_entropy(logits, rows["label"].long()))
    return result


def step_durations(stamps: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """Per-step (step, wall s, CPU s) from the end-of-step stamps of one chunk; the chunk's first step
    (whose interval would include set-up) gets the chunk's median step time."""
    durations = [(b[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(stamps, stamps[1:])]
    if not durations:
        raise ValueError("A chunk needs at least 2 steps to be timed; lower --quality-evals.")
    wall = sorted(d[1] for d in durations)[len(durations) // 2]
    cpu = sorted(d[2] for d in durations)[len(durations) // 2]
    return [(stamps[0][0], wall, cpu), *durations]


def quality_run(
    mode: str, train_pair: tuple[Dataset, dict], backbone: nn.Module, rows: dict[str, torch.Tensor], truth: torch.Tensor,
    num_steps: int, evals: int, args: argparse.Namespace, work_dir: Path, ce_ok: bool,
) -> dict[str, Any]:
    """Train ``mode`` in ``evals`` chunks (resuming from the last checkpoint), scoring after each."""
    every = num_steps // evals
    if every < 2:
        raise ValueError(f"{mode}: {num_steps} steps in {evals} chunks leaves fewer than 2 steps per chunk.")
    output_dir = work_dir / f"quality-{mode}"
    shutil.rmtree(output_dir, ignore_errors=True)
    curve, durations, parameters = [], [], None
    for chunk in range(1, evals + 1):
        timer = StepTimer()
        accelerator = Accelerator(log_with=[timer])
        accelerator.init_trackers("bench-quality")
        model = train_hypernetwork(
            train_pair, backbone, output_dir, config_overrides={"delta_mode": mode}, num_steps=chunk * every,
            batch_size=args.quality_batch_size, learning_rate=args.quality_lr, validation_fraction=0.0, logging_steps=1,
            checkpointing_steps=every, checkpoints_total_limit=1, resume_from_checkpoint="latest", seed=args.quality_seed,
            accelerator=accelerator, progress=False,
        )
        accelerator.end_training()
        durations += step_durations(timer.stamps)
        parameters = sum(p.numel() for p in model.hypernetwork.parameters())
        tick = time.process_time()
        point = validation_quality(model, rows, truth, args.quality_seed, ce_ok)
        point.update({
            "step": chunk * every,
            "train_cpu_s": sum(d[2] for d in durations),
            "train_wall_s": sum(d[1] for d in durations),
            "validation_cpu_s": time.process_time() - tick,
        })
        curve.append(point)
        print(f"  {mode} step {point['step']}: cosine {point['cosine']:.4f}"
              + (f", CE {point['cross_entropy']:.4f}" if ce_ok else "") + f" ({point['train_cpu_s']:.1f} CPU s)", flush=True)
    shutil.rmtree(output_dir, ignore_errors=True)
    steps = len(durations)
    return {
        "delta_mode": mode,
        "parameters": parameters,
        "steps": steps,
        "eval_every": every,
        "steps_per_s": steps / sum(d[1] for d in durations),
        "steps_per_cpu_s": steps / sum(d[2] for d in durations),
        "curve": curve,
    }


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((point for point in curve if point["cosine"] >= target), None)


def run_quality(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        if args.quality_deltas is None:
            backbone, deltas_dir = synthetic_head_harvest(work_dir, args.quality_samples)
            source = f"synthetic: bench/harvest.py DeiT-like head, {args.quality_samples} random images, full storage"
        else:
            deltas_dir = Path(args.quality_deltas)
            metadata = load_harvest_metadata(deltas_dir)
            backbone = load_pretrained_backbone(metadata["base_model_name_or_path"], metadata.get("base_model_class")).eval()
            source = str(deltas_dir)
        metadata = load_harvest_metadata(deltas_dir)
        dataset = load_deltas(deltas_dir)
        if metadata.get("per_token"):
            raise ValueError("--quality needs a layer that sees one vector per sample (a head): both modes must apply.")
        _, layer = find_target_linear(backbone, metadata["target_module"])
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.quality_seed))
        held_out = order[: args.quality_validation].sort().values.tolist()
        train_rows = order[args.quality_validation:].sort().values.tolist()
        train_pair = (dataset.select(train_rows, keep_in_memory=True), metadata)
        rows = dataset.select(held_out, keep_in_memory=True)[:]
        truth = materialise_deltas(rows, metadata).float()
        # The logits with a delta are model_output + Δx only where the layer's output is the model output (a head).
        ce_ok = "label" in rows and torch.allclose(rows["layer_output"].float(), rows["model_output"].float(), atol=1e-4)
        train_mean = torch.cat([
            materialise_deltas(train_pair[0][i:i + 1024], metadata).float().sum(0, keepdim=True)
            for i in range(0, len(train_rows), 1024)
        ]).sum(0) / len(train_rows)
        references = {
            "mean_training_delta_cosine": float(F.cosine_similarity(train_mean.flatten().unsqueeze(0), truth.flatten(1), dim=1).mean()),
        }
        if ce_ok:
            references["base_cross_entropy"] = float(F.cross_entropy(rows["model_output"].float(), rows["label"].long()))
        print(f"quality: {len(train_rows)} training / {len(held_out)} held-out deltas of {metadata['target_module']} "
              f"{layer.out_features}x{layer.in_features} ({source}); references {references}", flush=True)
        runs = {}
        for mode, steps in (("full", args.quality_steps_full), ("factorised", args.quality_steps_factorised)):
            runs[mode] = quality_run(mode, train_pair, backbone, rows, truth, steps, args.quality_evals, args, work_dir, ce_ok)
    return {
        "settings": {key: value for key, value in vars(args).items() if key.startswith("quality")} | {"threads": args.threads},
        "deltas": source,
        "target_module": metadata["target_module"],
        "delta_shape": [layer.out_features, layer.in_features],
        "num_train_deltas": len(train_rows),
        "num_validation_deltas": len(held_out),
        "validation": f"mean cosine between 1 generated delta ({QUALITY_DDIM_STEPS} DDIM steps) and the harvested delta; "
                      "CE of model_output + Δx (heads); EMA weights; held-out deltas",
        "references": references,
        "runs": runs,
    } | summarise_quality(runs, references, args.quality_target)


def summarise_quality(runs: dict[str, dict], references: dict[str, float], fraction: float) -> dict[str, Any]:
    """Best values and the time each mode needs to reach two cosine targets: ``fraction`` × the lower
    of the modes' best cosines (the brief's common target; none if that is <= 0, the score of an
    uninformed generator), and the cosine of the mean training delta (a label-free constant)."""
    best = {mode: max(point["cosine"] for point in run["curve"]) for mode, run in runs.items()}
    targets = {
        "lower_best": fraction * min(best.values()) if min(best.values()) > 0 else None,
        "mean_training_delta": references["mean_training_delta_cosine"],
    }
    for mode, run in runs.items():
        run["best_cosine"] = best[mode]
        if "cross_entropy" in run["curve"][0]:
            run["best_cross_entropy"] = min(point["cross_entropy"] for point in run["curve"])
        run["to_target"] = {}
        for name, target in targets.items():
            reached = None if target is None else first_reaching(run["curve"], target)
            run["to_target"][name] = reached and {key: reached[key] for key in ("step", "train_cpu_s", "train_wall_s")}
    return {"target_cosine": targets["lower_best"], "targets": targets}


def quality_table(quality: dict[str, Any]) -> str:
    ce = "base_cross_entropy" in quality["references"]
    lines = [
        f"Time to validation quality: {quality['target_module']} {quality['delta_shape'][0]}×{quality['delta_shape'][1]}, "
        f"{quality['num_train_deltas']} training / {quality['num_validation_deltas']} held-out deltas; target cosine "
        + (f"{quality['target_cosine']:.3f}" if quality["target_cosine"] is not None else "none (a mode's best cosine is <= 0)")
        + f" ({quality['settings']['quality_target']:g} × the lower best); mean training delta: cosine "
        f"{quality['references']['mean_training_delta_cosine']:.3f}" + (f"; base CE {quality['references']['base_cross_entropy']:.4f}" if ce else ""),
        "",
        "| mode | params | steps run | steps/CPU s | best cosine | final cosine ± se |" + (" best CE |" if ce else "")
        + " to target: steps / train CPU s | to mean-delta cosine: steps / train CPU s |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if ce else "") + "---:|---:|",
    ]

    def reached(point: dict | None) -> str:
        return f"{point['step']} / {point['train_cpu_s']:.1f}" if point else "not reached"

    for mode, run in quality["runs"].items():
        final = run["curve"][-1]
        lines.append(
            f"| {mode} | {run['parameters'] / 1e6:.2f}M | {run['steps']} | {run['steps_per_cpu_s']:.2f} | {run['best_cosine']:.4f} | "
            f"{final['cosine']:.4f} ± {final['cosine_se']:.4f} |" + (f" {run['best_cross_entropy']:.4f} |" if ce else "")
            + f" {reached(run['to_target']['lower_best'])} | {reached(run['to_target']['mean_training_delta'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--deit-hidden", type=int, default=192)
    parser.add_argument("--deit-classes", type=int, default=10)
    parser.add_argument("--denoisers", nargs="+", default=list(DENOISERS), choices=list(DENOISERS))
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON to write (its other sections are kept)")
    parser.add_argument("--skip-throughput", action="store_true", help="keep the throughput results already in the JSON")
    parser.add_argument("--quality", action="store_true", help="measure time to validation quality of both delta modes")
    parser.add_argument("--quality-deltas", default=None, help="a head delta dataset (default: a synthetic DeiT-like harvest)")
    parser.add_argument("--quality-samples", type=int, default=2048, help="synthetic harvest size")
    parser.add_argument("--quality-validation", type=int, default=256, help="held-out deltas scored")
    parser.add_argument("--quality-steps-full", type=int, default=300)
    parser.add_argument("--quality-steps-factorised", type=int, default=3000)
    parser.add_argument("--quality-evals", type=int, default=6, help="validations per mode (equally spaced)")
    parser.add_argument("--quality-batch-size", type=int, default=64)
    parser.add_argument("--quality-lr", type=float, default=1e-4)
    parser.add_argument("--quality-seed", type=int, default=0)
    parser.add_argument("--quality-target", type=float, default=0.9, help="fraction of the lower mode's best cosine")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first timed stamp ends the warm-up).")
    if args.skip_throughput and not args.quality:
        parser.error("--skip-throughput without --quality has nothing to run.")
    torch.set_num_threads(args.threads)
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    report = dict(previous)
    if not args.skip_throughput:
        report.update(run_throughput(args))
    if args.quality:
        quality = run_quality(args)
        print("\n" + quality_table(quality))
        report["time_to_quality"] = quality
    report["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nWrote {args.output}")


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """The throughput cases; returns the ``settings`` and ``results`` entries of the JSON."""
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
    settings = {key: value for key, value in vars(args).items() if not key.startswith("quality") and key not in ("skip_throughput", "output")}
    return {"settings": settings, "results": rows}


if __name__ == "__main__":
    main()
