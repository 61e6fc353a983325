"""Tiny D2NWG pieces shared by the D2NWG tests: CPU-small component settings and a seeded generator with random
(not zero-initialised) weights, so that every path of every component matters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ocd_hf.methods.d2nwg import D2NWGConfig, D2NWGHeadGenerator

DIM = 8
TINY: dict[str, Any] = {
    "vae_config": {"latent_size": 6, "hidden_size": 32, "num_layers": 1},
    "encoder_config": {"code_size": 12, "hidden_size": 16, "num_heads": 2, "num_inducing": 4, "num_layers": 1, "slot_size": 4},
    "denoiser_config": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32},
    "projection_size": 8,
}


def tiny_d2nwg(seed: int = 0, **config: Any) -> D2NWGHeadGenerator:
    """A D2NWG generator over ``DIM``-d embeddings for up to 6 classes and 3 shots, every weight random."""
    torch.manual_seed(seed)
    settings = {"embedding_dim": DIM, "max_num_classes": 6, "max_shots": 3, "encoder_id": "tiny-encoder", "encoder_fingerprint": "0123abcd",
                "sampler": "ddim", "num_inference_steps": 4, **TINY, **config}
    model = D2NWGHeadGenerator(D2NWGConfig(**settings))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                nn.init.normal_(parameter, std=0.3)
    return model.eval()
