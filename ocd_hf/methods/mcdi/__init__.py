"""Mc-Di — *Learning to Learn Weight Generation via Local Consistency Diffusion*: a task-conditioned
diffusion model that generates the classification head of a new few-shot task from its support set,
trained on the optimisation trajectories of many tasks' heads with a local-consistency loss."""

from ...fewshot import encoder_fingerprint
from .configuration import DEFAULT_DENOISER_CONFIG, McDiConfig
from .diffusion import DEFAULT_SCHEDULER_CONFIG, LOSS_TYPES, alpha_bars, local_consistency_loss, sample_chain, segment_boundaries
from .modeling import McDiHeadGenerator, head_to_linear, head_to_setfit_head, head_to_setfit_model
from .modules import HeadDenoiser, class_prototypes
from .training import HeadDiffusionLoss, McDiTrainingArguments, ReptileTrainer, train_head_generator

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
