"""LoRA-FA (arXiv 2308.03303): a LoRA whose down-projection A is frozen after its random
init (LoRA's default, Gaussian); only B (up, zero at the start) trains:

    W' = W + (alpha / r) B A0

With A fixed, the optimizer keeps state for B alone (less memory than a LoRA of the same
rank), and B's gradient needs only A0 x, r values per token, not the layer's input (the
paper's activation saving). The update stays in the row space of A0.

On disk it is a plain LoRA (kind lora, ss_network_module networks.lora, which every LoRA
loader reads); ss_network_args {"algo": "lora_fa"} records how it was trained. rsLoRA's
scale applies; DoRA, PiSSA / OLoRA init and LoRA+ do not (they train or place A).
"""
from __future__ import annotations

from typing import Literal

from studio.adapters.methods.base import ADAPTER_NAME, PeftTraining
from studio.adapters.methods.lora import PeftLoRA
from studio.adapters.methods.options import BlockRanks, NetworkOptions, RsLoRA


class LoRAFAOptions(RsLoRA, BlockRanks, NetworkOptions):
    type: Literal["lora_fa"] = "lora_fa"


class LoRAFATraining(PeftTraining):
    def injected(self, component, model):
        from peft.tuners.lora.layer import LoraLayer

        for layer in model.modules():
            if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A:
                layer.lora_A[ADAPTER_NAME].weight.requires_grad_(False)


class LoRAFA(PeftLoRA):
    name = "lora_fa"
    summary = "lora_fa (LoRA-FA: A frozen at its random init, only B trains; arXiv 2308.03303)"
    options = LoRAFAOptions
    training_class = LoRAFATraining

    def ss_network(self, net, adapter):
        module, args = super().ss_network(net, adapter)
        return module, {**args, "algo": self.name}

    def label(self, net, adapter):
        return self.name
