"""The one tiny tabular regression model the tests share (random weights, built from a config)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class TinyMLPConfig(PretrainedConfig):
    model_type = "ocd-test-mlp"

    def __init__(self, in_features: int = 6, hidden_size: int = 8, num_hidden_layers: int = 2, unused_layer: bool = False,
                 **kwargs) -> None:
        kwargs.setdefault("num_labels", 1)
        super().__init__(**kwargs)
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.unused_layer = unused_layer


class TinyMLPRegressor(PreTrainedModel):
    """``features -> fc1 -> ReLU -> … -> fc<n> -> ReLU -> head``; with ``unused_layer`` also a Linear
    (``unused``) that the forward pass never calls."""

    config_class = TinyMLPConfig

    def __init__(self, config: TinyMLPConfig) -> None:
        super().__init__(config)
        sizes = [config.in_features] + [config.hidden_size] * config.num_hidden_layers
        for index, (size_in, size_out) in enumerate(zip(sizes, sizes[1:]), start=1):
            self.add_module(f"fc{index}", nn.Linear(size_in, size_out))
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        if config.unused_layer:
            self.unused = nn.Linear(config.hidden_size, config.hidden_size)

    def _init_weights(self, module: nn.Module) -> None:
        """torch's own initialisation, seeded by the caller."""

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        hidden = features
        for index in range(1, self.config.num_hidden_layers + 1):
            hidden = torch.relu(getattr(self, f"fc{index}")(hidden))
        return SequenceClassifierOutput(logits=self.head(hidden))


def tiny_mlp(seed: int = 0, **config_kwargs) -> TinyMLPRegressor:
    """A seeded ``TinyMLPRegressor`` in eval mode."""
    torch.manual_seed(seed)
    return TinyMLPRegressor(TinyMLPConfig(**config_kwargs)).eval()
