"""OCD's model card and delta-dataset card: the context its templates read (``model_cards/ocd_model_card.md``,
``model_cards/delta_dataset_card.md``), rendered by :mod:`ocd_hf.cards`."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import DatasetCard, ModelCard
from transformers import PreTrainedModel

from ...cards import GeneratorCardData, bytes_text, render_dataset_card, render_model_card, write_card
from .deltas import DATA_FILES_PATTERN, SPLIT, delta_storage

MODEL_CARD_TEMPLATE = "ocd_model_card.md"
DELTA_DATASET_CARD_TEMPLATE = "delta_dataset_card.md"
BASE_TAGS = ("ocd", "hypernetwork", "diffusion")
# The Hub's relation of a model to its base_model: the hypernetwork is loaded onto the backbone, like a PEFT adapter.
BASE_MODEL_RELATION = "adapter"
DATASET_TAGS = ("ocd", "weight-deltas", "hypernetwork")

OCDModelCardData = GeneratorCardData  # the name OCD's public API has always used


def backbone_inputs(backbone: Any) -> tuple[str, list[str]]:
    """The kind of input the backbone takes (``"text"``, ``"image"`` or ``"tensors"``) and its forward's input names."""
    parameters = inspect.signature(backbone.forward).parameters
    names = [
        name for name, parameter in parameters.items()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and name != "labels"
    ]
    if "input_ids" in names:
        return "text", ["input_ids"]
    if "pixel_values" in names:
        return "image", ["pixel_values"]
    return "tensors", names[:1]


def ocd_card(model: PreTrainedModel, card_data: GeneratorCardData | None = None) -> ModelCard:
    """The model card of ``model``, an :class:`~ocd_hf.OCDWrapper` (its config, backbone and hypernetwork) with what ``card_data`` adds."""
    card_data = card_data or GeneratorCardData()
    config = model.config
    base_model = config.base_model_name_or_path
    model_name = card_data.model_name or f"OCD hypernetwork for {config.target_module} of {base_model or config.base_model_class}"
    input_kind, input_names = backbone_inputs(model.backbone)
    if input_kind != "tensors" and not base_model:
        input_kind = "tensors"  # no name to load a tokenizer or image processor from
    context = {
        "base_model": base_model,
        "base_model_name_or_path": base_model,
        "base_model_class": config.base_model_class,
        "base_model_revision": config.base_model_revision,
        "target_module": config.target_module,
        "in_features": config.in_features,
        "out_features": config.out_features,
        "per_token": config.per_token,
        "task": config.task,
        "base_layer_fingerprint": config.base_layer_fingerprint,
        "delta_mode": config.delta_mode,
        "factor_rule": config.factor_rule,
        "sample_size": config.sample_size if config.delta_mode == "full" else None,
        "condition_components": config.condition_components,
        "num_inference_steps": config.num_inference_steps,
        "scheduler_config": config.scheduler_config,
        "delta_normalization": config.delta_normalization,
        "log_rho_mean": config.log_rho_mean,
        "log_rho_std": config.log_rho_std,
        "num_parameters": sum(p.numel() for p in model.hypernetwork.parameters()),
        "harvest_config": config.harvest_config,
        "input_kind": input_kind,
        "input_names": input_names,
    }
    return render_model_card(
        MODEL_CARD_TEMPLATE, card_data, model_name=model_name, base_model=base_model, task=config.task,
        base_tags=BASE_TAGS, context=context, base_model_relation=BASE_MODEL_RELATION,
    )


def default_task_type(model: PreTrainedModel) -> str:
    """A Hub task id for ``model``'s results: ``text-``, ``image-`` or ``tabular-`` + the config's task."""
    kind = {"text": "text", "image": "image"}.get(backbone_inputs(model.backbone)[0], "tabular")
    return f"{kind}-{model.config.task}"


def write_model_card(model: PreTrainedModel, directory: str | os.PathLike, card_data: GeneratorCardData | None = None) -> Path:
    """Write ``directory/README.md`` for ``model``, updating the card already there if any."""
    return write_card(ocd_card(model, card_data), directory)


def delta_dataset_card(metadata: Mapping[str, Any]) -> DatasetCard:
    """The dataset card of a finished harvest, from its ``harvest.json`` metadata."""
    base_model = metadata.get("base_model_name_or_path") or metadata["base_model_class"]
    factorised = delta_storage(metadata) == "factorised"
    context = {
        **metadata,
        "base_model": base_model,
        "bytes_per_sample_text": bytes_text(metadata.get("bytes_per_sample")),
        "delta_bytes_text": bytes_text(metadata.get("delta_bytes_per_sample")),
        "full_delta_bytes_text": bytes_text(metadata.get("full_delta_bytes_per_sample")),
        "factorised": factorised,
        "delta_column": "delta_factor" if factorised else "delta",
    }
    return render_dataset_card(
        DELTA_DATASET_CARD_TEMPLATE, pretty_name=f"OCD deltas: {metadata['target_module']} of {base_model}",
        num_samples=metadata["num_samples"], tags=DATASET_TAGS, data_files=DATA_FILES_PATTERN, split=SPLIT, context=context,
    )


def write_delta_dataset_card(output_dir: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Render the dataset card of ``metadata`` as ``output_dir/README.md``; a card already there keeps the text
    outside its generated block (:func:`ocd_hf.cards.write_card`)."""
    return write_card(delta_dataset_card(metadata), output_dir)
