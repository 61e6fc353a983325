"""Configuration of an OCD hypernetwork attached to one ``nn.Linear`` of a backbone."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from transformers import PretrainedConfig

from ...factorised import FACTOR_RULES
from ...lazy_imports import complete_registration
from ...target import CONDITION_FIELDS, describe_backbone

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    # The official OCD code: 1000 training steps, betas linspace(1e-6, 1e-2), epsilon prediction,
    # DDIM with 10 steps at sampling time. ``clip_sample`` must stay off: deltas are not images.
    "num_train_timesteps": 1000,
    "beta_start": 1e-6,
    "beta_end": 1e-2,
    "beta_schedule": "linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    # "trailing" starts sampling from t=999 whatever the step count ("leading" with 1 step samples at t=0).
    "timestep_spacing": "trailing",
}

DEFAULT_SCHEDULER_CLASS = "DDIMScheduler"
# The diffusers samplers that can sample from a denoiser trained on the DDPM forward process (betas,
# ``√ᾱ x + √(1−ᾱ) ε``): diffusers' own list of schedulers compatible with DDPM, less EDM's, which
# replaces the betas by its own σ range and conditions the denoiser on log σ instead of the timestep.
# Spelled out rather than read from ``KarrasDiffusionSchedulers`` so that the config (and `ocd-hf --help`)
# does not import diffusers; tests/test_lazy_imports.py checks it against diffusers' enum.
SAMPLING_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler",
)

DEFAULT_DENOISER_CONFIG: dict[str, Any] = {
    # A CPU-sized UNet2DModel. The paper used 128 channels and 6 levels (see ``PAPER_DENOISER_CONFIG``).
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "add_attention": False,
}

PAPER_DENOISER_CONFIG: dict[str, Any] = {
    "block_out_channels": [128, 128, 128, 128, 128, 128],
    "down_block_types": ["DownBlock2D"] * 6,
    "up_block_types": ["UpBlock2D"] * 6,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "add_attention": False,
}

FACTOR_DENOISER_CONFIG: dict[str, Any] = {
    # The denoiser over the left factor ``u`` of rank-1 deltas (``delta_mode="factorised"``).
    "hidden_dim": 256,
    "num_layers": 3,
    "embed_dim": 128,
}

LATENT_VAE_CONFIG: dict[str, Any] = {
    # The weight VAE of ``delta_mode="latent"`` (:class:`ocd_hf.weight_vae.WeightVAE`): each ``chunk_size`` consecutive
    # values of the row-major delta are one token (None: ``in_features``, one row per token), encoded to ``latent_size``.
    "chunk_size": None,
    "latent_size": 16,
    "hidden_size": 256,
    "num_layers": 2,
    "vae_loss": "paper",
    "kl_weight": 1e-6,
}
LATENT_DENOISER_CONFIG: dict[str, Any] = {
    # The transformer over the (num_chunks, latent_size) latent tokens of ``delta_mode="latent"``.
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 256,
    "embed_dim": 128,
}

# The fields that describe the backbone and its target layer: recorded by a harvest, required to match
# when a harvest resumes, and copied into the config of the hypernetwork trained on it.
BACKBONE_FIELDS = (
    "base_model_name_or_path",
    "base_model_revision",
    "base_model_class",
    "target_module",
    "in_features",
    "out_features",
    "output_dim",
    "per_token",
    "task",
    "base_layer_fingerprint",
)
DELTA_MODES = ("full", "factorised", "latent")
GENERATOR_TYPES = ("diffusion", "regression", "label")
LABEL_COMBINATIONS = ("expectation", "sample")
DELTA_NORMALIZATIONS = ("rms", "std")
CONDITION_COMPONENTS = tuple(CONDITION_FIELDS)
TASKS = ("classification", "regression")


def scheduler_class_from_name(name: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class called ``name``, if it can sample from an OCD denoiser (:data:`SAMPLING_SCHEDULERS`)."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    examples = "DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler"
    if name in SAMPLING_SCHEDULERS:
        return getattr(diffusers, name)
    found = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if found is None:
        raise ValueError(f"Unknown scheduler_class {name!r}; choose a diffusers scheduler such as {examples} (all: {list(SAMPLING_SCHEDULERS)}).")
    if not (isinstance(found, type) and issubclass(found, SchedulerMixin)):
        raise ValueError(f"scheduler_class {name!r} is not a diffusers scheduler; choose one of {list(SAMPLING_SCHEDULERS)}.")
    raise ValueError(
        f"{name} cannot sample from a denoiser trained with the DDPM forward process (betas, epsilon prediction) as OCD's is; "
        f"choose one of {list(SAMPLING_SCHEDULERS)}."
    )


def merge_settings(name: str, defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    """``defaults`` updated by ``given``, refusing keys ``defaults`` does not have."""
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; it takes {sorted(defaults)}.")
    return {**defaults, **(given or {})}


def check_latent_settings(vae: dict[str, Any], denoiser: dict[str, Any], out_features: int, in_features: int) -> None:
    """Refuse a ``delta_mode="latent"`` VAE or denoiser whose chunking, latent size or attention heads do not fit the layer."""
    from ...weight_vae import VAE_LOSSES

    size, chunk = out_features * in_features, vae["chunk_size"] or in_features
    if not isinstance(chunk, int) or chunk < 1 or size % chunk:
        rows = [k for k in range(1, out_features + 1) if out_features % k == 0][:6]
        raise ValueError(
            f"vae_config chunk_size={vae['chunk_size']!r} does not divide the {out_features}×{in_features} = {size} values of the "
            f"delta into equal tokens; choose a divisor of {size}, e.g. k·in_features with k dividing out_features "
            f"({', '.join(str(k * in_features) for k in rows)}, ...), or None for one row per token."
        )
    latent = vae["latent_size"]
    if not isinstance(latent, int) or not 1 <= latent < chunk:
        raise ValueError(
            f"vae_config latent_size={latent!r} must be an integer in [1, chunk_size) = [1, {chunk}): a token of {chunk} values is "
            f"encoded to latent_size numbers. Lower latent_size or raise chunk_size."
        )
    if vae["vae_loss"] not in VAE_LOSSES:
        raise ValueError(f"vae_config vae_loss must be one of {VAE_LOSSES}, got {vae['vae_loss']!r}.")
    if denoiser["hidden_size"] % denoiser["num_heads"]:
        raise ValueError(
            f"latent_denoiser_config hidden_size={denoiser['hidden_size']} is not divisible by num_heads={denoiser['num_heads']}; "
            "choose a num_heads that divides it (e.g. 4 for 128)."
        )


def padded_size(size: int, levels: int) -> int:
    """Smallest multiple of ``2 ** (levels - 1)`` that holds ``size`` (the UNet's down-sampling factor)."""
    factor = 2 ** (levels - 1)
    return int(math.ceil(size / factor) * factor)


class OCDConfig(PretrainedConfig):
    """Configuration of an :class:`~ocd_hf.OCDWrapper`.

    Holds which backbone and which of its ``nn.Linear`` layers the hypernetwork generates weight
    deltas for, the shapes of that layer and of the conditioning ``I(x)``, the denoiser and
    scheduler settings, and the statistics of the harvested deltas. Use
    :meth:`from_backbone` to fill the shapes from a model instead of typing them.

    Args:
        base_model_name_or_path: Hub id or local path of the backbone.
        base_model_revision: revision of the backbone on the Hub.
        base_model_class: name of the ``transformers`` class that loads the backbone.
        target_module: full dotted name of the target ``nn.Linear`` in the backbone.
        in_features / out_features: shape of the target weight is ``(out_features, in_features)``.
        output_dim: size of the backbone's output used as conditioning (e.g. number of labels).
        per_token: whether the target layer is applied to every token of a sequence.
        task: ``"classification"`` (ensembles average probabilities) or ``"regression"``.
        base_layer_fingerprint: hash of the target layer's base weights; loading onto a backbone
            whose layer differs is refused.
        delta_mode: ``"full"`` generates the whole (padded) weight delta with a 2-D UNet, as in the
            paper; ``"latent"`` diffuses in the latent space of a weight VAE over the delta's chunks (``vae_config``,
            trained on the harvested deltas first; any layer, made for per-token layers whose full delta is too big
            for a UNet on a CPU) and decodes the latents; ``"factorised"`` generates the left factor ``u`` of a rank-1 delta ``u vᵀ`` whose
            right factor ``v`` follows ``factor_rule`` from the layer input (``"sign"`` for Adam
            deltas, ``"input"`` for SGD) — exact for layers that see one vector per sample.
        factor_rule: ``"sign"`` or ``"input"`` (see ``delta_mode``).
        generator_type: what produces the delta from ``I(x)``. ``"diffusion"`` (the paper): the denoiser
            and DDIM sampling, one delta per draw. ``"regression"``: a deterministic MLP trained with
            MSE to predict the (normalised) delta or factor, i.e. its conditional mean; every draw is
            the same. ``"label"`` (classification): an MLP predicting ``q(y | I(x))``; the delta is
            ``Σ_y q(y|x) Δ(x, y)`` (``label_combination="expectation"``) or ``Δ(x, y)`` with
            ``y ~ q`` per draw (``"sample"``), where ``Δ(x, y)`` is computed exactly at inference by
            the harvest's own fine-tuning (``harvest_config``) with label ``y``.
        label_combination: ``"expectation"`` or ``"sample"`` (see ``generator_type``). A saved config's
            former key ``generator`` is read as ``generator_type``.
        denoiser_config: keyword arguments of ``diffusers.UNet2DModel`` for full mode (sample size
            and conditioning are filled in by the wrapper).
        factor_denoiser_config: ``hidden_dim``, ``num_layers``, ``embed_dim`` of the MLP denoiser
            for factorised mode.
        vae_config: the weight VAE of ``delta_mode="latent"`` (:data:`LATENT_VAE_CONFIG`): ``chunk_size`` (values per
            token of the row-major delta; must divide ``out_features × in_features``; default ``in_features``, a row),
            ``latent_size``, ``hidden_size``, ``num_layers``, ``vae_loss`` (``"paper"`` or ``"code"``, see
            :func:`ocd_hf.weight_vae.vae_losses`) and ``kl_weight``.
        latent_denoiser_config: ``hidden_size``, ``num_layers``, ``num_heads``, ``intermediate_size``, ``embed_dim`` of
            the transformer denoiser over the latent tokens (``delta_mode="latent"``).
        latent_scale: latents are diffused multiplied by this (1 / the std of the training deltas' latents; set by training).
        scheduler_class: the diffusers scheduler that samples (``"DDIMScheduler"``, as in the paper, with
            eta 0; or e.g. ``"DPMSolverMultistepScheduler"``, ``"EulerDiscreteScheduler"``,
            ``"DDPMScheduler"``: any of :data:`SAMPLING_SCHEDULERS`). Training always noises with
            DDPM's forward process over the same betas. A saved config without it loads as DDIM.
        scheduler_config: the scheduler's config (``from_config``): the betas and timesteps shared by
            training and sampling, plus any setting of the sampler (keys another class does not know are ignored).
        num_inference_steps: scheduler steps at sampling time.
        condition_hidden_dim: hidden size of the condition encoders ``E_i, E_a, E_o``.
        condition_components: which of ``"input"``, ``"activation"``, ``"output"`` condition the
            generator (all three in the paper; fewer for ablations).
        delta_normalization: ``"rms"`` or ``"std"``; a delta is stored as ``Δ / ρ`` with ``ρ`` that
            statistic of the delta, and generated deltas are brought back to unit ``ρ`` before scaling.
        log_rho_mean / log_rho_std: statistics of ``log ρ`` over the harvested deltas; the scale
            net predicts the standardised ``log ρ``.
        harvest_config: the settings the deltas were harvested with (optimizer, lr, steps, ...).
    """

    model_type = "ocd"

    def __init__(
        self,
        base_model_name_or_path: str | None = None,
        base_model_revision: str | None = None,
        base_model_class: str | None = None,
        target_module: str | None = None,
        in_features: int = 1,
        out_features: int = 1,
        output_dim: int = 1,
        per_token: bool = False,
        task: str = "classification",
        base_layer_fingerprint: str | None = None,
        delta_mode: str = "full",
        factor_rule: str = "sign",
        generator_type: str = "diffusion",
        label_combination: str = "expectation",
        denoiser_config: dict[str, Any] | None = None,
        factor_denoiser_config: dict[str, Any] | None = None,
        vae_config: dict[str, Any] | None = None,
        latent_denoiser_config: dict[str, Any] | None = None,
        latent_scale: float = 1.0,
        scheduler_class: str = DEFAULT_SCHEDULER_CLASS,
        scheduler_config: dict[str, Any] | None = None,
        num_inference_steps: int = 10,
        condition_hidden_dim: int = 256,
        condition_components: list[str] | tuple[str, ...] = CONDITION_COMPONENTS,
        delta_normalization: str = "rms",
        log_rho_mean: float = 0.0,
        log_rho_std: float = 1.0,
        harvest_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
        if delta_mode not in DELTA_MODES:
            raise ValueError(f"delta_mode must be one of {DELTA_MODES}, got {delta_mode!r}.")
        if delta_mode == "factorised" and per_token:
            raise ValueError(
                "delta_mode='factorised' needs a layer that sees one vector per sample (a head or MLP layer); "
                f"{target_module!r} is applied to every token, so its deltas are not rank-1. Use delta_mode='latent' (cheap on a CPU) or 'full'."
            )
        generator_type = kwargs.pop("generator", generator_type)  # the key configs saved before 0.2 use
        if generator_type not in GENERATOR_TYPES:
            raise ValueError(f"generator_type must be one of {GENERATOR_TYPES}, got {generator_type!r}.")
        if generator_type == "label" and task != "classification":
            raise ValueError(
                "generator_type='label' predicts a distribution over class labels and needs a classification backbone; "
                f"got task {task!r}. Use generator_type='diffusion' or 'regression'."
            )
        vae_config = merge_settings("vae_config", LATENT_VAE_CONFIG, vae_config)
        latent_denoiser_config = merge_settings("latent_denoiser_config", LATENT_DENOISER_CONFIG, latent_denoiser_config)
        if delta_mode == "latent":
            if generator_type != "diffusion":
                raise ValueError(
                    f"delta_mode='latent' diffuses in a VAE's latent space: it needs generator_type='diffusion', got {generator_type!r}. "
                    "Use delta_mode='full' or 'factorised' with a regression or label generator."
                )
            check_latent_settings(vae_config, latent_denoiser_config, int(out_features), int(in_features))
        if not latent_scale > 0:
            raise ValueError(f"latent_scale must be positive, got {latent_scale!r}.")
        if label_combination not in LABEL_COMBINATIONS:
            raise ValueError(f"label_combination must be one of {LABEL_COMBINATIONS}, got {label_combination!r}.")
        if factor_rule not in FACTOR_RULES:
            raise ValueError(f"factor_rule must be one of {FACTOR_RULES}, got {factor_rule!r}.")
        if delta_normalization not in DELTA_NORMALIZATIONS:
            raise ValueError(
                f"delta_normalization must be one of {DELTA_NORMALIZATIONS}, got {delta_normalization!r}."
            )
        unknown = sorted(set(condition_components) - set(CONDITION_COMPONENTS))
        if unknown or not condition_components:
            raise ValueError(
                f"condition_components must be a non-empty subset of {CONDITION_COMPONENTS}, got {list(condition_components)}."
            )
        scheduler_class_from_name(scheduler_class)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_revision = base_model_revision
        self.base_model_class = base_model_class
        self.target_module = target_module
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.output_dim = int(output_dim)
        self.per_token = bool(per_token)
        self.task = task
        self.base_layer_fingerprint = base_layer_fingerprint
        self.delta_mode = delta_mode
        self.factor_rule = factor_rule
        self.generator_type = generator_type
        self.label_combination = label_combination
        self.denoiser_config = {**DEFAULT_DENOISER_CONFIG, **(denoiser_config or {})}
        self.factor_denoiser_config = {**FACTOR_DENOISER_CONFIG, **(factor_denoiser_config or {})}
        self.vae_config = vae_config
        self.latent_denoiser_config = latent_denoiser_config
        self.latent_scale = float(latent_scale)
        self.scheduler_class = scheduler_class
        self.scheduler_config = {**DEFAULT_SCHEDULER_CONFIG, **(scheduler_config or {})}
        self.num_inference_steps = int(num_inference_steps)
        self.condition_hidden_dim = int(condition_hidden_dim)
        self.condition_components = [c for c in CONDITION_COMPONENTS if c in condition_components]
        self.delta_normalization = delta_normalization
        self.log_rho_mean = float(log_rho_mean)
        self.log_rho_std = float(log_rho_std)
        self.harvest_config = dict(harvest_config or {})
        super().__init__(**kwargs)
        complete_registration(self.model_type)  # AutoModel & co. learn OCDWrapper now (see ocd_hf.lazy_imports)

    @property
    def condition_sizes(self) -> dict[str, int]:
        """The size of each component of ``I(x)`` (see :data:`ocd_hf.target.CONDITION_FIELDS`)."""
        return {"input": self.in_features, "activation": self.out_features, "output": self.output_dim}

    @property
    def generator(self) -> str:
        """Former name of :attr:`generator_type` (kept so code written for earlier releases still reads it)."""
        return self.generator_type

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape ``(out_features, in_features)`` of the target weight."""
        return (self.out_features, self.in_features)

    @property
    def embed_dim(self) -> int:
        """Size of the condition embedding (the denoiser's time-embedding size)."""
        if self.delta_mode == "factorised":
            return int(self.factor_denoiser_config["embed_dim"])
        if self.delta_mode == "latent":
            return int(self.latent_denoiser_config["embed_dim"])
        return int(self.denoiser_config["block_out_channels"][0]) * 4

    @property
    def chunk_size(self) -> int:
        """Values per latent token (``delta_mode="latent"``): ``vae_config["chunk_size"]``, else ``in_features``."""
        return int(self.vae_config["chunk_size"] or self.in_features)

    @property
    def num_chunks(self) -> int:
        """Latent tokens per delta (``delta_mode="latent"``)."""
        return self.out_features * self.in_features // self.chunk_size

    @property
    def sample_size(self) -> tuple[int, int]:
        """Zero-padded ``(height, width)`` of the weight matrix as seen by the UNet (full mode)."""
        levels = len(self.denoiser_config["block_out_channels"])
        return (padded_size(self.out_features, levels), padded_size(self.in_features, levels))

    @classmethod
    def from_backbone(cls, backbone: Any, target_module: str, example_inputs: dict | None = None, **kwargs: Any) -> "OCDConfig":
        """Build a config for ``backbone`` and the Linear matched by ``target_module``.

        Shapes are read from the layer; ``output_dim``, ``task`` and ``per_token`` are read from
        the backbone's config, or measured with one forward pass on ``example_inputs`` if given. The
        backbone's ``id2label`` / ``label2id`` are copied and ``problem_type`` follows the task, so
        ``transformers`` pipelines name and score the classes as the backbone's own config does.
        """
        described = describe_backbone(backbone, target_module, example_inputs)
        labels = label_fields(backbone, described["output_dim"], described["task"])
        return cls(**{**described, **labels, **kwargs})

    def fill_label_fields(self, backbone: Any) -> None:
        """Take ``id2label`` / ``label2id`` and ``problem_type`` from ``backbone`` where this config has none
        of its own (default ``LABEL_i`` names, or a number of labels other than ``output_dim``)."""
        default_names = all(name == f"LABEL_{index}" for index, name in self.id2label.items())
        fields = label_fields(backbone, self.output_dim, self.task)
        if len(self.id2label) != self.output_dim or default_names:
            if "id2label" in fields:
                self.id2label, self.label2id = fields["id2label"], fields["label2id"]
            else:
                self.num_labels = fields["num_labels"]
        if self.problem_type is None:
            self.problem_type = fields["problem_type"]


def label_fields(backbone: Any, output_dim: int, task: str) -> dict[str, Any]:
    """``id2label`` and ``label2id`` of ``backbone``'s config (else ``num_labels=output_dim``) and the
    ``problem_type`` of ``task``: what ``transformers`` pipelines read to name and score the outputs."""
    config = getattr(backbone, "config", None)
    id2label = dict(getattr(config, "id2label", None) or {})
    fields: dict[str, Any] = {"problem_type": "regression" if task == "regression" else "single_label_classification"}
    if len(id2label) == output_dim:
        fields["id2label"] = {int(index): name for index, name in id2label.items()}
        fields["label2id"] = {name: index for index, name in fields["id2label"].items()}
    else:
        fields["num_labels"] = output_dim
    return fields
