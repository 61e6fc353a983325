"""The settings of OCD's hypernetwork training, apart from its module so that the command line parses them
without importing the training code (diffusers, datasets)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...trainer import GeneratorTrainingArguments

SCALE_LOSSES = ("log_mse", "db")


@dataclass
class OCDTrainingArguments(GeneratorTrainingArguments):
    """The training loop's settings plus OCD's scale loss (see :func:`train_hypernetwork`)."""

    scale_loss: str = field(default="log_mse", metadata={
        "help": "log_mse: MSE on the standardised log ρ the scale net predicts; db: the paper's 10·log10((ρ̂−ρ)²/ρ² + 1e-8), "
        "unbounded below with a gradient ∝ 1/|ρ̂−ρ| that explodes when ρ is nearly constant (Adam deltas)",
        "choices": list(SCALE_LOSSES)})
    scale_loss_weight: float = field(default=1.0, metadata={"help": "weight of the scale loss added to the denoising loss"})
    vae_steps: int = field(default=1000, metadata={
        "help": "delta_mode='latent': optimizer steps of the weight VAE, trained on the deltas before the diffusion"})
    vae_learning_rate: float = field(default=1e-3, metadata={"help": "delta_mode='latent': the weight VAE's learning rate"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_loss not in SCALE_LOSSES:
            raise ValueError(f"scale_loss must be one of {SCALE_LOSSES}, got {self.scale_loss!r}.")
        if self.vae_steps < 1 or not self.vae_learning_rate > 0:
            raise ValueError(f"vae_steps must be >= 1 and vae_learning_rate > 0, got {self.vae_steps} and {self.vae_learning_rate}.")
