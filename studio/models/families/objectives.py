"""Training objectives: how a family's denoiser learns to denoise. A family names its
objective (studio.models.families.family.Family.objective), made from the pipeline's
scheduler config; the trainer only draws noise, asks the objective for timesteps, the noisy
input, the target and the loss weight, and never sees a scheduler.

Timesteps are floats in [0, T) (T = `timesteps`, the schedule's training steps): what the
block-timestep gates of mixtures and T-LoRA's rank mask read, whatever the objective.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Objective(ABC):
    """One family's training objective on one base model (its scheduler config)."""

    #: T, the number of training timesteps; timesteps are in [0, T)
    timesteps: int
    #: what the denoiser predicts, as modelspec.prediction_type writes it ("epsilon", "v", "flow")
    prediction_type: str

    @abstractmethod
    def sample_timesteps(self, count: int, generator: "torch.Generator", training: Any) -> "torch.Tensor":
        """`count` training timesteps drawn from `generator` within training.min_timestep ..
        max_timestep (the run's TrainingConfig)."""

    @abstractmethod
    def noisy(self, latents: "torch.Tensor", noise: "torch.Tensor", timesteps: "torch.Tensor") -> "torch.Tensor":
        """The denoiser's input at `timesteps`."""

    @abstractmethod
    def target(self, latents: "torch.Tensor", noise: "torch.Tensor", timesteps: "torch.Tensor") -> "torch.Tensor":
        """What the denoiser's output is compared with (mean squared error)."""

    def loss_weight(self, timesteps: "torch.Tensor", training: Any) -> "torch.Tensor | None":
        """A per-sample weight of the loss, or None (weight 1)."""
        return None

    def check(self, training: Any) -> list[str]:
        """The training settings this objective cannot honour, each as a sentence."""
        return []


class DiffusionObjective(Objective):
    """DDPM (Ho et al. 2020) as SD 1.x and SDXL were trained: x_t = sqrt(ᾱ_t) x_0 +
    sqrt(1 - ᾱ_t) ε with t uniform in [min_timestep, max_timestep); the denoiser predicts ε
    ("epsilon") or v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 ("v_prediction"), as the base model's
    scheduler config says. Min-SNR-γ weighting (Hang et al. 2023), training.min_snr_gamma:
    w = min(SNR_t, γ) / SNR_t for ε, times SNR_t / (SNR_t + 1) for v, SNR_t = ᾱ_t / (1 - ᾱ_t).
    The schedule's arithmetic is diffusers' DDPMScheduler's."""

    def __init__(self, scheduler_config: Any):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type

    def sample_timesteps(self, count, generator, training):
        import torch

        last = min(training.max_timestep, self.timesteps)
        return torch.randint(min(training.min_timestep, last - 1), last, (count,), generator=generator)

    def noisy(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def loss_weight(self, timesteps, training):
        import torch
        from diffusers.training_utils import compute_snr

        if not training.min_snr_gamma:
            return None
        snr = compute_snr(self.scheduler, timesteps)
        weight = torch.clamp(snr, max=training.min_snr_gamma) / snr
        if self.prediction_type == "v_prediction":
            weight = weight * snr / (snr + 1)
        return weight


def diffusion_objective(pipe: Any) -> DiffusionObjective:
    """The DDPM objective of a pipeline's scheduler config (SD 1.x, SDXL)."""
    return DiffusionObjective(pipe.scheduler.config)
