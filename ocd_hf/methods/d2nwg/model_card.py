"""D2NWG's model card: the context its template (``model_cards/d2nwg_model_card.md``) reads, rendered by :mod:`ocd_hf.cards`."""

from __future__ import annotations

from huggingface_hub import ModelCard
from transformers import PreTrainedModel

from ...cards import GeneratorCardData, render_model_card

MODEL_CARD_TEMPLATE = "d2nwg_model_card.md"
BASE_TAGS = ("d2nwg", "weight-generation", "few-shot", "diffusion", "latent-diffusion")
ENCODER_NAMES = {
    "row_aligned": "row-aligned: one token per class (within-class Set Transformer + prototype, SAB across classes), equivariant in the labels",
    "set_transformer": "the paper's Set Transformer (within, then across classes): invariant to the labels, so it cannot tell which row is which class",
    "mlp": "the authors' order-aware two-layer MLP",
}


def d2nwg_card(model: PreTrainedModel, card_data: GeneratorCardData | None = None) -> ModelCard:
    """The model card of ``model``, a :class:`~ocd_hf.methods.d2nwg.D2NWGHeadGenerator`, with what ``card_data`` adds."""
    card_data = card_data or GeneratorCardData()
    config = model.config
    model_name = card_data.model_name or f"D2NWG head generator for {config.encoder_id or f'{config.embedding_dim}-d embeddings'}"
    context = {
        "encoder_id": config.encoder_id,
        "encoder_revision": config.encoder_revision,
        "encoder_fingerprint": config.encoder_fingerprint,
        "embedding_dim": config.embedding_dim,
        "max_num_classes": config.max_num_classes,
        "vectorization": config.vectorization,
        "chunk_size": config.chunk_size,
        "use_vae": config.use_vae,
        "vae_config": config.vae_config,
        "vae_loss": config.vae_loss,
        "kl_weight": config.kl_weight,
        "encoder_type": config.encoder_type,
        "encoder_name": ENCODER_NAMES[config.encoder_type],
        "alignment_loss": config.alignment_loss,
        "denoiser_config": config.denoiser_config,
        "scheduler_config": config.scheduler_config,
        "sampler": config.sampler,
        "inference_steps": config.inference_steps,
        "latent_scale": config.latent_scale,
        "components": list(model.component_configs(config)),
        "num_parameters": {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in model.component_configs(config)},
        "harvest_config": config.harvest_config,
        "task_distribution": config.task_distribution,
    }
    return render_model_card(
        MODEL_CARD_TEMPLATE, card_data, model_name=model_name, base_model=config.encoder_id, task="few-shot-classification",
        base_tags=BASE_TAGS, context=context,
    )
