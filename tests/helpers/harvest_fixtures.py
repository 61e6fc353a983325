"""Tiny, seeded backbones and source datasets shared by the harvest tests and their subprocess scripts.

Every builder seeds torch itself, so a subprocess rebuilds exactly the backbone and data of the test.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DeiTConfig,
    DeiTForImageClassification,
    PreTrainedModel,
)

from helpers.models import TinyMLPConfig, TinyMLPRegressor

# name -> (backbone kind, target module)
CASES = {
    "bert-classifier": ("bert", "classifier"),
    "bert-intermediate": ("bert", "intermediate.dense"),
    "deit-classifier": ("deit", "classifier"),
    "mlp-regression": ("mlp", "fc2"),
}


def build_backbone(kind: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
        )
        return BertForSequenceClassification(config).eval()
    if kind == "deit":
        config = DeiTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=3,
        )
        return DeiTForImageClassification(config).eval()
    if kind == "mlp":
        return TinyMLPRegressor(TinyMLPConfig()).eval()
    raise ValueError(f"unknown backbone kind {kind!r}")


def build_dataset(kind: str, num_samples: int, seed: int = 1) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    if kind == "bert":
        input_ids = torch.randint(1, 50, (num_samples, 7), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[::2, 5:] = 0  # some padded rows, so pooling must respect the mask
        return Dataset.from_dict(
            {
                "input_ids": input_ids.tolist(),
                "attention_mask": attention_mask.tolist(),
                "label": torch.randint(0, 3, (num_samples,), generator=generator).tolist(),
            }
        )
    if kind == "deit":
        return Dataset.from_dict(
            {
                "pixel_values": torch.randn(num_samples, 3, 8, 8, generator=generator).numpy(),
                "label": torch.randint(0, 3, (num_samples,), generator=generator).tolist(),
            }
        )
    if kind == "mlp":
        return Dataset.from_dict(
            {
                "features": torch.randn(num_samples, 6, generator=generator).numpy(),
                "label": torch.randn(num_samples, generator=generator).tolist(),
            }
        )
    raise ValueError(f"unknown dataset kind {kind!r}")
