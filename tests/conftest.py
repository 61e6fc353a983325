"""Shared fixtures: tiny backbones built from configs with random weights (no network)."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest_hub import loopback_hub  # noqa: F401  (the loopback Hub server fixture)
from helpers.models import TinyMLPRegressor
from helpers.models import tiny_mlp as helper_tiny_mlp
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DeiTConfig,
    DeiTForImageClassification,
)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread, and CI's subprocess tests share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def library_logs(caplog, monkeypatch):
    """``caplog``, seeing the ``ocd_hf`` logger's records: the library logger does not propagate to the root
    logger (where caplog listens) unless told to, and whether caplog sees it anyway depends on the pytest release."""
    monkeypatch.setattr(logging.getLogger("ocd_hf"), "propagate", True)
    return caplog


TINY_DENOISER = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
}


def tiny_bert(num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=num_labels
    )
    return BertForSequenceClassification(config).eval()


def tiny_deit(seed: int = 0) -> DeiTForImageClassification:
    torch.manual_seed(seed)
    config = DeiTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=4,
    )
    return DeiTForImageClassification(config).eval()


def tiny_mlp(seed: int = 0) -> TinyMLPRegressor:
    return helper_tiny_mlp(seed, in_features=6, hidden_size=12, num_hidden_layers=1)


def text_batch(batch: int = 4, length: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # one padded sequence: pooling must honour the mask
    return {"input_ids": torch.randint(0, 50, (batch, length), generator=gen), "attention_mask": mask}


def image_batch(batch: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 1, 8, 8, generator=gen)}


def tabular_batch(batch: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(batch, 6, generator=gen)}


# (backbone factory, target module, input factory): heads, a per-token layer, a regression model.
BACKBONE_CASES = {
    "bert-head": (tiny_bert, "classifier", text_batch),
    "bert-per-token": (tiny_bert, "intermediate.dense", text_batch),
    "deit-head": (tiny_deit, "classifier", image_batch),
    "mlp-regression": (tiny_mlp, "fc1", tabular_batch),
}


@pytest.fixture(params=sorted(BACKBONE_CASES))
def backbone_case(request):
    """A fresh tiny backbone, its target module name and an input batch."""
    make_backbone, target, make_inputs = BACKBONE_CASES[request.param]
    return make_backbone(), target, make_inputs()
