"""VeRA (arXiv 2310.11454): one pair of frozen random matrices A [r, in_max] and
B [out_max, r] shared by every adapted Linear layer of a model, and per layer two trained
vectors, d [r] and b [out]:

    W' = W + diag(b) B[:out] diag(d) A[:, :in]

A and B are Kaiming-uniform (gain sqrt 2, fan-in: U(±sqrt(6 / in_max)) and U(±sqrt(6 / r)))
from a generator seeded by the run's seed, as peft's VeraConfig(projection_prng_key=seed)
draws them; d starts at 0.1 and b at 0 (peft's and the paper's d_initial, b = 0), so the
start is the base model. A layer trains r + out values whatever its input width: far fewer
than a LoRA of the same rank, so VeRA takes higher ranks (the paper: 256-1024) and learning
rates.

peft has VeRA, but its `inject_adapter_in_model` (our injection path,
studio.adapters.formats.peft_bridge.inject_peft_adapter) refuses it ("uses shared state stored
on the tuner"), so the layers here are the method's own, applied by forward hooks
(base.LinearHookTraining). Linear layers only: conv targets are refused, as peft does.

On disk it is exactly a plain LoRA at rank r, down = diag(d) A[:, :in], up = diag(b) B[:out],
alpha = r (scale 1); ss_network_args {"algo": "vera"} records how it was trained. The
network's alpha has no role in VeRA (b and d carry the scale).
"""
from __future__ import annotations

from typing import Literal

from studio.adapters.methods.base import LinearHookTraining, Method
from studio.adapters.methods.options import NetworkOptions

D_INITIAL = 0.1


class VeRAOptions(NetworkOptions):
    """Only the shared options: one frozen random A and B of one rank shared by every
    Linear layer leave no room for block ranks, conv layers or LoRA's init and scales."""

    type: Literal["vera"] = "vera"


class VeRATraining(LinearHookTraining):
    def __init__(self, method, net, seed):
        super().__init__(method, net, seed)
        self.projections: dict[str, tuple] = {}  # component -> (A, B), frozen

    def create(self, component, layers, generator):
        import torch

        r = self.net.rank
        in_max = max(layer.in_features for layer in layers.values())
        out_max = max(layer.out_features for layer in layers.values())
        a, b = torch.empty(r, in_max), torch.empty(out_max, r)
        for t in (a, b):  # peft's _kaiming_init: gain sqrt(2) over the fan-in
            torch.nn.init.kaiming_uniform_(t, nonlinearity="relu", generator=generator)
        device = next(iter(layers.values())).weight.device
        self.projections[component] = (a.to(device), b.to(device))
        return {path: {"vera_lambda_d": torch.full((r,), D_INITIAL), "vera_lambda_b": torch.zeros(layer.out_features)}
                for path, layer in layers.items()}

    def _sliced(self, component, path):
        layer = self.layers[component][path]
        a, b = self.projections[component]
        return a[:, :layer.in_features], b[:layer.out_features]

    def delta(self, component, path, x):
        import torch.nn.functional as F

        a, b = self._sliced(component, path)
        parts = self.params[component][path]
        return parts["vera_lambda_b"] * F.linear(parts["vera_lambda_d"] * F.linear(x, a), b)

    def factors(self, component, path):
        a, b = self._sliced(component, path)
        parts = self.params[component][path]
        return parts["vera_lambda_d"][:, None] * a, parts["vera_lambda_b"][:, None] * b


class VeRA(Method):
    name = "vera"
    summary = ("vera (VeRA: frozen random A, B shared by every layer, trained vectors d, b; alpha unused, higher "
               "rank and learning rate; arXiv 2310.11454)")
    options = VeRAOptions
    nf4 = False

    def training(self, net, *, seed, max_steps=None):
        return VeRATraining(self, net, seed)

    def ss_network(self, net, adapter):
        module, args = super().ss_network(net, adapter)
        return module, {**args, "algo": self.name}

    def label(self, net, adapter):
        return self.name
