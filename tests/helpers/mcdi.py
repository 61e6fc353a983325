"""Tiny Mc-Di pieces shared by the Mc-Di tests and the contract: a seeded generator with random weights,
synthetic support sets, and a task distribution of Gaussian-cluster embeddings."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from ocd_hf.episodes import TaskDistribution
from ocd_hf.methods.mcdi import McDiConfig, McDiHeadGenerator

DIM = 8
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}


def tiny_generator(seed: int = 0, **config) -> McDiHeadGenerator:
    """A generator with random (not zero-initialised) weights, so that every path of the denoiser matters.
    (Exactness checks run it in float64: a float32 sum over classes in another order differs after 21 steps.)"""
    torch.manual_seed(seed)
    model = McDiHeadGenerator(McDiConfig(embedding_dim=DIM, max_num_classes=6, denoiser_config=TINY, head_scale=0.3,
                                         encoder_id="tiny-encoder", encoder_fingerprint="0123abcd", **config))
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.3)
    return model.eval()


def support_set(num_tasks: int = 1, n_way: int = 4, k_shot: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_tasks`` random support sets ``(B, N·K, DIM)`` with labels ``(B, N·K)`` grouped by label."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_way).repeat_interleave(k_shot).repeat(num_tasks, 1)
    return torch.randn(num_tasks, n_way * k_shot, DIM, generator=generator), labels


def gaussian_distribution(num_classes: int = 40, per_class: int = 20, dim: int = 16, spread: float = 1.0, seed: int = 0) -> TaskDistribution:
    """Classes are Gaussian clusters: item = class mean (N(0, I)) + ``spread`` · N(0, I), in column ``embedding``."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    embeddings = means[labels] + spread * rng.normal(size=(len(labels), dim))
    return TaskDistribution(Dataset.from_dict({"embedding": embeddings.astype(np.float32), "label": labels}))


def harvest_tiny_heads(directory) -> None:
    """24 tasks, 3-way 1-shot, d = 6, three local targets each, into ``directory``."""
    from ocd_hf.task_heads import harvest_task_heads

    harvest_task_heads(gaussian_distribution(num_classes=12, dim=6), directory, num_tasks=24, n_way=3, k_shot=1, steps=30,
                       batch_size=8, shard_size=8, progress=False, encoder_id="synthetic")
