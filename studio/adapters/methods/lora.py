"""LoRA: W' = W + (alpha / r) B A, A [r, in] random (Gaussian, std 1/r), B [out, r] zero, and its options:

- DoRA (use_dora): W' = m (W + s B A) / ||W + s B A||_row, a learned magnitude m per output;
- rsLoRA (use_rslora): scale alpha / sqrt(r) instead of alpha / r, steadier at high ranks;
- PiSSA / OLoRA (init): A and B start from the base weights (SVD / QR) and W becomes
  W - s B0 A0, so the file, which must apply to the unmodified W, holds the equivalent plain
  LoRA s (B A - B0 A0) at rank 2r (studio.adapters.formats.peft_bridge.modules_from_models);
- LoRA+ (loraplus_lr_ratio): B learns at ratio x the learning rate of A.

Trained with peft's LoraConfig; exported as kind lora (networks.lora, lycoris.kohya with DoRA).
"""
from __future__ import annotations

from studio.errors import StudioError
from studio.adapters.methods.base import ADAPTER_NAME, PeftMethod, PeftTraining


class LoRATraining(PeftTraining):
    """After a PiSSA / OLoRA init, keeps the injected factors: the export subtracts them."""

    def __init__(self, method, net):
        super().__init__(method, net)
        self.initial_factors: dict[tuple[str, str], tuple] = {}

    def injected(self, component, model):
        if self.net.init == "default":
            return
        from peft.tuners.lora.layer import LoraLayer

        self.initial_factors.update({
            (component, path): (layer.lora_A[ADAPTER_NAME].weight.detach().clone(),
                                layer.lora_B[ADAPTER_NAME].weight.detach().clone())
            for path, layer in model.named_modules() if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A})

    def export(self, family):
        from studio.adapters import export_adapter

        return export_adapter(self.models, family=family, adapter_name=ADAPTER_NAME,
                              initial_factors=self.initial_factors)


class LoRA(PeftMethod):
    name = "lora"
    summary = "lora"
    training_class = LoRATraining

    def check(self, net) -> None:
        """Every LoRA option applies."""

    def check_base_weights(self, net, base_weights):
        if base_weights == "nf4" and net.init != "default":
            raise ValueError(f"network.init = {net.init!r} rewrites the base weights, which is not supported on a "
                             "4-bit base; use init = 'default', or training.base_weights = 'full' or 'fp8'")

    def peft_config(self, net, *, text_encoder):
        from peft import LoraConfig

        init = {"default": "gaussian", "pissa": "pissa", "olora": "olora"}[net.init]
        return LoraConfig(r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout, init_lora_weights=init,
                          target_modules=self.targets(net, text_encoder=text_encoder), use_dora=net.use_dora,
                          use_rslora=net.use_rslora, **self.rank_patterns(net, text_encoder=text_encoder))

    def param_groups(self, model, lr, net):
        """With LoRA+ the B (up) matrices get lr x ratio."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise StudioError("No trainable parameters: network.target_modules matched no layer of the model.")
        if not net.loraplus_lr_ratio:
            return [{"params": [p for _, p in params], "lr": lr}]
        up = [p for n, p in params if ".lora_B." in n]
        rest = [p for n, p in params if ".lora_B." not in n]
        if not up:
            raise StudioError(f"loraplus_lr_ratio applies to lora/locon networks, not {net.type}.")
        return [{"params": rest, "lr": lr}, {"params": up, "lr": lr * net.loraplus_lr_ratio}]

    def ss_network(self, net, adapter):
        module, args = super().ss_network(net, adapter)
        if net.use_rslora:
            args["rs_lora"] = "True"
        return module, args

