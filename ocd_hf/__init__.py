"""ocd-hf: diffusion-based weight generation for Hugging Face backbones.

Methods live in :mod:`ocd_hf.methods` (``ocd`` today); the shared substrate (targets, fine-tuning,
weight datasets, the trainer, results, cards, Hub I/O) lives beside this file. Everything a user
needs imports from here.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForSequenceClassification

from . import logging
from .backbones import (
    LeNet5Config,
    LeNet5ForImageClassification,
    SetFitBackbone,
    SetFitBackboneConfig,
    load_pretrained_backbone,
    tokenizer_from_setfit,
)
from .cards import GeneratorCardData
from .episodes import Episode, EpisodeSampler, TaskDistribution, embed_items
from .factorised import expand_factors, factorise_deltas
from .fewshot import evaluate_episodes, logistic_regression_heads, prototype_heads
from .finetune import overfit_deltas
from .methods.d2nwg import D2NWGConfig, D2NWGHeadGenerator, D2NWGTrainingArguments, train_d2nwg
from .methods.mcdi import McDiConfig, McDiHeadGenerator, McDiTrainingArguments, head_to_linear, head_to_setfit_head, head_to_setfit_model, train_head_generator
from .methods.ocd import (
    CONDITION_COMPONENTS,
    DEFAULT_FACTOR_TOLERANCE,
    FACTOR_DENOISER_CONFIG,
    GENERATOR_TYPES,
    PAPER_DENOISER_CONFIG,
    LayerRanking,
    OCDConfig,
    OCDHypernetwork,
    OCDModelCardData,
    OCDOutput,
    OCDTrainingArguments,
    OCDWrapper,
    SetFitPairCommits,
    choose_delta_mode,
    evaluate_ocd,
    harvest_batch,
    harvest_deltas,
    harvest_from_pretrained,
    load_deltas,
    load_deltas_from_hub,
    load_harvest_metadata,
    materialise_deltas,
    push_deltas_to_hub,
    push_setfit_pair,
    select_layer,
    train_hypernetwork,
)
from .results import ResultRow, ResultsTable, aggregate_results
from .target import (
    Conditioning,
    capture_conditioning,
    describe_backbone,
    find_target_linear,
    inject_deltas,
    layer_fingerprint,
    linear_layers,
    model_output_tensor,
    record_layer_io,
)
from .task_heads import EarlyStopping, HeadFit, fit_task_heads, harvest_task_heads, load_head_metadata, load_task_heads
from .trainer import GeneratorTrainingArguments

AutoConfig.register(OCDConfig.model_type, OCDConfig)
AutoModel.register(OCDConfig, OCDWrapper)
AutoConfig.register(D2NWGConfig.model_type, D2NWGConfig)
AutoModel.register(D2NWGConfig, D2NWGHeadGenerator)
AutoConfig.register(McDiConfig.model_type, McDiConfig)
AutoModel.register(McDiConfig, McDiHeadGenerator)
# An OCD model classifies as its backbone does: pipeline("text-classification" / "image-classification", model=ocd).
AutoModelForSequenceClassification.register(OCDConfig, OCDWrapper)
AutoModelForImageClassification.register(OCDConfig, OCDWrapper)

__version__ = "0.1.0"  # the one version string: pyproject.toml reads it from here
__all__ = [
    "CONDITION_COMPONENTS",
    "Conditioning",
    "DEFAULT_FACTOR_TOLERANCE",
    "D2NWGConfig",
    "D2NWGHeadGenerator",
    "D2NWGTrainingArguments",
    "EarlyStopping",
    "Episode",
    "EpisodeSampler",
    "FACTOR_DENOISER_CONFIG",
    "GENERATOR_TYPES",
    "GeneratorCardData",
    "GeneratorTrainingArguments",
    "LayerRanking",
    "LeNet5Config",
    "LeNet5ForImageClassification",
    "McDiConfig",
    "McDiHeadGenerator",
    "McDiTrainingArguments",
    "OCDConfig",
    "OCDHypernetwork",
    "OCDModelCardData",
    "OCDOutput",
    "OCDTrainingArguments",
    "OCDWrapper",
    "PAPER_DENOISER_CONFIG",
    "ResultRow",
    "ResultsTable",
    "SetFitBackbone",
    "SetFitBackboneConfig",
    "SetFitPairCommits",
    "TaskDistribution",
    "aggregate_results",
    "capture_conditioning",
    "choose_delta_mode",
    "describe_backbone",
    "embed_items",
    "evaluate_episodes",
    "evaluate_ocd",
    "expand_factors",
    "factorise_deltas",
    "find_target_linear",
    "fit_task_heads",
    "HeadFit",
    "load_head_metadata",
    "harvest_batch",
    "harvest_deltas",
    "harvest_from_pretrained",
    "harvest_task_heads",
    "head_to_linear",
    "head_to_setfit_head",
    "head_to_setfit_model",
    "inject_deltas",
    "layer_fingerprint",
    "linear_layers",
    "load_deltas",
    "load_deltas_from_hub",
    "load_harvest_metadata",
    "load_pretrained_backbone",
    "load_task_heads",
    "logging",
    "logistic_regression_heads",
    "materialise_deltas",
    "model_output_tensor",
    "overfit_deltas",
    "prototype_heads",
    "push_deltas_to_hub",
    "push_setfit_pair",
    "record_layer_io",
    "select_layer",
    "tokenizer_from_setfit",
    "train_d2nwg",
    "train_head_generator",
    "train_hypernetwork",
]
