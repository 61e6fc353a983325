"""ocd-hf: OCD (Learning to Overfit with Conditional Diffusion Models) for Hugging Face backbones."""

from transformers import AutoConfig, AutoModel

from .backbones import LeNet5Config, LeNet5ForImageClassification, SetFitBackbone, SetFitBackboneConfig
from .configuration_ocd import OCDConfig
from .deltas import load_deltas, load_harvest_metadata, materialise_deltas
from .evaluation import ResultRow, ResultsTable, aggregate_results, evaluate_ocd
from .harvest import harvest_deltas, harvest_from_pretrained
from .hub import load_deltas_from_hub, push_deltas_to_hub
from .hypernetwork import OCDHypernetwork
from .layer_selection import LayerRanking, select_layer
from .model_card import OCDModelCardData
from .modeling_ocd import OCDOutput, OCDWrapper
from .overfit import overfit_deltas
from .target import capture_conditioning, find_target_linear, inject_deltas, layer_fingerprint, linear_layers
from .training import train_hypernetwork

AutoConfig.register(OCDConfig.model_type, OCDConfig)
AutoModel.register(OCDConfig, OCDWrapper)

__version__ = "0.1.0"
__all__ = [
    "LayerRanking",
    "OCDConfig",
    "OCDHypernetwork",
    "OCDModelCardData",
    "OCDOutput",
    "OCDWrapper",
    "ResultRow",
    "ResultsTable",
    "LeNet5Config",
    "LeNet5ForImageClassification",
    "SetFitBackbone",
    "SetFitBackboneConfig",
    "aggregate_results",
    "capture_conditioning",
    "evaluate_ocd",
    "find_target_linear",
    "harvest_deltas",
    "harvest_from_pretrained",
    "inject_deltas",
    "layer_fingerprint",
    "linear_layers",
    "load_deltas",
    "load_deltas_from_hub",
    "load_harvest_metadata",
    "materialise_deltas",
    "overfit_deltas",
    "push_deltas_to_hub",
    "select_layer",
    "train_hypernetwork",
]
