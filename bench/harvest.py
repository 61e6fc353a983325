"""Harvest throughput: the official per-sample loop vs the vectorised harvest, on four kinds of layer.

    python bench/harvest.py [--samples 512] [--loop-samples 48] [--batch-size 64] [--threads 1]

Cases: (a) LeNet-5 fc2 (120 -> 84, not the head), (b) a SetFit-like head (384 -> 2 on sentence
embeddings), (c) a DeiT classification head, (d) a per-token layer (intermediate dense of a small Bert's
last layer: only the CLS token reaches the classifier), (e) the same layer in the first of the two
layers (every token reaches the loss). All backbones are small, randomly initialised models built
from configs; throughput does not depend on the weights.

"loop" is the official OCD procedure: for each sample, Adam on the target weight only (everything
else frozen), batch size 1, conditioning captured first. "vectorised" is ``harvest_batch`` (the
same numbers for a whole batch at once). "end-to-end" is ``harvest_deltas`` writing the delta
dataset to disk, with full storage and, for the layers that see one vector per sample (heads and
fc2), with factorised storage (``u`` of ``Δ = u sign(x)ᵀ``); "max residual" is the largest
``‖Δ − u sign(x)ᵀ‖/‖Δ‖`` over the vectorised deltas (factorised storage refuses any above its
tolerance, 0.05). Prints a markdown table and writes ``bench/results/harvest.json``.

    python bench/harvest.py --mode official [--samples 256] [--loop-samples 32] [--repeats 3]

Side by side with the official OCD procedure, written here from its published algorithm (not its code):
for each sample, a deep copy of the model, Adam on the target layer's weight only (lr 5e-4, 3 steps,
batch 1), the conditioning captured by hooks in the first forward. Both run on the same model and
samples, interleaved and repeated, ocd-hf at ``harvest_deltas``' default batch size for the layer (``--batch-size``
overrides it); reported: samples/s of each, their ratio (median over repeats), ``harvest_deltas`` end to end with
its defaults (a nested-list dataset read, harvested, written, checked, carded and loaded) and its ratio, the same
split into a per-harvest fixed cost (seconds) and a per-sample rate (``harvest_deltas`` timed on ``--samples`` rows and
on ``LARGE_FACTOR`` times as many, back to back in each repeat: ``T(n) = fixed + n / rate`` through the two, median
over repeats; in brackets the time of a ``TINY_ROWS``-row harvest, almost all fixed cost) with the ratio of that
rate to the official loop, the largest delta difference, and the fraction of the FLOP limit that ocd-hf reaches: the unavoidable work
per sample (one forward of the whole network, then per step a forward and backward of the target's
shift and what follows it, and Adam's element-wise work, ~10 FLOPs per weight entry), counted with
``torch.utils.flop_counter.FlopCounterMode``, at the rate of a 1024³ float32 matmul timed in the same
run. Where ocd-hf splits the network at the target (the ``*_split`` paths: the network before the target runs
once per batch), the same harvest is also timed with ``split_prefix=False`` (the whole network at every step, the
path before the split) and its deltas checked equal. The result goes under ``"official"`` in
``bench/results/harvest.json``, with the load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DeiTConfig,
    DeiTForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from ocd_hf import (
    DEFAULT_FACTOR_TOLERANCE,
    capture_conditioning,
    describe_backbone,
    factorise_deltas,
    find_target_linear,
    harvest_batch,
    harvest_deltas,
    load_harvest_metadata,
    model_output_tensor,
)
from ocd_hf.finetune import overfit_deltas
from ocd_hf.methods.ocd.harvest import default_batch_size


class LeNetConfig(PretrainedConfig):
    model_type = "bench-lenet5"

    def __init__(self, num_labels: int = 10, **kwargs: Any) -> None:
        super().__init__(num_labels=num_labels, **kwargs)


class LeNet5(PreTrainedModel):
    """LeNet-5 on 28x28 grey images: conv(6) -> pool -> conv(16) -> pool -> fc1 120 -> fc2 84 -> fc3."""

    config_class = LeNetConfig

    def __init__(self, config: LeNetConfig) -> None:
        super().__init__(config)
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> SequenceClassifierOutput:
        hidden = F.relu(self.fc1(self.features(pixel_values).flatten(1)))
        return SequenceClassifierOutput(logits=self.fc3(F.relu(self.fc2(hidden))))


class EmbeddingHeadConfig(PretrainedConfig):
    model_type = "bench-embedding-head"

    def __init__(self, embedding_dim: int = 384, num_labels: int = 2, **kwargs: Any) -> None:
        self.embedding_dim = embedding_dim
        super().__init__(num_labels=num_labels, **kwargs)


class EmbeddingHead(PreTrainedModel):
    """A SetFit differentiable head: one Linear on fixed sentence embeddings."""

    config_class = EmbeddingHeadConfig

    def __init__(self, config: EmbeddingHeadConfig) -> None:
        super().__init__(config)
        self.linear = nn.Linear(config.embedding_dim, config.num_labels)
        self.post_init()

    def forward(self, embeddings: torch.Tensor) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.linear(embeddings))


@dataclass
class Case:
    name: str
    target: str
    build: Callable[[], PreTrainedModel]
    data: Callable[[int, torch.Generator], dict[str, torch.Tensor]]
    num_labels: int


def _bert() -> PreTrainedModel:
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, num_labels=2)
    return BertForSequenceClassification(config)


def _deit() -> PreTrainedModel:
    config = DeiTConfig(
        image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10,
    )
    return DeiTForImageClassification(config)


CASES = [
    Case("(a) LeNet-5 fc2", "fc2", lambda: LeNet5(LeNetConfig()), lambda n, g: {"pixel_values": torch.randn(n, 1, 28, 28, generator=g)}, 10),
    Case(
        "(b) SetFit-like head", "linear", lambda: EmbeddingHead(EmbeddingHeadConfig()),
        lambda n, g: {"embeddings": F.normalize(torch.randn(n, 384, generator=g), dim=-1)}, 2,
    ),
    Case("(c) DeiT head", "classifier", _deit, lambda n, g: {"pixel_values": torch.randn(n, 1, 28, 28, generator=g)}, 10),
    Case(
        "(d) Bert per-token intermediate.dense",
        "bert.encoder.layer.1.intermediate.dense",
        _bert,
        lambda n, g: {"input_ids": torch.randint(1, 1000, (n, 32), generator=g), "attention_mask": torch.ones(n, 32, dtype=torch.long)},
        2,
    ),
    Case(
        "(e) Bert per-token intermediate.dense, first layer",
        "bert.encoder.layer.0.intermediate.dense",
        _bert,
        lambda n, g: {"input_ids": torch.randint(1, 1000, (n, 32), generator=g), "attention_mask": torch.ones(n, 32, dtype=torch.long)},
        2,
    ),
]


def per_sample_loop(backbone: nn.Module, target: str, inputs: dict[str, torch.Tensor], labels: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """The official procedure, one sample at a time; returns the deltas ``(n, out, in)``."""
    _, layer = find_target_linear(backbone, target)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    layer.weight.requires_grad_(True)
    base = layer.weight.detach().clone()
    deltas = []
    for index in range(labels.shape[0]):
        sample = {name: value[index : index + 1] for name, value in inputs.items()}
        with torch.no_grad():
            capture_conditioning(backbone, layer, sample)
        optimizer = torch.optim.Adam([layer.weight], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(backbone(**sample).logits, labels[index : index + 1]).backward()
            optimizer.step()
        deltas.append(layer.weight.detach() - base)
        with torch.no_grad():
            layer.weight.copy_(base)
    for parameter in backbone.parameters():
        parameter.requires_grad_(True)
    return torch.stack(deltas)


def vectorised(
    backbone: nn.Module, target: str, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int, lr: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-storage deltas ``(n, out, in)`` of ``harvest_batch`` and the (pooled) layer inputs ``(n, in)``."""
    _, layer = find_target_linear(backbone, target)
    deltas, layer_inputs = [], []
    for start in range(0, labels.shape[0], batch_size):
        end = min(start + batch_size, labels.shape[0])
        batch = {name: value[start:end] for name, value in inputs.items()}
        columns, _ = harvest_batch(backbone, layer, batch, labels[start:end], torch.arange(start, end), task="classification", lr=lr, steps=steps)
        deltas.append(columns["delta"])
        layer_inputs.append(columns["layer_input"])
    return torch.cat(deltas), torch.cat(layer_inputs)


def end_to_end(backbone: nn.Module, case: Case, dataset: Dataset, batch_size: int, storage: str) -> dict[str, float]:
    """``harvest_deltas`` to a temporary directory: samples/s and bytes per sample on disk."""
    with tempfile.TemporaryDirectory() as directory:
        _, seconds = timed(
            lambda: harvest_deltas(backbone, dataset, case.target, directory, batch_size=batch_size, delta_storage=storage, progress=False)
        )
        metadata = load_harvest_metadata(directory)
    return {"samples_per_s": len(dataset) / seconds, "bytes_per_sample": metadata["bytes_per_sample"]}


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def prepare_case(case: Case, args: argparse.Namespace) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, nn.Linear, dict[str, torch.Tensor]]:
    """The seeded backbone, ``--samples`` inputs and labels, the target Linear and the per-sample loop's share of the inputs."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    backbone = case.build().eval()
    inputs = case.data(args.samples, generator)
    labels = torch.randint(0, case.num_labels, (args.samples,), generator=generator)
    _, layer = find_target_linear(backbone, case.target)
    return backbone, inputs, labels, layer, {name: value[: args.loop_samples] for name, value in inputs.items()}


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    backbone, inputs, labels, layer, loop_inputs = prepare_case(case, args)

    per_sample_loop(backbone, case.target, {k: v[:2] for k, v in inputs.items()}, labels[:2], args.lr, args.steps)  # warm-up
    loop_deltas, loop_seconds = timed(lambda: per_sample_loop(backbone, case.target, loop_inputs, labels[: args.loop_samples], args.lr, args.steps))
    warm_up = {k: v[: args.batch_size] for k, v in inputs.items()}
    vectorised(backbone, case.target, warm_up, labels[: args.batch_size], args.batch_size, args.lr, args.steps)
    (vector_deltas, layer_inputs), vector_seconds = timed(lambda: vectorised(backbone, case.target, inputs, labels, args.batch_size, args.lr, args.steps))
    scale = loop_deltas.abs().amax().clamp_min(1e-12)
    max_relative_difference = ((vector_deltas[: args.loop_samples] - loop_deltas).abs().amax() / scale).item()
    per_token = describe_backbone(backbone, case.target, {k: v[:2] for k, v in inputs.items()})["per_token"]
    max_residual = None if per_token else factorise_deltas(vector_deltas, layer_inputs, "sign")[1].max().item()

    dataset = Dataset.from_dict({**{name: value.numpy() for name, value in inputs.items()}, "label": labels.numpy()})
    full = end_to_end(backbone, case, dataset, args.batch_size, "full")
    factorised = None
    if max_residual is not None and max_residual <= DEFAULT_FACTOR_TOLERANCE:
        factorised = end_to_end(backbone, case, dataset, args.batch_size, "factorised")
    loop_rate, vector_rate = args.loop_samples / loop_seconds, args.samples / vector_seconds
    return {
        "case": case.name,
        "target": case.target,
        "shape": [layer.out_features, layer.in_features],
        "loop_samples": args.loop_samples,
        "samples": args.samples,
        "loop_samples_per_s": loop_rate,
        "vectorised_samples_per_s": vector_rate,
        "speedup": vector_rate / loop_rate,
        "end_to_end_samples_per_s": full["samples_per_s"],
        "bytes_per_sample": full["bytes_per_sample"],
        "factorised_end_to_end_samples_per_s": factorised and factorised["samples_per_s"],
        "factorised_bytes_per_sample": factorised and factorised["bytes_per_sample"],
        "max_factor_residual": max_residual,
        "max_relative_difference": max_relative_difference,
    }


def official_loop(backbone: nn.Module, target: str, inputs: dict[str, torch.Tensor], labels: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """The official OCD procedure: per sample, a deep copy of the model and Adam on the target weight alone
    (batch 1); ``I(x)`` recorded by hooks during the first forward. Returns the deltas ``(n, out, in)``."""
    deltas = []
    for index in range(labels.shape[0]):
        model = copy.deepcopy(backbone)
        _, layer = find_target_linear(model, target)
        for parameter in model.parameters():
            parameter.requires_grad_(parameter is layer.weight)
        base = layer.weight.detach().clone()
        optimizer = torch.optim.Adam([layer.weight], lr=lr)
        sample = {name: value[index : index + 1] for name, value in inputs.items()}
        conditioning: dict[str, Any] = {}

        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            conditioning.setdefault("io", (args[0].detach(), output.detach()))

        handle = layer.register_forward_hook(record)
        for _ in range(steps):
            optimizer.zero_grad()
            output = model_output_tensor(model(**sample))
            conditioning.setdefault("output", output.detach())
            F.cross_entropy(output, labels[index : index + 1]).backward()
            optimizer.step()
        handle.remove()
        deltas.append(layer.weight.detach() - base)
    return torch.stack(deltas)


def ocd_hf_harvest(
    backbone: nn.Module, target: str, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int, lr: float, steps: int,
    split_prefix: bool = True,
) -> list[torch.Tensor]:
    """``harvest_batch`` (full storage) over every sample: the deltas ``(batch, out, in)`` of each batch (not concatenated:
    a harvest writes batch by batch); ``split_prefix=False`` re-runs the network before the target at every step (the
    path before the split)."""
    _, layer = find_target_linear(backbone, target)
    deltas = []
    for start in range(0, labels.shape[0], batch_size):
        end = min(start + batch_size, labels.shape[0])
        batch = {name: value[start:end] for name, value in inputs.items()}
        columns, _ = harvest_batch(
            backbone, layer, batch, labels[start:end], torch.arange(start, end), task="classification", lr=lr, steps=steps,
            split_prefix=split_prefix,
        )
        deltas.append(columns["delta"])
    return deltas


def first_rows(batches: list[torch.Tensor], rows: int) -> torch.Tensor:
    """The first ``rows`` rows of a list of batches."""
    taken, count = [], 0
    for batch in batches:
        if count >= rows:
            break
        taken.append(batch[: rows - count])
        count += taken[-1].shape[0]
    return torch.cat(taken)


# The end-to-end harvest is also timed on this many times --samples rows, to separate its per-harvest fixed cost
# (dataset checks, card, finalisation, reload) from its per-sample rate; and on TINY_ROWS rows, whose time is
# almost all fixed cost (a direct check of the two-size estimate, whose noise is a few % of the larger harvest).
LARGE_FACTOR = 4
TINY_ROWS = 16


def fixed_cost_and_rate(small_rows: int, small_seconds: float, large_rows: int, large_seconds: float) -> tuple[float, float | None]:
    """``(fixed seconds, samples/s)`` of ``T(n) = fixed + n / rate`` through two timings; the rate is ``None`` when the
    larger harvest was not slower (noise larger than its extra work)."""
    extra = large_seconds - small_seconds
    if extra <= 0:
        return small_seconds, None
    rate = (large_rows - small_rows) / extra
    return small_seconds - small_rows / rate, rate


def harvest_end_to_end(backbone: nn.Module, target: str, dataset: Dataset) -> float:
    """Seconds of ``harvest_deltas`` with its defaults (storage ``"auto"``, batch size by path) into a fresh directory:
    reading the dataset, the harvest, writing and checking the shards, the dataset card, loading the result."""
    with tempfile.TemporaryDirectory() as directory:
        return timed(lambda: harvest_deltas(backbone, dataset, target, directory, progress=False))[1]


def matmul_flops_per_s(size: int = 1024, repeats: int = 5) -> float:
    """The rate of a large float32 matmul on this thread count: the FLOP limit's yardstick."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b)[1] for _ in range(repeats))
    return 2 * size**3 / best


def unavoidable_flops(backbone: nn.Module, target: str, inputs: dict[str, torch.Tensor], steps: int) -> float:
    """FLOPs per sample of the work no harvest can skip: one forward of the network, then per step a forward
    and a backward (≈ 2 forwards) of the target's output shift and of the network after the target, and
    Adam's element-wise work (~10 FLOPs per weight entry)."""
    _, layer = find_target_linear(backbone, target)
    batch = next(iter(inputs.values())).shape[0]
    counter = FlopCounterMode(display=False)
    before_target: dict[str, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        before_target.setdefault("flops", counter.get_total_flops())

    handle = layer.register_forward_pre_hook(record)
    with torch.no_grad(), counter:
        backbone(**inputs)
    handle.remove()
    total = counter.get_total_flops() / batch
    prefix = before_target["flops"] / batch
    after = total - prefix  # the target itself (its shift Δx costs as much) and everything after it
    return total + steps * 2 * after + steps * 10 * layer.weight.numel()


def side_by_side_case(case: Case, args: argparse.Namespace, matmul_rate: float) -> dict[str, Any]:
    backbone, inputs, labels, layer, loop_inputs = prepare_case(case, args)
    loop_labels = labels[: args.loop_samples]
    per_token = describe_backbone(backbone, case.target, {k: v[:2] for k, v in inputs.items()})["per_token"]
    batch_size = args.batch_size or default_batch_size(per_token, layer)[0]  # harvest_deltas' default
    path = overfit_deltas(backbone, layer, {k: v[:batch_size] for k, v in inputs.items()}, labels[:batch_size], steps=1).path
    # Image columns as a .map would leave them (nested lists): what harvest_deltas reads in practice.
    dataset = Dataset.from_dict({**{name: value.numpy() for name, value in inputs.items()}, "label": labels.numpy()})
    large_rows = LARGE_FACTOR * args.samples
    generator = torch.Generator().manual_seed(1)
    large_inputs = case.data(large_rows, generator)
    large_labels = torch.randint(0, case.num_labels, (large_rows,), generator=generator)
    large = Dataset.from_dict({**{name: value.numpy() for name, value in large_inputs.items()}, "label": large_labels.numpy()})
    official_loop(backbone, case.target, {k: v[:2] for k, v in inputs.items()}, labels[:2], args.lr, args.steps)  # warm-up
    ocd_hf_harvest(backbone, case.target, {k: v[:batch_size] for k, v in inputs.items()}, labels[:batch_size], batch_size, args.lr, args.steps)
    official_rates, ocd_rates, unsplit_rates, end_to_end_rates, small_seconds, large_seconds = [], [], [], [], [], []
    tiny, tiny_seconds = dataset.select(range(TINY_ROWS)), []
    for _ in range(args.repeats):  # interleaved: a drifting machine speed hits both alike
        official_deltas, seconds = timed(lambda: official_loop(backbone, case.target, loop_inputs, loop_labels, args.lr, args.steps))
        official_rates.append(args.loop_samples / seconds)
        ocd_deltas, seconds = timed(lambda: ocd_hf_harvest(backbone, case.target, inputs, labels, batch_size, args.lr, args.steps))
        ocd_rates.append(args.samples / seconds)
        small_seconds.append(harvest_end_to_end(backbone, case.target, dataset))
        end_to_end_rates.append(args.samples / small_seconds[-1])
        large_seconds.append(harvest_end_to_end(backbone, case.target, large))
        tiny_seconds.append(harvest_end_to_end(backbone, case.target, tiny))
        if path.endswith("_split"):  # the same harvest with the whole network re-run at every step
            unsplit_deltas, seconds = timed(
                lambda: ocd_hf_harvest(backbone, case.target, inputs, labels, batch_size, args.lr, args.steps, split_prefix=False)
            )
            unsplit_rates.append(args.samples / seconds)
            for unsplit, split in zip(unsplit_deltas, ocd_deltas):
                torch.testing.assert_close(unsplit, split, rtol=0, atol=0)
    difference = (first_rows(ocd_deltas, args.loop_samples) - official_deltas).abs().amax().item()
    limit = matmul_rate / unavoidable_flops(backbone, case.target, {k: v[:batch_size] for k, v in inputs.items()}, args.steps)
    ocd_rate, end_to_end_rate = statistics.median(ocd_rates), statistics.median(end_to_end_rates)
    # Per repeat (its two harvests ran back to back, under the same load), then the median.
    estimates = [fixed_cost_and_rate(args.samples, small, large_rows, large) for small, large in zip(small_seconds, large_seconds)]
    fixed_seconds = statistics.median(fixed for fixed, _ in estimates)
    rates = [rate for _, rate in estimates if rate is not None]
    per_sample_rate = statistics.median(rates) if rates else None
    return {
        "case": case.name,
        "target": case.target,
        "shape": [layer.out_features, layer.in_features],
        "path": path,
        "batch_size": batch_size,
        "official_samples_per_s": statistics.median(official_rates),
        "ocd_hf_samples_per_s": ocd_rate,
        "ratio": statistics.median(o / f for o, f in zip(ocd_rates, official_rates)),
        "ratios": [o / f for o, f in zip(ocd_rates, official_rates)],
        "end_to_end_samples_per_s": end_to_end_rate,
        "end_to_end_ratio": statistics.median(e / f for e, f in zip(end_to_end_rates, official_rates)),
        "end_to_end_seconds": small_seconds,
        "end_to_end_large_rows": large_rows,
        "end_to_end_large_seconds": large_seconds,
        "end_to_end_fixed_seconds": fixed_seconds,
        "end_to_end_fixed_seconds_by_repeat": [fixed for fixed, _ in estimates],
        "end_to_end_tiny_rows": TINY_ROWS,
        "end_to_end_tiny_seconds": tiny_seconds,
        "end_to_end_per_sample_rate": per_sample_rate,
        "end_to_end_per_sample_ratio": per_sample_rate and per_sample_rate / statistics.median(official_rates),
        "unsplit_samples_per_s": statistics.median(unsplit_rates) if unsplit_rates else None,
        "unsplit_ratio": statistics.median(u / f for u, f in zip(unsplit_rates, official_rates)) if unsplit_rates else None,
        "max_abs_delta_difference": difference,
        "max_delta_difference_relative": difference / official_deltas.abs().amax().item(),
        "weight_ulp": torch.finfo(torch.float32).eps * layer.weight.detach().abs().amax().item(),
        "flop_limit_samples_per_s": limit,
        "fraction_of_flop_limit": ocd_rate / limit,
    }


def side_by_side_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| case | layer (out x in) | ocd-hf path (batch) | official samples/s | ocd-hf samples/s | ratio "
        "| harvest_deltas end to end: samples/s (ratio) | end to end: fixed s (" f"{TINY_ROWS}-row harvest s) + samples/s (ratio) "
        "| without the split: samples/s (ratio) | FLOP-limit samples/s | fraction of limit | max delta diff (abs / rel) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | `{r['target']}` {r['shape'][0]}x{r['shape'][1]} | {r['path']} ({r['batch_size']}) | "
            f"{r['official_samples_per_s']:.0f} | {r['ocd_hf_samples_per_s']:.0f} | {r['ratio']:.1f}x | "
            f"{r['end_to_end_samples_per_s']:.0f} ({r['end_to_end_ratio']:.1f}x) | "
            f"{r['end_to_end_fixed_seconds']:.3f} ({statistics.median(r['end_to_end_tiny_seconds']):.3f}) + "
            f"{_cell(r['end_to_end_per_sample_rate'], '{:.0f}')}"
            f"{_cell(r['end_to_end_per_sample_ratio'], ' ({:.1f}x)') if r['end_to_end_per_sample_ratio'] else ''} | "
            f"{_cell(r['unsplit_samples_per_s'], '{:.0f}')}{_cell(r['unsplit_ratio'], ' ({:.1f}x)') if r['unsplit_ratio'] else ''} | "
            f"{r['flop_limit_samples_per_s']:.0f} | {r['fraction_of_flop_limit']:.1%} | "
            f"{r['max_abs_delta_difference']:.1e} / {r['max_delta_difference_relative']:.1e} |"
        )
    return "\n".join(lines)


def run_side_by_side(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()
    matmul_rate = matmul_flops_per_s()
    results = []
    for case in CASES:
        results.append(side_by_side_case(case, args, matmul_rate))
        print(f"done: {case.name}", flush=True)
    table = side_by_side_table(results)
    print(table)
    report = json.loads(args.output.read_text(encoding="utf-8")) if args.output.is_file() else {}
    report["official"] = {
        "settings": {key: value for key, value in vars(args).items() if key != "output"},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matmul_gflops": matmul_rate / 1e9,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "results": results,
        "table": table,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| case | layer (out x in) | loop samples/s | vectorised samples/s | speed-up | harvest_deltas samples/s full / factorised "
        "| bytes/sample full / factorised | max residual ‖Δ−u sign(x)ᵀ‖/‖Δ‖ | max rel. diff vs loop |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | `{r['target']}` {r['shape'][0]}x{r['shape'][1]} | {r['loop_samples_per_s']:.0f} | "
            f"{r['vectorised_samples_per_s']:.0f} | {r['speedup']:.1f}x | {r['end_to_end_samples_per_s']:.0f} / "
            f"{_cell(r['factorised_end_to_end_samples_per_s'], '{:.0f}')} | {r['bytes_per_sample']:,.0f} / "
            f"{_cell(r['factorised_bytes_per_sample'], '{:,.0f}')} | {_cell(r['max_factor_residual'], '{:.1e}')} | "
            f"{r['max_relative_difference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512, help="samples for the vectorised and end-to-end runs")
    parser.add_argument("--loop-samples", type=int, default=48, help="samples for the per-sample loop")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default mode: 64; official mode: harvest_deltas' default for the layer (by path)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "harvest.json")
    parser.add_argument("--mode", choices=["default", "official"], default="default",
                        help="official: side by side with the official per-sample procedure (see above)")
    parser.add_argument("--repeats", type=int, default=3, help="official mode: interleaved repeats")
    args = parser.parse_args()
    if args.loop_samples > args.samples:
        parser.error("--loop-samples must not exceed --samples")
    torch.set_num_threads(args.threads)
    if args.mode == "official":
        run_side_by_side(args)
        return
    args.batch_size = args.batch_size or 64

    results = []
    for case in CASES:
        results.append(run_case(case, args))
        print(f"done: {case.name}", flush=True)
    table = markdown_table(results)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key != "output"}
    previous = json.loads(args.output.read_text(encoding="utf-8")) if args.output.is_file() else {}
    report = {
        **({"official": previous["official"]} if "official" in previous else {}),
        "settings": settings,
        "torch": torch.__version__,
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "results": results,
        "table": table,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
