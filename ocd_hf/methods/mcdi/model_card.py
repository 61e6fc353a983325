"""Mc-Di's model card: the context its template (``model_cards/mcdi_model_card.md``) reads, rendered by :mod:`ocd_hf.cards`."""

from __future__ import annotations

from huggingface_hub import ModelCard
from transformers import PreTrainedModel

from ...cards import GeneratorCardData, render_model_card

MODEL_CARD_TEMPLATE = "mcdi_model_card.md"
BASE_TAGS = ("mcdi", "weight-generation", "few-shot", "diffusion")
LOSS_NAMES = {
    "mcdi": "Mc-Di: local-consistency diffusion through the local targets",
    "mvdi": "Mv-Di: vanilla diffusion to the final head θ_M",
    "twdi": "Tw-Di: vanilla diffusion applied to every local target",
}


def mcdi_card(model: PreTrainedModel, card_data: GeneratorCardData | None = None) -> ModelCard:
    """The model card of ``model``, a :class:`~ocd_hf.methods.mcdi.McDiHeadGenerator`, with what ``card_data`` adds."""
    card_data = card_data or GeneratorCardData()
    config = model.config
    model_name = card_data.model_name or f"Mc-Di head generator for {config.encoder_id or f'{config.embedding_dim}-d embeddings'}"
    context = {
        "encoder_id": config.encoder_id,
        "encoder_revision": config.encoder_revision,
        "encoder_fingerprint": config.encoder_fingerprint,
        "embedding_dim": config.embedding_dim,
        "max_num_classes": config.max_num_classes,
        "loss_type": config.loss_type,
        "loss_name": LOSS_NAMES[config.loss_type],
        "num_targets": config.num_targets,
        "boundaries": config.boundaries,
        "scheduler_config": config.scheduler_config,
        "denoiser_config": config.denoiser_config,
        "head_scale": config.head_scale,
        "num_parameters": sum(p.numel() for p in model.denoiser.parameters()),
        "harvest_config": config.harvest_config,
        "task_distribution": config.task_distribution,
    }
    return render_model_card(
        MODEL_CARD_TEMPLATE, card_data, model_name=model_name, base_model=config.encoder_id, task="few-shot-classification",
        base_tags=BASE_TAGS, context=context,
    )
