"""D2NWG — *Diffusion-based Neural Network Weights Generation*: a weight VAE over a zoo of heads, a dataset encoder
over class-grouped support embeddings aligned to its latents, and latent diffusion conditioned on the dataset code
that generates the classification head of a new few-shot task."""

from typing import TYPE_CHECKING

from ...lazy_imports import lazy_attributes

if TYPE_CHECKING:
    from .alignment import ALIGNMENT_LOSSES, AlignmentHeads, info_nce_loss, soft_target_loss
    from .configuration import DEFAULT_DENOISER_CONFIG, DEFAULT_ENCODER_CONFIG, DEFAULT_VAE_CONFIG, VAE_LOSSES, D2NWGConfig
    from .diffusion import DEFAULT_SCHEDULER_CONFIG, SAMPLERS, diffusion_loss, make_scheduler, sample_latents
    from .modeling import SELECTIONS, D2NWGHeadGenerator, head_accuracy, select_heads
    from .modules import (
        ENCODER_TYPES,
        VECTORIZATIONS,
        HeadVectorizer,
        LatentDenoiser,
        MLPEncoder,
        RowAlignedEncoder,
        SetTransformerEncoder,
        WeightVAE,
        group_by_class,
    )
    from .training import D2NWGTrainingArguments, train_d2nwg, vae_losses

_IMPORT_STRUCTURE = {
    ".alignment": ["ALIGNMENT_LOSSES", "AlignmentHeads", "info_nce_loss", "soft_target_loss"],
    ".configuration": ["DEFAULT_DENOISER_CONFIG", "DEFAULT_ENCODER_CONFIG", "DEFAULT_VAE_CONFIG", "VAE_LOSSES", "D2NWGConfig"],
    ".diffusion": ["DEFAULT_SCHEDULER_CONFIG", "SAMPLERS", "diffusion_loss", "make_scheduler", "sample_latents"],
    ".modeling": ["SELECTIONS", "D2NWGHeadGenerator", "head_accuracy", "select_heads"],
    ".modules": [
        "ENCODER_TYPES",
        "VECTORIZATIONS",
        "HeadVectorizer",
        "LatentDenoiser",
        "MLPEncoder",
        "RowAlignedEncoder",
        "SetTransformerEncoder",
        "WeightVAE",
        "group_by_class",
    ],
    ".training": ["D2NWGTrainingArguments", "train_d2nwg", "vae_losses"],
}
__getattr__, __dir__ = lazy_attributes(__name__, _IMPORT_STRUCTURE)

__all__ = [
    "ALIGNMENT_LOSSES",
    "AlignmentHeads",
    "D2NWGConfig",
    "D2NWGHeadGenerator",
    "D2NWGTrainingArguments",
    "DEFAULT_DENOISER_CONFIG",
    "DEFAULT_ENCODER_CONFIG",
    "DEFAULT_SCHEDULER_CONFIG",
    "DEFAULT_VAE_CONFIG",
    "ENCODER_TYPES",
    "HeadVectorizer",
    "LatentDenoiser",
    "MLPEncoder",
    "RowAlignedEncoder",
    "SAMPLERS",
    "SELECTIONS",
    "SetTransformerEncoder",
    "VAE_LOSSES",
    "VECTORIZATIONS",
    "WeightVAE",
    "diffusion_loss",
    "group_by_class",
    "head_accuracy",
    "info_nce_loss",
    "make_scheduler",
    "sample_latents",
    "select_heads",
    "soft_target_loss",
    "train_d2nwg",
    "vae_losses",
]
