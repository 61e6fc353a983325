"""Configuration of a Mc-Di task-conditioned head generator."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...lazy_imports import complete_registration
from .diffusion import DEFAULT_SCHEDULER_CONFIG, LOSS_TYPES, segment_boundaries

DEFAULT_DENOISER_CONFIG: dict[str, Any] = {
    # CPU-sized: 2.2M parameters for d = 384 (generating one 5-way head takes ~25 ms on one thread).
    "hidden_size": 256,
    "num_layers": 3,
    "num_heads": 4,
    "intermediate_size": 512,
}


class McDiConfig(PretrainedConfig):
    """Configuration of a :class:`~ocd_hf.methods.mcdi.McDiHeadGenerator`.

    Args:
        embedding_dim: ``d``, the size of the frozen encoder's embeddings; heads are ``(N, d+1)``.
        max_num_classes: the largest ``N`` the generator accepts (the training tasks' ``N`` by default).
        denoiser_config: ``hidden_size``, ``num_layers``, ``num_heads``, ``intermediate_size`` of the
            :class:`~ocd_hf.methods.mcdi.modules.HeadDenoiser`.
        scheduler_config: keyword arguments of ``diffusers.DDPMScheduler`` giving ``ᾱ`` (default: cosine, T = 21).
        num_targets: ``k``, the local targets per trajectory (1 for Mv-Di); it must divide T.
        loss_type: ``"mcdi"`` (local consistency), ``"mvdi"`` (vanilla, ``θ_M`` only) or ``"twdi"`` (vanilla
            on every local target).
        head_scale: heads are generated in units of this (the RMS of the training ``θ_M``).
        encoder_id / encoder_revision / encoder_fingerprint: the frozen encoder the embeddings come
            from; :meth:`~ocd_hf.methods.mcdi.McDiHeadGenerator.check_encoder` refuses another.
        harvest_config: the settings the training heads were fitted with (and their ``n_way``/``k_shot``).
        task_distribution: the meta-training tasks (distribution name, classes and their names, dataset
            fingerprint, what each head was fitted on), as the harvest recorded them.
    """

    model_type = "mcdi"

    def __init__(
        self,
        embedding_dim: int = 384,
        max_num_classes: int = 5,
        denoiser_config: dict[str, Any] | None = None,
        scheduler_config: dict[str, Any] | None = None,
        num_targets: int = 3,
        loss_type: str = "mcdi",
        head_scale: float = 1.0,
        encoder_id: str | None = None,
        encoder_revision: str | None = None,
        encoder_fingerprint: str | None = None,
        harvest_config: dict[str, Any] | None = None,
        task_distribution: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
        if loss_type == "mvdi" and num_targets != 1:
            raise ValueError(f"loss_type='mvdi' models θ_M alone: num_targets must be 1, got {num_targets}.")
        scheduler_config = {**DEFAULT_SCHEDULER_CONFIG, **(scheduler_config or {})}
        segment_boundaries(scheduler_config["num_train_timesteps"], num_targets)  # k must divide T
        if embedding_dim < 1 or max_num_classes < 2:
            raise ValueError(f"embedding_dim must be >= 1 and max_num_classes >= 2; got {embedding_dim} and {max_num_classes}.")
        if not head_scale > 0:
            raise ValueError(f"head_scale must be positive, got {head_scale}.")
        unknown = sorted(set(denoiser_config or {}) - set(DEFAULT_DENOISER_CONFIG))
        if unknown:
            raise ValueError(f"denoiser_config has unknown keys {unknown}; it takes {sorted(DEFAULT_DENOISER_CONFIG)}.")
        self.embedding_dim = int(embedding_dim)
        self.max_num_classes = int(max_num_classes)
        self.denoiser_config = {**DEFAULT_DENOISER_CONFIG, **(denoiser_config or {})}
        self.scheduler_config = scheduler_config
        self.num_targets = int(num_targets)
        self.loss_type = loss_type
        self.head_scale = float(head_scale)
        self.encoder_id = encoder_id
        self.encoder_revision = encoder_revision
        self.encoder_fingerprint = encoder_fingerprint
        self.harvest_config = dict(harvest_config or {})
        self.task_distribution = dict(task_distribution or {})
        super().__init__(**kwargs)
        complete_registration(self.model_type)  # AutoModel learns McDiHeadGenerator now (see ocd_hf.lazy_imports)

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def boundaries(self) -> list[int]:
        """The states ``s_i = T − iT/k`` at which the sampler reaches each local target (the last is 0)."""
        return segment_boundaries(self.num_timesteps, self.num_targets)
