"""Mc-Di few-shot head speed: harvest throughput, per-task head latency and harvest memory, on one thread.

    python bench/fewshot.py [--quick] [--repeats 3] [--batch-sizes 32 64 256 1024] [--min-fit-tasks 256]
                            [--harvest-tasks 2048] [--memory-tasks 5000] [--threads 1]

The data are SYNTHETIC: normalised 384-d embeddings (all-MiniLM-L6-v2's size) drawn around 100 random
class centres on the sphere, 60 items per class. Speed does not depend on the values (only scikit-learn's
iteration count does, a little), and the generator is an untrained ``McDiHeadGenerator`` with the default
config, which costs exactly what a trained one costs. Every task is 5-way.

1. Harvest throughput (5-way heads per minute; target >= 10 000 on one core): (a) ``fit_task_heads`` alone
   with the recipe's settings (100 Adam steps, lr 0.005, 3 local targets), fitted on the support (K = 1) and
   on a pool of 20 more items per class, at several batch sizes; (b) ``harvest_task_heads`` end to end
   (episode sampling, fitting, writing the sharded weight dataset, finalising) at the harvest's batch size.
2. Per-task latency (ms per task): ``generate_heads`` (one draw, the default 21 denoising steps) for one
   task and batched over 64 and 600 tasks, against ``logistic_regression_heads`` (scikit-learn, SetFit's
   default head; target: generation <= it when batched over >= 64 tasks), ``fit_task_heads`` for the
   harvest's M = 100 steps on the support (batched and one task at a time) and ``prototype_heads``.
3. Memory: peak resident set size of a fresh process while ``harvest_task_heads`` runs over
   ``--memory-tasks`` tasks (``--memory-tasks 50000`` for the issue's figure), sampled from
   ``/proc/self/status``, per quarter of the run; reported, not asserted (``--quick`` measures it in the
   benchmark's own process, saving a second start-up).

Timings of one section are interleaved over ``--repeats`` rounds (medians), so that ratios compare
figures measured under the same load; the load average is recorded with them. A figure that misses its
target gets a diagnosis: the top entries of a ``torch.profiler`` (or cProfile) run. Prints markdown
tables and writes ``bench/results/fewshot.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from torch.nn import functional as F

from ocd_hf import (
    EpisodeSampler,
    McDiConfig,
    McDiHeadGenerator,
    TaskDistribution,
    fit_task_heads,
    harvest_task_heads,
    load_harvest_metadata,
    logistic_regression_heads,
    prototype_heads,
)
from ocd_hf.task_heads import EpisodeTasks, task_losses

N_WAY = 5
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
HARVEST_TARGET = 10_000  # 5-way heads per minute on one core
SYNTHETIC = (
    "synthetic data: normalised 384-d embeddings around random class centres (all-MiniLM-L6-v2's size), not real text; "
    "the generator is untrained (default McDiConfig: it costs what a trained one costs)"
)
QUICK = {
    "repeats": 1, "batch_sizes": [32, 64], "min_fit_tasks": 64, "harvest_tasks": 128, "latency_batches": [64], "single_tasks": 2,
    "memory_tasks": 512, "memory_process": "same", "num_classes": 40, "profile_batch_size": 32,
}


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def synthetic_distribution(num_classes: int, items_per_class: int, spread: float, seed: int) -> TaskDistribution:
    """Normalised Gaussian clusters on the 384-d sphere: ``centre + spread · noise/√d`` (within-class cosine ≈ 1/(1+spread²))."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, EMBEDDING_DIM, generator=generator), dim=-1)
    labels = torch.arange(num_classes).repeat_interleave(items_per_class)
    noise = torch.randn(len(labels), EMBEDDING_DIM, generator=generator) * spread / EMBEDDING_DIM**0.5
    points = F.normalize(centres[labels] + noise, dim=-1)
    return TaskDistribution(Dataset.from_dict({"embedding": points.numpy(), "label": labels.numpy()}), name="synthetic-minilm")


def timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved(measurements: list[tuple[str, Callable[[], Any]]], repeats: int) -> dict[str, list[float]]:
    """Seconds of every measurement in each of ``repeats`` rounds, the measurements taking turns within a round."""
    seconds: dict[str, list[float]] = {name: [] for name, _ in measurements}
    for _ in range(repeats):
        for name, function in measurements:
            seconds[name].append(timed(function))
    return seconds


def torch_profile(function: Callable[[], Any], rows: int) -> list[dict[str, Any]]:
    """The top ``rows`` operators of one call of ``function`` by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    return [
        {"name": event.key, "self_cpu_ms": round(event.self_cpu_time_total / 1e3, 2), "self_percent": round(100 * event.self_cpu_time_total / total, 1),
         "calls": event.count}
        for event in events[:rows]
    ]


# Where a harvest's time goes: (file name, function) -> label.
HARVEST_PARTS = {
    ("task_heads.py", "harvest_task_heads"): "harvest_task_heads (total)",
    ("task_heads.py", "__call__"): "EpisodeTasks: drawing the episodes and fit items",
    ("task_heads.py", "fit_task_heads"): "fit_task_heads",
    ("weight_datasets.py", "write"): "ShardWriter.write: encoding and writing rows",
    ("weight_datasets.py", "__exit__"): "ShardWriter.__exit__: finalising, fsync, rename",
    ("weight_datasets.py", "finalize_weight_dataset"): "finalize_weight_dataset",
    ("task_heads.py", "load_task_heads"): "load_task_heads (the returned dataset)",
}


def python_profile(function: Callable[[], Any], rows: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """cProfile of one call of ``function``: the top ``rows`` functions by cumulative time (this file's wrappers left
    out), and the cumulative seconds of each of :data:`HARVEST_PARTS`."""
    profiler = cProfile.Profile()
    profiler.runcall(function)
    stats = pstats.Stats(profiler, stream=io.StringIO())
    entries, parts = [], {}
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if (Path(path).name, name) in HARVEST_PARTS:
            parts[HARVEST_PARTS[Path(path).name, name]] = parts.get(HARVEST_PARTS[Path(path).name, name], 0.0) + cumulative
        if path != __file__:
            entries.append({"function": f"{Path(path).name}:{line}({name})", "calls": calls, "own_s": round(own, 3), "cumulative_s": round(cumulative, 3)})
    top = sorted(entries, key=lambda entry: entry["cumulative_s"], reverse=True)[:rows]
    return top, {label: round(parts[label], 3) for label in HARVEST_PARTS.values() if label in parts}


# ----- 1. harvest throughput -------------------------------------------------------------------------


def fit_settings(args: argparse.Namespace) -> list[tuple[str, int]]:
    return [(fit_on, k_shot) for fit_on in ("support", "pool") for k_shot in args.harvest_shots]


def draw_fit_tasks(distribution: TaskDistribution, args: argparse.Namespace) -> dict[tuple[str, int], Any]:
    """The items each head is fitted on, ``max(batch sizes)`` tasks per setting, drawn by the harvest's own task source."""
    largest = max(*args.batch_sizes, args.min_fit_tasks)
    return {
        (fit_on, k_shot): EpisodeTasks(distribution, N_WAY, k_shot, fit_on=fit_on, pool_size=args.pool_size, seed=args.seed)(0, largest)
        for fit_on, k_shot in fit_settings(args)
    }


def fit_call(tasks: Any, batch: int, args: argparse.Namespace, total: int | None = None) -> Callable[[], Any]:
    """``fit_task_heads`` on ``total`` tasks (default ``batch``), ``batch`` tasks per call."""
    generator = torch.Generator().manual_seed(args.seed)
    chunks = [(tasks.fit_items[start : start + batch], tasks.fit_labels[start : start + batch]) for start in range(0, total or batch, batch)]
    return lambda: [
        fit_task_heads(items, labels, N_WAY, steps=args.steps, lr=args.lr, num_targets=args.num_targets, generator=generator) for items, labels in chunks
    ]


def fit_tasks_per_measurement(batch: int, args: argparse.Namespace) -> int:
    """Every fit measurement covers at least ``--min-fit-tasks`` tasks (whole batches)."""
    return batch * max(1, -(-args.min_fit_tasks // batch))


def measure_fit(tasks: dict[tuple[str, int], Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    for (fit_on, k_shot), batch in tasks.items():
        fit_call(batch, 8, args)()  # warm-up
    measurements = [
        (f"{fit_on}|{k_shot}|{batch}", fit_call(tasks[fit_on, k_shot], batch, args, fit_tasks_per_measurement(batch, args)))
        for fit_on, k_shot in tasks for batch in args.batch_sizes
    ]
    seconds = interleaved(measurements, args.repeats)
    rows = []
    for name, values in seconds.items():
        fit_on, k_shot, batch = name.split("|")
        median = statistics.median(values) / (fit_tasks_per_measurement(int(batch), args) // int(batch))  # seconds per call
        items = tasks[fit_on, int(k_shot)].fit_items.shape[1]
        # Without early stopping fit_task_heads keeps only θ_0 and the k targets, not the whole trajectory.
        states_mib = (args.num_targets + 1) * int(batch) * N_WAY * (EMBEDDING_DIM + 1) * 4 / 2**20
        rows.append({
            "fit_on": fit_on, "k_shot": int(k_shot), "items_per_task": items, "batch_size": int(batch),
            "tasks_per_measurement": fit_tasks_per_measurement(int(batch), args), "seconds": values,
            "heads_per_min": 60 * int(batch) / median, "ms_per_task": 1e3 * median / int(batch), "states_mib": states_mib,
        })
    return rows


def harvest_run(distribution: TaskDistribution, directory: str, num_tasks: int, fit_on: str, k_shot: int, args: argparse.Namespace) -> Any:
    return harvest_task_heads(
        distribution, directory, num_tasks=num_tasks, n_way=N_WAY, k_shot=k_shot, fit_on=fit_on, pool_size=args.pool_size,
        steps=args.steps, lr=args.lr, num_targets=args.num_targets, seed=args.seed, batch_size=args.harvest_batch_size,
        shard_size=args.shard_size, progress=False,
    )


def measure_harvest(distribution: TaskDistribution, fit_rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as directory:
        harvest_run(distribution, f"{directory}/warm-up", args.harvest_batch_size, "support", 1, args)
    rows = []
    for fit_on, k_shot in fit_settings(args):
        with tempfile.TemporaryDirectory() as directory:
            seconds = timed(lambda: harvest_run(distribution, directory, args.harvest_tasks, fit_on, k_shot, args))
            metadata = load_harvest_metadata(directory)
        rate = 60 * args.harvest_tasks / seconds
        alone = next((r for r in fit_rows if (r["fit_on"], r["k_shot"], r["batch_size"]) == (fit_on, k_shot, args.harvest_batch_size)), None)
        rows.append({
            "fit_on": fit_on, "k_shot": k_shot, "tasks": args.harvest_tasks, "batch_size": args.harvest_batch_size, "seconds": seconds,
            "heads_per_min": rate, "fit_alone_heads_per_min": alone and alone["heads_per_min"],
            "overhead_fraction": alone and 1 - rate / alone["heads_per_min"], "bytes_per_task": metadata["bytes_per_sample"],
        })
    return rows


def gradient_layouts(tasks: Any, batch: int, repeats: int) -> dict[str, float]:
    """Diagnosis (not library code): one loss-and-gradient step of ``task_losses`` against the same loss with the
    logits laid out ``(B, N, n)`` (``W @ itemsᵀ``), so that the weight gradient is ``(B, N, n) @ (B, n, d)``."""
    items, labels = tasks.fit_items[:batch], tasks.fit_labels[:batch]
    weights = torch.ones(labels.shape, dtype=items.dtype)
    heads = (0.01 * torch.randn(batch, N_WAY, EMBEDDING_DIM + 1)).requires_grad_(True)

    def library() -> torch.Tensor:
        return torch.autograd.grad(task_losses(heads, items, labels, weights).sum(), heads)[0]

    def transposed() -> torch.Tensor:
        logits = torch.baddbmm(heads[:, :, -1:], heads[:, :, :-1], items.transpose(1, 2))  # (B, N, n)
        per_task = (F.cross_entropy(logits, labels, reduction="none") * weights).sum(1) / weights.sum(1)
        return torch.autograd.grad(per_task.sum(), heads)[0]

    difference = (library() - transposed()).abs().max().item()
    seconds = interleaved([("library", lambda: [library() for _ in range(5)]), ("transposed", lambda: [transposed() for _ in range(5)])], repeats)
    library_ms, transposed_ms = (1e3 * statistics.median(seconds[name]) / 5 for name in ("library", "transposed"))
    return {"batch_size": batch, "items_per_task": items.shape[1], "library_ms_per_step": library_ms, "transposed_ms_per_step": transposed_ms,
            "speedup": library_ms / transposed_ms, "max_gradient_difference": difference}


# ----- 2. per-task latency ---------------------------------------------------------------------------


def measure_latency(distribution: TaskDistribution, generator_model: McDiHeadGenerator, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for k_shot in args.shots:
        largest = max(args.latency_batches)
        episodes = EpisodeSampler(distribution, N_WAY, k_shot, args.queries, seed=args.seed + 1).sample(largest, column="embedding")
        support, labels = episodes.support, episodes.support_labels
        noise = torch.Generator().manual_seed(args.seed)
        single = range(args.single_tasks)

        def generate(batch: int) -> Callable[[], Any]:
            return lambda: generator_model.generate_heads(support[:batch], labels[:batch], num_samples=1, generator=noise)

        def fit(batch: int) -> Callable[[], Any]:
            return lambda: fit_task_heads(support[:batch], labels[:batch], N_WAY, steps=args.steps, lr=args.lr, num_targets=args.num_targets)

        batch = 64
        methods: list[tuple[str, str, int, Callable[[], Any]]] = [
            ("Mc-Di generate_heads", "1 task per call", args.single_tasks,
             lambda: [generator_model.generate_heads(support[i], labels[i], num_samples=1, generator=noise) for i in single]),
            *[("Mc-Di generate_heads", f"batch {b}", b, generate(b)) for b in args.latency_batches],
            ("logistic_regression_heads", f"{batch} tasks (a loop)", batch, lambda: logistic_regression_heads(support[:batch], labels[:batch], N_WAY)),
            ("fit_task_heads, M=100 on the support", f"batch {batch}", batch, fit(batch)),
            ("fit_task_heads, M=100 on the support", "1 task per call", args.single_tasks,
             lambda: [fit_task_heads(support[i : i + 1], labels[i : i + 1], N_WAY, steps=args.steps, lr=args.lr, num_targets=args.num_targets)
                      for i in single]),
            ("prototype_heads", f"{batch} tasks", batch, lambda: prototype_heads(support[:batch], labels[:batch], N_WAY)),
        ]
        for _, _, _, function in methods:
            function()  # warm-up
        seconds = interleaved([(f"{method}|{how}", function) for method, how, _, function in methods], args.repeats)
        for method, how, tasks, _ in methods:
            values = seconds[f"{method}|{how}"]
            rows.append({"k_shot": k_shot, "method": method, "how": how, "tasks": tasks, "seconds": values,
                         "ms_per_task": 1e3 * statistics.median(values) / tasks})
        reference = next(r["ms_per_task"] for r in rows if r["k_shot"] == k_shot and r["method"] == "logistic_regression_heads")
        for row in rows:
            if row["k_shot"] == k_shot:
                row["ratio_to_logistic_regression"] = row["ms_per_task"] / reference
    return rows


def generator_flops(generator_model: McDiHeadGenerator, distribution: TaskDistribution, k_shot: int) -> float:
    """Floating-point operations of generating one task's head (FlopCounterMode: matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode

    episodes = EpisodeSampler(distribution, N_WAY, k_shot, 1, seed=0).sample(1, column="embedding")
    with FlopCounterMode(display=False) as counter:
        generator_model.generate_heads(episodes.support, episodes.support_labels)
    return float(counter.get_total_flops())


# ----- 3. memory ------------------------------------------------------------------------------------


def proc_status() -> dict[str, float]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` in MiB (``ru_maxrss`` only where /proc is missing)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"VmRSS": peak, "VmHWM": peak, "RssAnon": float("nan"), "RssFile": float("nan")}
    values = {line.split(":")[0]: line.split()[1] for line in lines if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))}
    return {key: int(value) / 1024 for key, value in values.items()}


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Harvest ``--memory-tasks`` tasks while a thread samples the resident set every 20 ms (run in a fresh process,
    or with ``--memory-process same`` in this one)."""
    torch.set_num_threads(args.threads)
    distribution = synthetic_distribution(args.num_classes, args.items_per_class, args.spread, args.seed)
    distribution.features("embedding")
    before = proc_status()
    samples: list[tuple[float, float, float]] = []
    done = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while not done.is_set():
            status = proc_status()
            samples.append((time.perf_counter() - start, status["VmRSS"], status["RssAnon"]))
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as directory:
        harvest_run(distribution, directory, args.memory_tasks, args.memory_fit_on, 1, args)
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
        metadata = load_harvest_metadata(directory)
    after = proc_status()
    quarters = []
    for index in range(4):
        inside = [s for s in samples if index * seconds / 4 <= s[0] < (index + 1) * seconds / 4] or samples[-1:]
        quarters.append({"peak_rss_mib": max(s[1] for s in inside), "peak_anon_mib": max(s[2] for s in inside)})
    return {
        "tasks": args.memory_tasks, "process": args.memory_process, "fit_on": args.memory_fit_on, "k_shot": 1, "batch_size": args.harvest_batch_size,
        "shard_size": args.shard_size,
        "seconds": seconds, "heads_per_min": 60 * args.memory_tasks / seconds, "rss_before_mib": before["VmRSS"],
        "anon_before_mib": before["RssAnon"], "peak_before_mib": before["VmHWM"], "peak_rss_mib": after["VmHWM"],
        "sampled_peak_rss_mib": max(s[1] for s in samples), "sampled_peak_anon_mib": max(s[2] for s in samples),
        "growth_mib": max(s[1] for s in samples) - before["VmRSS"], "anon_growth_mib": max(s[2] for s in samples) - before["RssAnon"],
        "quarters": quarters, "samples": len(samples), "data_mib": metadata["data_bytes"] / 2**20, "load_average": load_average(),
    }


def run_memory_child(args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child-memory", *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"the memory measurement failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


# ----- report ---------------------------------------------------------------------------------------


def targets(fit_rows: list[dict[str, Any]], harvest_rows: list[dict[str, Any]], latency_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for r in fit_rows:
        checks.append({"target": f"fit_task_heads ≥ {HARVEST_TARGET:,} heads/min", "setting": f"fit on {r['fit_on']}, K={r['k_shot']}, batch {r['batch_size']}",
                       "figure": r["heads_per_min"], "met": r["heads_per_min"] >= HARVEST_TARGET})
    for r in harvest_rows:
        checks.append({"target": f"harvest_task_heads end to end ≥ {HARVEST_TARGET:,} heads/min",
                       "setting": f"fit on {r['fit_on']}, K={r['k_shot']}, batch {r['batch_size']}", "figure": r["heads_per_min"],
                       "met": r["heads_per_min"] >= HARVEST_TARGET})
    for r in latency_rows:
        if r["method"] == "Mc-Di generate_heads" and r["tasks"] >= 64 and r["how"].startswith("batch"):
            checks.append({"target": "generate_heads ms/task ≤ logistic regression's", "setting": f"K={r['k_shot']}, {r['how']}",
                           "figure": r["ratio_to_logistic_regression"], "met": r["ratio_to_logistic_regression"] <= 1.0})
    return checks


def markdown(report: dict[str, Any]) -> str:
    load = ", ".join(f"{when} {values}" for when, values in report["load_average"].items())
    out = [f"_{SYNTHETIC}; {report['settings']['threads']} thread(s); torch {report['torch']}; load average (1/5/15 min): {load}._", ""]
    settings = report["settings"]
    out += [f"### 1a. `fit_task_heads` alone ({settings['steps']} Adam steps, lr {settings['lr']}, {settings['num_targets']} targets; "
            f"≥ {settings['min_fit_tasks']} tasks per measurement, median of {settings['repeats']} interleaved rounds)", "",
            "| fit on | K | items/task | batch | heads/min | ms/task | head states kept (MiB) | ≥ 10 000/min |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["fit"]:
        out.append(f"| {r['fit_on']} | {r['k_shot']} | {r['items_per_task']} | {r['batch_size']} | {r['heads_per_min']:,.0f} | {r['ms_per_task']:.2f} | "
                   f"{r['states_mib']:,.1f} | {'yes' if r['heads_per_min'] >= HARVEST_TARGET else 'NO'} |")
    out += ["", "### 1b. `harvest_task_heads` end to end (sampling, fitting, writing shards, finalising; one run each)", "",
            "| fit on | K | tasks | batch | heads/min | fit alone heads/min | overhead | bytes/task | ≥ 10 000/min |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["harvest"]:
        alone = "n/a" if r["fit_alone_heads_per_min"] is None else f"{r['fit_alone_heads_per_min']:,.0f}"
        overhead = "n/a" if r["overhead_fraction"] is None else f"{100 * r['overhead_fraction']:.0f}%"
        out.append(f"| {r['fit_on']} | {r['k_shot']} | {r['tasks']:,} | {r['batch_size']} | {r['heads_per_min']:,.0f} | {alone} | {overhead} | "
                   f"{r['bytes_per_task']:,.0f} | {'yes' if r['heads_per_min'] >= HARVEST_TARGET else 'NO'} |")
    out += ["", "### 2. Per-task latency (one draw, 21 denoising steps; ratios measured in the same run)", "",
            "| K | method | how | ms/task | × logistic regression |", "|---:|---|---|---:|---:|"]
    for r in report["latency"]:
        out.append(f"| {r['k_shot']} | {r['method']} | {r['how']} | {r['ms_per_task']:.3f} | {r['ratio_to_logistic_regression']:.2f} |")
    flops = report["generator"]
    out += ["", f"Generator: {flops['parameters'] / 1e6:.2f} M parameters, {flops['mflop_per_task']:.0f} MFLOP per task (matmuls), "
            f"{flops['achieved_gflops']:.0f} GFLOP/s achieved at batch {flops['batch']} (K={flops['k_shot']})."]
    m = report["memory"]
    quarters = " / ".join(f"{q['peak_rss_mib']:,.0f}" for q in m["quarters"])
    anon_quarters = " / ".join(f"{q['peak_anon_mib']:,.0f}" for q in m["quarters"])
    out += ["", f"### 3. Memory: `harvest_task_heads` over {m['tasks']:,} tasks ({m['process']} process, fit on {m['fit_on']}, K=1, batch {m['batch_size']}, "
            f"shards of {m['shard_size']})", "", "| | MiB |", "|---|---:|",
            f"| resident before the harvest | {m['rss_before_mib']:,.0f} |",
            f"| peak resident during the harvest (sampled) | {m['sampled_peak_rss_mib']:,.0f} |",
            f"| growth over before (anonymous memory only) | {m['growth_mib']:+,.0f} ({m['anon_growth_mib']:+,.0f}) |",
            f"| peak resident per quarter of the run (anonymous only) | {quarters} ({anon_quarters}) |",
            f"| process VmHWM (whole process{'' if m['process'] == 'fresh' else ', earlier sections included'}) | {m['peak_rss_mib']:,.0f} |",
            f"| weight dataset on disk | {m['data_mib']:,.1f} |",
            "", f"{m['seconds']:.1f} s, {m['heads_per_min']:,.0f} heads/min, load average {m['load_average']}. Resident memory counts the "
            "pages of the memory-mapped shards that were read (file-backed, clean, reclaimable): finalising the dataset reads "
            "every shard's ids and step counts, so that part grows with the dataset in the last quarter; anonymous memory is "
            "what the harvest holds."]
    out += ["", "### Targets", "", "| target | setting | figure | met |", "|---|---|---:|---|"]
    for c in report["targets"]:
        figure = f"{c['figure']:,.0f} heads/min" if "heads/min" in c["target"] else f"{c['figure']:.2f} × LR"
        out.append(f"| {c['target']} | {c['setting']} | {figure} | {'yes' if c['met'] else 'NO'} |")
    for name, diagnosis in report["diagnosis"].items():
        out += ["", f"### Diagnosis: {name}", "", diagnosis["why"], ""]
        if "layouts" in diagnosis:
            g = diagnosis["layouts"]
            out += [f"One loss+gradient step, batch {g['batch_size']}, {g['items_per_task']} items/task: library layout {g['library_ms_per_step']:.1f} ms, "
                    f"logits as W @ itemsᵀ {g['transposed_ms_per_step']:.1f} ms ({g['speedup']:.1f}×; max gradient difference "
                    f"{g['max_gradient_difference']:.1e}).", ""]
        if "torch_profile" in diagnosis:
            out += [f"`torch.profiler`, {diagnosis['profiled']}:", "", "| operator | self CPU ms | % | calls |", "|---|---:|---:|---:|"]
            out += [f"| `{e['name']}` | {e['self_cpu_ms']:.1f} | {e['self_percent']:.1f} | {e['calls']} |" for e in diagnosis["torch_profile"]]
        if "parts" in diagnosis:
            out += [f"cProfile, {diagnosis['profiled']}:", "", "| part | cumulative s |", "|---|---:|"]
            out += [f"| {label} | {seconds:.3f} |" for label, seconds in diagnosis["parts"].items()]
            out += [""]
        if "python_profile" in diagnosis:
            out += ["| function | calls | own s | cumulative s |", "|---|---:|---:|---:|"]
            out += [f"| `{e['function']}` | {e['calls']} | {e['own_s']:.3f} | {e['cumulative_s']:.3f} |" for e in diagnosis["python_profile"]]
    return "\n".join(out)


def diagnose(report: dict[str, Any], distribution: TaskDistribution, fit_tasks: dict[tuple[str, int], Any], generator_model: McDiHeadGenerator,
             args: argparse.Namespace) -> dict[str, Any]:
    diagnosis: dict[str, Any] = {}
    missed = [r for r in report["fit"] if r["heads_per_min"] < HARVEST_TARGET]
    if missed:
        worst = min(missed, key=lambda r: r["heads_per_min"])
        batch = args.profile_batch_size if args.profile_batch_size in args.batch_sizes else worst["batch_size"]
        tasks = fit_tasks[worst["fit_on"], worst["k_shot"]]
        diagnosis["fit_task_heads"] = {
            "why": ("fit_task_heads misses the target. Most of its time is aten::bmm: the logits are items @ Wᵀ, (B, n, N), so "
                    "autograd's weight gradient is itemsᵀ @ G, a (B, d, n) @ (B, n, N) product with only N = 5 output columns and a "
                    "transposed operand, several times slower than the forward aten::baddbmm of the same FLOPs. With the logits "
                    "laid out (B, N, n) (W @ itemsᵀ, which is also the layout cross_entropy wants) the gradient is G @ items, "
                    "(B, N, n) @ (B, n, d): measured below, same gradients. The largest aten::copy_ is the items repeated k+1 times "
                    "for the final losses (once per call). Library code not changed: a performance choice, not a bug."),
            "profiled": f"one call, fit on {worst['fit_on']}, K={worst['k_shot']}, batch {batch}",
            "torch_profile": torch_profile(fit_call(tasks, batch, args), args.profile_rows),
            "layouts": gradient_layouts(tasks, batch, max(args.repeats, 2)),
        }
    missed = [r for r in report["harvest"] if r["heads_per_min"] < HARVEST_TARGET]
    if missed:
        worst = min(missed, key=lambda r: r["heads_per_min"])
        tasks = min(args.harvest_tasks, 4 * args.harvest_batch_size)
        with tempfile.TemporaryDirectory() as directory:
            profile, parts = python_profile(lambda: harvest_run(distribution, directory, tasks, worst["fit_on"], worst["k_shot"], args), args.profile_rows)
        total = parts.get("harvest_task_heads (total)") or 1.0
        fitting = parts.get("fit_task_heads", 0.0)
        diagnosis["harvest_task_heads"] = {
            "why": (f"harvest_task_heads misses the target; fit_task_heads takes {100 * fitting / total:.0f}% of it (cProfile, whose own "
                    "overhead inflates the Python-heavy parts), so the harvest is as slow as its fit (see above)."),
            "profiled": f"{tasks} tasks, fit on {worst['fit_on']}, K={worst['k_shot']}, batch {args.harvest_batch_size}",
            "parts": parts,
            "python_profile": profile,
        }
    if any(not c["met"] for c in report["targets"] if c["target"].startswith("generate_heads")):
        g = report["generator"]
        episodes = EpisodeSampler(distribution, N_WAY, g["k_shot"], 1, seed=0).sample(64, column="embedding")
        diagnosis["generate_heads"] = {
            "why": (f"generate_heads misses the target. It runs the {g['parameters'] / 1e6:.1f} M-parameter denoiser on N = 5 row tokens at each "
                    f"of {g['denoising_steps']} steps: {g['mflop_per_task']:.0f} MFLOP per task, run at {g['achieved_gflops']:.0f} GFLOP/s, almost "
                    "all of it dense matmuls (aten::addmm below): compute, not overhead, so batching more tasks cannot remove it. At that "
                    "rate, matching logistic regression allows about "
                    + ", ".join(f"{budget:.0f} MFLOP per task at K={k}" for k, budget in g["flop_budget_mflop"].items())
                    + ": fewer denoising steps or a smaller denoiser."),
            "profiled": "one call, 64 tasks, K=" + str(g["k_shot"]),
            "torch_profile": torch_profile(lambda: generator_model.generate_heads(episodes.support, episodes.support_labels), args.profile_rows),
        }
    return diagnosis


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a smoke run of well under 30 s ({QUICK})")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (the target is per core)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of each timing section (medians)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 256, 1024], help="fit_task_heads batch sizes")
    parser.add_argument("--min-fit-tasks", type=int, default=256, help="tasks fitted per fit_task_heads measurement (whole batches)")
    parser.add_argument("--steps", type=int, default=100, help="Adam steps per head (the recipe's M)")
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--num-targets", type=int, default=3)
    parser.add_argument("--pool-size", type=int, default=20, help="extra items per class of a pool-fitted head")
    parser.add_argument("--harvest-shots", type=int, nargs="+", default=[1], help="K of the harvested tasks")
    parser.add_argument("--harvest-tasks", type=int, default=2048, help="tasks of each end-to-end harvest")
    parser.add_argument("--harvest-batch-size", type=int, default=32, help="harvest_task_heads batch size (its default, the recipe's)")
    parser.add_argument("--shard-size", type=int, default=1024, help="harvest_task_heads shard size (its default)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="K of the latency tasks")
    parser.add_argument("--queries", type=int, default=15, help="queries per class of the latency episodes (drawn, not timed)")
    parser.add_argument("--latency-batches", type=int, nargs="+", default=[64, 600], help="tasks per batched generate_heads call")
    parser.add_argument("--single-tasks", type=int, default=16, help="tasks timed one call at a time in the '1 task' rows")
    parser.add_argument("--memory-tasks", type=int, default=5000, help="tasks of the memory run (the issue's figure: 50000)")
    parser.add_argument("--memory-fit-on", choices=("support", "pool"), default="support")
    parser.add_argument("--memory-process", choices=("fresh", "same"), default="fresh",
                        help="measure memory in a fresh process (its peak is the harvest's own) or in this one (quicker; --quick)")
    parser.add_argument("--num-classes", type=int, default=100, help="classes of the synthetic distribution")
    parser.add_argument("--items-per-class", type=int, default=60)
    parser.add_argument("--spread", type=float, default=1.0, help="within-class noise (cosine to the centre ≈ 1/√(1+spread²))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile-batch-size", type=int, default=256, help="batch of the fit_task_heads profile, when a target is missed")
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "fewshot.json")
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)  # options given explicitly still win
    if args.harvest_batch_size not in args.batch_sizes:
        args.batch_sizes = sorted({*args.batch_sizes, args.harvest_batch_size})
    return args


def main() -> None:
    args = parse_args()
    from threadpoolctl import threadpool_limits

    _blas_threads = threadpool_limits(args.threads)  # scikit-learn's BLAS too, not only torch
    torch.set_num_threads(args.threads)
    if args.child_memory:
        print(json.dumps(memory_child(args)))
        return
    started, load = time.perf_counter(), {"start": load_average()}
    distribution = synthetic_distribution(args.num_classes, args.items_per_class, args.spread, args.seed)
    torch.manual_seed(args.seed)
    generator_model = McDiHeadGenerator(McDiConfig(embedding_dim=EMBEDDING_DIM, max_num_classes=N_WAY)).eval()

    fit_tasks = draw_fit_tasks(distribution, args)
    fit_rows = measure_fit(fit_tasks, args)
    load["after_fit"] = load_average()
    print(f"done: fit_task_heads ({time.perf_counter() - started:.0f} s)", flush=True)
    harvest_rows = measure_harvest(distribution, fit_rows, args)
    load["after_harvest"] = load_average()
    print(f"done: harvest_task_heads ({time.perf_counter() - started:.0f} s)", flush=True)
    latency_rows = measure_latency(distribution, generator_model, args)
    load["after_latency"] = load_average()
    print(f"done: latency ({time.perf_counter() - started:.0f} s)", flush=True)

    flop_shot = args.shots[-1]
    batched = [r for r in latency_rows if r["k_shot"] == flop_shot and r["method"] == "Mc-Di generate_heads" and r["how"].startswith("batch")]
    fastest = min(batched, key=lambda r: r["ms_per_task"])
    flops = generator_flops(generator_model, distribution, flop_shot)
    generator = {"parameters": sum(p.numel() for p in generator_model.parameters()), "mflop_per_task": flops / 1e6, "k_shot": flop_shot,
                 "batch": fastest["tasks"], "achieved_gflops": flops / (fastest["ms_per_task"] * 1e-3) / 1e9,
                 "denoising_steps": generator_model.config.num_timesteps, "config": generator_model.config.denoiser_config}
    # The work per task that would match logistic regression at the achieved rate (both measured in this run).
    generator["flop_budget_mflop"] = {
        k_shot: next(r["ms_per_task"] for r in latency_rows if r["k_shot"] == k_shot and r["method"] == "logistic_regression_heads")
        * 1e-3 * generator["achieved_gflops"] * 1e3
        for k_shot in args.shots
    }

    memory = run_memory_child(args) if args.memory_process == "fresh" else memory_child(args)
    load["after_memory"] = load_average()
    print(f"done: memory ({time.perf_counter() - started:.0f} s)", flush=True)
    report: dict[str, Any] = {
        "note": SYNTHETIC,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/fewshot.py", *sys.argv[1:]]),
        "settings": {key: value for key, value in vars(args).items() if key not in ("output", "child_memory")},
        "torch": torch.__version__,
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads()},
        "fit": fit_rows, "harvest": harvest_rows, "latency": latency_rows, "generator": generator, "memory": memory,
    }
    report["targets"] = targets(fit_rows, harvest_rows, latency_rows)
    report["diagnosis"] = diagnose(report, distribution, fit_tasks, generator_model, args)
    load["end"] = load_average()
    report["load_average"] = load
    report["seconds"] = time.perf_counter() - started
    table = markdown(report)
    report["table"] = table
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.output} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
