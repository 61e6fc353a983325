"""Configuration of a D2NWG head generator: the weight VAE, the dataset encoder and the latent denoiser, each
with its own settings, the diffusion schedule and sampler, and the statistics the training set fixed."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...lazy_imports import complete_registration
from ...weight_vae import VAE_LOSSES
from .alignment import ALIGNMENT_LOSSES
from .diffusion import DEFAULT_SCHEDULER_CONFIG, SAMPLERS
from .modules import ENCODER_TYPES, VECTORIZATIONS, HeadVectorizer

# CPU-sized defaults (a 5-way head on 384-d embeddings is 1 925 numbers).
DEFAULT_VAE_CONFIG: dict[str, Any] = {"latent_size": 64, "hidden_size": 512, "num_layers": 2}
DEFAULT_ENCODER_CONFIG: dict[str, Any] = {"code_size": 128, "hidden_size": 128, "num_heads": 2, "num_inducing": 16, "num_layers": 2, "slot_size": 8}
DEFAULT_DENOISER_CONFIG: dict[str, Any] = {"hidden_size": 256, "num_layers": 3, "num_heads": 4, "intermediate_size": 512}
DEFAULT_INFERENCE_STEPS = {"ddim": 20, "ddpm": None}  # None: every training step (the authors' ancestral sampler)


def _merge(name: str, defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; it takes {sorted(defaults)}.")
    return {**defaults, **(given or {})}


class D2NWGConfig(PretrainedConfig):
    """Configuration of a :class:`~ocd_hf.methods.d2nwg.D2NWGHeadGenerator`.

    Args:
        embedding_dim: ``d``; heads are ``(N, d+1)``.
        max_num_classes: the largest ``N`` (the model-wise and layer-wise vectors are padded to it).
        max_shots: the ``K`` the order-aware MLP encoder reads per class (more are cut, fewer zero-padded).
        vectorization: ``"row"`` (one latent token per head row: the default, needed by the row-aligned encoder),
            ``"model"`` (model-wise, one vector) or ``"layer"`` (layer-wise chunks of ``chunk_size``, chunk index as a condition).
        chunk_size: the chunk length of ``"layer"``.
        use_vae: ``False`` is the paper's "no VAE" ablation (App. C.4): no weight VAE; the diffusion runs on the
            standardised weight tokens themselves (the latents are the tokens, ``latent_size`` is the token width) and the
            dataset encoder is aligned to them. ``vae_config``, ``vae_loss`` and ``kl_weight`` are then unused.
        vae_config: ``latent_size``, ``hidden_size``, ``num_layers`` of the :class:`~ocd_hf.weight_vae.WeightVAE`.
        vae_loss: ``"paper"`` (squared error + ``kl_weight``·KL, Eq. 1) or ``"code"`` (the authors' code: L1 / exp(logvar) +
            logvar with a learned scalar log-variance, + ``kl_weight``·KL + 1000·MSE).
        kl_weight: β (1e-6 in both the paper and the code).
        encoder_type: ``"row_aligned"`` (default; per-class tokens, equivariant), ``"set_transformer"`` (the paper's,
            invariant to the labels) or ``"mlp"`` (the authors' few-shot config, order-aware).
        encoder_config: ``code_size``, ``hidden_size``, ``num_heads``, ``num_inducing``, ``num_layers`` (Set Transformers),
            ``slot_size`` (MLP).
        alignment_loss: ``"infonce"`` (Eq. 2, normalised, learned temperature) or ``"soft"`` (the authors' soft targets).
        projection_size: the shared space of the alignment.
        denoiser_config: ``hidden_size``, ``num_layers``, ``num_heads``, ``intermediate_size`` of the latent denoiser.
        scheduler_config: keyword arguments of diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` (default: the authors').
        sampler: ``"ddim"`` (deterministic, fast default) or ``"ddpm"`` (ancestral, the authors').
        num_inference_steps: sampler steps (default 20 for DDIM, every training step for DDPM).
        latent_scale: latents are diffused in units of ``1 / latent_scale`` (the std of the training latents).
        encoder_id / encoder_revision / encoder_fingerprint: the frozen encoder of the embeddings (another is refused).
        harvest_config / task_distribution: how the zoo was harvested and from which tasks.
    """

    model_type = "d2nwg"

    def __init__(
        self,
        embedding_dim: int = 384,
        max_num_classes: int = 5,
        max_shots: int = 5,
        vectorization: str = "row",
        chunk_size: int | None = None,
        use_vae: bool = True,
        vae_config: dict[str, Any] | None = None,
        vae_loss: str = "paper",
        kl_weight: float = 1e-6,
        encoder_type: str = "row_aligned",
        encoder_config: dict[str, Any] | None = None,
        alignment_loss: str = "infonce",
        projection_size: int = 64,
        denoiser_config: dict[str, Any] | None = None,
        scheduler_config: dict[str, Any] | None = None,
        sampler: str = "ddim",
        num_inference_steps: int | None = None,
        latent_scale: float = 1.0,
        encoder_id: str | None = None,
        encoder_revision: str | None = None,
        encoder_fingerprint: str | None = None,
        harvest_config: dict[str, Any] | None = None,
        task_distribution: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value, allowed in (("vectorization", vectorization, VECTORIZATIONS), ("vae_loss", vae_loss, VAE_LOSSES),
                                     ("encoder_type", encoder_type, ENCODER_TYPES), ("alignment_loss", alignment_loss, ALIGNMENT_LOSSES),
                                     ("sampler", sampler, SAMPLERS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        if encoder_type == "row_aligned" and vectorization != "row":
            raise ValueError(
                f"encoder_type='row_aligned' conditions latent token j on class j: it needs vectorization='row', got {vectorization!r}. "
                "Use a pooled encoder ('set_transformer' or 'mlp') with model-wise or layer-wise vectors."
            )
        if embedding_dim < 1 or max_num_classes < 2 or max_shots < 1:
            raise ValueError(f"embedding_dim, max_shots must be >= 1 and max_num_classes >= 2; got {embedding_dim}, {max_shots}, {max_num_classes}.")
        if not latent_scale > 0 or not kl_weight >= 0:
            raise ValueError(f"latent_scale must be positive and kl_weight >= 0; got {latent_scale} and {kl_weight}.")
        HeadVectorizer(vectorization, embedding_dim, max_num_classes, chunk_size)  # refuses a missing chunk_size
        self.embedding_dim, self.max_num_classes, self.max_shots = int(embedding_dim), int(max_num_classes), int(max_shots)
        self.vectorization, self.chunk_size = vectorization, chunk_size
        self.use_vae = bool(use_vae)
        self.vae_config = _merge("vae_config", DEFAULT_VAE_CONFIG, vae_config)
        self.vae_loss, self.kl_weight = vae_loss, float(kl_weight)
        self.encoder_type = encoder_type
        self.encoder_config = _merge("encoder_config", DEFAULT_ENCODER_CONFIG, encoder_config)
        self.alignment_loss, self.projection_size = alignment_loss, int(projection_size)
        self.denoiser_config = _merge("denoiser_config", DEFAULT_DENOISER_CONFIG, denoiser_config)
        self.scheduler_config = {**DEFAULT_SCHEDULER_CONFIG, **(scheduler_config or {})}
        self.sampler = sampler
        self.num_inference_steps = num_inference_steps
        if self.inference_steps < 1 or self.inference_steps > self.scheduler_config["num_train_timesteps"]:
            raise ValueError(f"num_inference_steps must be in 1..{self.scheduler_config['num_train_timesteps']}, got {num_inference_steps}.")
        self.latent_scale = float(latent_scale)
        self.encoder_id, self.encoder_revision, self.encoder_fingerprint = encoder_id, encoder_revision, encoder_fingerprint
        self.harvest_config = dict(harvest_config or {})
        self.task_distribution = dict(task_distribution or {})
        super().__init__(**kwargs)
        complete_registration(self.model_type)  # AutoModel learns D2NWGHeadGenerator now (see ocd_hf.lazy_imports)

    @property
    def inference_steps(self) -> int:
        """The sampler's steps: ``num_inference_steps``, else the sampler's default."""
        default = DEFAULT_INFERENCE_STEPS[self.sampler] or self.scheduler_config["num_train_timesteps"]
        return int(self.num_inference_steps or default)

    @property
    def latent_size(self) -> int:
        """The size of one diffused latent token: the VAE's ``latent_size``, or the token width without a VAE."""
        return int(self.vae_config["latent_size"]) if self.use_vae else self.vectorizer.width

    @property
    def vectorizer(self) -> HeadVectorizer:
        """How heads become the VAE's tokens (:class:`~ocd_hf.methods.d2nwg.modules.HeadVectorizer`)."""
        return HeadVectorizer(self.vectorization, self.embedding_dim, self.max_num_classes, self.chunk_size)

    @property
    def statistics_shape(self) -> tuple[int, int]:
        """The shape of the per-coordinate mean and std of the tokens (shared by all rows for ``"row"``)."""
        vectorizer = self.vectorizer
        return (max(vectorizer.num_positions, 1), vectorizer.width)
