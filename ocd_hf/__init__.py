"""ocd-hf: OCD (Learning to Overfit with Conditional Diffusion Models) for Hugging Face backbones."""

from transformers import AutoConfig, AutoModel

from .configuration_ocd import OCDConfig
from .hypernetwork import OCDHypernetwork
from .modeling_ocd import OCDWrapper
from .target import capture_conditioning, find_target_linear, inject_deltas, layer_fingerprint, linear_layers

AutoConfig.register(OCDConfig.model_type, OCDConfig)
AutoModel.register(OCDConfig, OCDWrapper)

__version__ = "0.1.0"
__all__ = [
    "OCDConfig",
    "OCDWrapper",
    "OCDHypernetwork",
    "capture_conditioning",
    "find_target_linear",
    "inject_deltas",
    "layer_fingerprint",
    "linear_layers",
]
