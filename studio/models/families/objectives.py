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

    @classmethod
    def check(cls, training: Any) -> list[str]:
        """The training settings this objective cannot honour, each as a sentence (a class
        method: studio.jobs.runs.check_training asks before any model loads)."""
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


class FlowMatchObjective(Objective):
    """Rectified flow as FLUX.1 was trained: x_σ = (1 - σ) x_0 + σ ε for a noise level σ in
    [0, 1], and the denoiser predicts the velocity ε - x_0 ("flow"). Timestep t = T σ
    (T = 1000, the scheduler's num_train_timesteps); the denoiser is handed t / T, as
    FluxPipeline does.

    σ is drawn logit-normal and then shifted, σ = s u / (1 + (s - 1) u), u = sigmoid(z),
    z ~ N(0, 1): sd-scripts' `--timestep_sampling shift --sigmoid_scale 1` (diffusers'
    `weighting_scheme="logit_normal"` before the shift), the SD3 paper's best sampler
    (Esser et al. 2024, rf/lognorm(0, 1)). The shift s is the one the scheduler samples with:
    its `shift`, or with `use_dynamic_shifting` exp(mu) for the picture size the VAE was made
    for (FLUX.1-dev: mu = 1.15 at 1024 px, s = 3.158, the discrete_flow_shift sd-scripts
    recommends for FLUX.1 LoRAs), so training spends its steps at the noise levels
    generation visits. No loss weighting (sd-scripts' default, "raw" prediction).

    training.min_timestep / max_timestep bound σ to [min, max) / T by drawing the quantile
    v uniformly between the bounds' quantiles (one uniform draw per sample, no rejection),
    so a resumed run draws exactly what an uninterrupted one draws."""

    prediction_type = "flow"

    def __init__(self, scheduler_config: Any, image_seq_len: int):
        import math

        config = dict(scheduler_config)
        self.timesteps = int(config.get("num_train_timesteps", 1000))
        if config.get("use_dynamic_shifting"):
            base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            slope = (max_shift - base_shift) / (max_len - base_len)
            self.shift = math.exp(base_shift + slope * (image_seq_len - base_len))
        else:
            self.shift = float(config.get("shift", 1.0))

    def sigma(self, quantile: "torch.Tensor") -> "torch.Tensor":
        """σ at quantile v of the sampling distribution."""
        import torch

        u = torch.sigmoid(torch.special.ndtri(quantile))
        return self.shift * u / (1 + (self.shift - 1) * u)

    def quantile(self, sigma: float) -> float:
        """The inverse of `sigma`: the quantile of noise level `sigma`."""
        import torch

        s = torch.tensor(sigma, dtype=torch.float64)
        u = s / (self.shift - (self.shift - 1) * s)
        return float(torch.special.ndtr(torch.logit(u)))

    def sample_timesteps(self, count, generator, training):
        import torch

        lo = min(training.min_timestep, self.timesteps - 1) / self.timesteps
        hi = min(training.max_timestep, self.timesteps) / self.timesteps
        v_lo, v_hi = self.quantile(lo), self.quantile(hi)
        v = v_lo + (v_hi - v_lo) * torch.rand((count,), generator=generator, dtype=torch.float64)
        sigma = self.sigma(v).clamp(lo, hi)
        t = (sigma * self.timesteps).float()
        # float rounding may land on the open end: keep t below max_timestep
        return torch.minimum(t, torch.nextafter(torch.tensor(hi * self.timesteps, dtype=torch.float32),
                                                torch.tensor(0.0)))

    def _sigmas(self, timesteps: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
        return (timesteps.to(like.device, torch_float(like)) / self.timesteps).reshape(-1, *[1] * (like.ndim - 1))

    def noisy(self, latents, noise, timesteps):
        sigma = self._sigmas(timesteps, latents)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    @classmethod
    def check(cls, training):
        if training.min_snr_gamma:
            return ["training.min_snr_gamma weights the loss by DDPM's signal-to-noise ratio, which a flow-matching "
                    "model (FLUX.1) does not have; unset it."]
        return []


def torch_float(tensor: "torch.Tensor"):
    """The tensor's dtype if floating point, else float32."""
    import torch

    return tensor.dtype if tensor.is_floating_point() else torch.float32


def flow_match_objective(pipe: Any) -> FlowMatchObjective:
    """The flow-matching objective of a pipeline's scheduler config, its shift taken at the
    image sequence length of the VAE's native size ((sample_size / VAE factor / 2)^2 packed
    2x2 patches)."""
    vae = pipe.vae.config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    side = int(vae.sample_size) // factor // 2
    return FlowMatchObjective(pipe.scheduler.config, side * side)
