"""ocd-hf: diffusion-based weight generation for Hugging Face backbones.

Methods live in :mod:`ocd_hf.methods` (``ocd`` today); the shared substrate (targets, fine-tuning,
weight datasets, the trainer, results, cards, Hub I/O) lives beside this file. Everything a user
needs imports from here; each name is imported on first use (:mod:`ocd_hf.lazy_imports`), so that
``import ocd_hf`` does not import diffusers, datasets, matplotlib or scikit-learn.
"""

from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForSequenceClassification

from . import logging
from .lazy_imports import defer_registration, lazy_attributes
from .methods.d2nwg.configuration import D2NWGConfig
from .methods.mcdi.configuration import McDiConfig
from .methods.ocd.configuration import OCDConfig

if TYPE_CHECKING:
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
    from .methods.d2nwg import D2NWGHeadGenerator, D2NWGTrainingArguments, train_d2nwg
    from .methods.mcdi import McDiHeadGenerator, McDiTrainingArguments, head_to_linear, head_to_setfit_head, head_to_setfit_model, train_head_generator
    from .methods.ocd import (
        CONDITION_COMPONENTS,
        DEFAULT_FACTOR_TOLERANCE,
        FACTOR_DENOISER_CONFIG,
        GENERATOR_TYPES,
        PAPER_DENOISER_CONFIG,
        LayerRanking,
        OCDHypernetwork,
        OCDModelCardData,
        OCDOutput,
        OCDTrainingArguments,
        OCDWrapper,
        SetFitPairCommits,
        choose_delta_mode,
        evaluate_ocd,
        evaluate_reconstruction,
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

_IMPORT_STRUCTURE = {
    ".backbones": [
        "LeNet5Config", "LeNet5ForImageClassification", "SetFitBackbone", "SetFitBackboneConfig",
        "load_pretrained_backbone", "tokenizer_from_setfit",
    ],
    ".cards": ["GeneratorCardData"],
    ".episodes": ["Episode", "EpisodeSampler", "TaskDistribution", "embed_items"],
    ".factorised": ["expand_factors", "factorise_deltas"],
    ".fewshot": ["evaluate_episodes", "logistic_regression_heads", "prototype_heads"],
    ".finetune": ["overfit_deltas"],
    ".methods.d2nwg": ["D2NWGHeadGenerator", "D2NWGTrainingArguments", "train_d2nwg"],
    ".methods.mcdi": [
        "McDiHeadGenerator", "McDiTrainingArguments", "head_to_linear", "head_to_setfit_head",
        "head_to_setfit_model", "train_head_generator",
    ],
    ".methods.ocd": [
        "CONDITION_COMPONENTS", "DEFAULT_FACTOR_TOLERANCE", "FACTOR_DENOISER_CONFIG", "GENERATOR_TYPES",
        "PAPER_DENOISER_CONFIG", "LayerRanking", "OCDHypernetwork", "OCDModelCardData", "OCDOutput",
        "OCDTrainingArguments", "OCDWrapper", "SetFitPairCommits", "choose_delta_mode", "evaluate_ocd",
        "evaluate_reconstruction", "harvest_batch", "harvest_deltas", "harvest_from_pretrained", "load_deltas", "load_deltas_from_hub",
        "load_harvest_metadata", "materialise_deltas", "push_deltas_to_hub", "push_setfit_pair", "select_layer",
        "train_hypernetwork",
    ],
    ".results": ["ResultRow", "ResultsTable", "aggregate_results"],
    ".target": [
        "Conditioning", "capture_conditioning", "describe_backbone", "find_target_linear", "inject_deltas",
        "layer_fingerprint", "linear_layers", "model_output_tensor", "record_layer_io",
    ],
    ".task_heads": [
        "EarlyStopping", "HeadFit", "fit_task_heads", "harvest_task_heads", "load_head_metadata",
        "load_task_heads",
    ],
    ".trainer": ["GeneratorTrainingArguments"],
}
__getattr__, __dir__ = lazy_attributes(__name__, _IMPORT_STRUCTURE)


def _register_ocd_models() -> None:
    from .methods.ocd.modeling import OCDWrapper

    AutoModel.register(OCDConfig, OCDWrapper)
    # An OCD model classifies as its backbone does: pipeline("text-classification" / "image-classification", model=ocd).
    AutoModelForSequenceClassification.register(OCDConfig, OCDWrapper)
    AutoModelForImageClassification.register(OCDConfig, OCDWrapper)


def _register_d2nwg_models() -> None:
    from .methods.d2nwg.modeling import D2NWGHeadGenerator

    AutoModel.register(D2NWGConfig, D2NWGHeadGenerator)


def _register_mcdi_models() -> None:
    from .methods.mcdi.modeling import McDiHeadGenerator

    AutoModel.register(McDiConfig, McDiHeadGenerator)


# The configs register now (they import no diffusers); the model classes, whose modules import diffusers and
# datasets, when the first config of their type is built: AutoModel.from_pretrained builds it before the lookup.
AutoConfig.register(OCDConfig.model_type, OCDConfig)
AutoConfig.register(McDiConfig.model_type, McDiConfig)
AutoConfig.register(D2NWGConfig.model_type, D2NWGConfig)
defer_registration(OCDConfig.model_type, _register_ocd_models)
defer_registration(McDiConfig.model_type, _register_mcdi_models)
defer_registration(D2NWGConfig.model_type, _register_d2nwg_models)

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
    "evaluate_reconstruction",
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
