"""SingLoRA (arXiv 2507.05566): one matrix A per layer instead of LoRA's two,

    W' = W + (alpha / r) u(t) A Aᵀ,   u(t) = min(t / T, 1)

t the optimizer steps done, T network.singlora_ramp_steps. For a layer W [out, in] that is
not square, the paper's truncated form: A [max(out, in), r] and ΔW = (alpha / r) u(t)
A[:out] A[:in]ᵀ; on a square layer ΔW is symmetric positive semi-definite. A layer trains
max(out, in)·r values, half of a rank-r LoRA's (out + in)·r on a square layer.

A starts non-zero, so the ramp from u(0) = 0 is what makes the start the base model (the
paper's reason for u). A's initial distribution is not checked against the paper (its full
text was not at hand): Aᵀ [r, n] is drawn as LoRA's down matrix (Kaiming-uniform, a = sqrt 5:
U(±1/sqrt n)) from a generator seeded by the run's seed. A Aᵀ then has off-diagonal entries of
standard deviation sqrt(r) / (3n) and a diagonal of r / (3n), below nn.Linear's own weight
scale 1/sqrt(n); a fan-in of r instead (U(±1/sqrt r)) would give a diagonal of 1/3, many
times the weights of an attention layer. The step count behind u is part of the resumable
state.

Not in peft: the layers are the method's own, applied by forward hooks
(base.LinearHookTraining); Linear layers only. On disk it is exactly a plain LoRA at rank r,
down = A[:in]ᵀ, up = (alpha / r) u A[:out], alpha = r (scale 1); ss_network_args
{"algo": "singlora", "ramp_steps": T}.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from studio.adapters.methods.base import LinearHookTraining, Method
from studio.adapters.methods.options import NetworkOptions

STEPS_KEY = "singlora.steps"


class SingLoRAOptions(NetworkOptions):
    """The shared options and the ramp: one matrix A per Linear layer at one rank."""

    type: Literal["singlora"] = "singlora"
    singlora_ramp_steps: int = Field(100, ge=1, le=1_000_000, description="SingLoRA: steps T of the ramp u(t) = min(t/T, 1) "
                                                                          "that fades the update in (the start is the base model).")


class SingLoRATraining(LinearHookTraining):
    def __init__(self, method, net, seed):
        super().__init__(method, net, seed)
        self.done = 0

    @property
    def ramp(self) -> float:
        """u(t) = min(t / T, 1) after t = self.done optimizer steps."""
        return min(self.done / self.net.singlora_ramp_steps, 1.0)

    def create(self, component, layers, generator):
        import math

        import torch

        out = {}
        for path, layer in layers.items():
            down = torch.empty(self.net.rank, max(layer.in_features, layer.out_features))
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            out[path] = {"singlora_A": down.t().contiguous()}
        return out

    def _scale(self) -> float:
        return self.net.alpha / self.net.rank * self.ramp

    def delta(self, component, path, x):
        import torch.nn.functional as F

        layer, a = self.layers[component][path], self.params[component][path]["singlora_A"]
        return self._scale() * F.linear(F.linear(x, a[:layer.in_features].t()), a[:layer.out_features])

    def factors(self, component, path):
        layer, a = self.layers[component][path], self.params[component][path]["singlora_A"]
        return a[:layer.in_features].t(), self._scale() * a[:layer.out_features]

    def after_step(self, done):
        self.done = done

    def state(self):
        import torch

        return {**self._param_state(), STEPS_KEY: torch.tensor(float(self.done))}

    def load_state(self, state):
        super().load_state(state)
        self.done = int(state[STEPS_KEY])


class SingLoRA(Method):
    name = "singlora"
    summary = ("singlora (SingLoRA: ΔW = alpha/r · u(t) A Aᵀ, one matrix, half LoRA's parameters, faded in over "
               "singlora_ramp_steps; arXiv 2507.05566)")
    options = SingLoRAOptions
    nf4 = False

    def training(self, net, *, seed, max_steps=None):
        return SingLoRATraining(self, net, seed)

    def ss_network(self, net, adapter):
        module, args = super().ss_network(net, adapter)
        return module, {**args, "algo": self.name, "ramp_steps": str(net.singlora_ramp_steps)}

    def label(self, net, adapter):
        return self.name
