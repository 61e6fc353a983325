"""Mc-Di — *Learning to Learn Weight Generation via Local Consistency Diffusion*: a task-conditioned
diffusion model that generates the classification head of a new few-shot task from its support set,
trained on the optimisation trajectories of many tasks' heads with a local-consistency loss."""

from typing import TYPE_CHECKING

from ...lazy_imports import lazy_attributes

if TYPE_CHECKING:
    from ...fewshot import encoder_fingerprint
    from .configuration import DEFAULT_DENOISER_CONFIG, McDiConfig
    from .diffusion import DEFAULT_SCHEDULER_CONFIG, LOSS_TYPES, alpha_bars, local_consistency_loss, sample_chain, segment_boundaries
    from .modeling import McDiHeadGenerator, head_to_linear, head_to_setfit_head, head_to_setfit_model
    from .modules import HeadDenoiser, class_prototypes
    from .training import HeadDiffusionLoss, McDiTrainingArguments, ReptileTrainer, train_head_generator

_IMPORT_STRUCTURE = {
    "...fewshot": ["encoder_fingerprint"],
    ".configuration": ["DEFAULT_DENOISER_CONFIG", "McDiConfig"],
    ".diffusion": ["DEFAULT_SCHEDULER_CONFIG", "LOSS_TYPES", "alpha_bars", "local_consistency_loss", "sample_chain", "segment_boundaries"],
    ".modeling": ["McDiHeadGenerator", "head_to_linear", "head_to_setfit_head", "head_to_setfit_model"],
    ".modules": ["HeadDenoiser", "class_prototypes"],
    ".training": ["HeadDiffusionLoss", "McDiTrainingArguments", "ReptileTrainer", "train_head_generator"],
}
__getattr__, __dir__ = lazy_attributes(__name__, _IMPORT_STRUCTURE)

__all__ = [
    "DEFAULT_DENOISER_CONFIG",
    "DEFAULT_SCHEDULER_CONFIG",
    "HeadDenoiser",
    "HeadDiffusionLoss",
    "LOSS_TYPES",
    "McDiConfig",
    "McDiHeadGenerator",
    "McDiTrainingArguments",
    "ReptileTrainer",
    "alpha_bars",
    "class_prototypes",
    "encoder_fingerprint",
    "head_to_linear",
    "head_to_setfit_head",
    "head_to_setfit_model",
    "local_consistency_loss",
    "sample_chain",
    "segment_boundaries",
    "train_head_generator",
]
