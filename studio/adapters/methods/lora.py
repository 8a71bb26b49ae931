"""LoRA: W' = W + (alpha / r) B A, A [r, in] random (Gaussian, std 1/r), B [out, r] zero, and its options:

- DoRA (use_dora): W' = m (W + s B A) / ||W + s B A||_row, a learned magnitude m per output;
- rsLoRA (use_rslora): scale alpha / sqrt(r) instead of alpha / r, steadier at high ranks;
- PiSSA / OLoRA (init): A and B start from the base weights (SVD / QR) and W becomes
  W - s B0 A0, so the file, which must apply to the unmodified W, holds the equivalent plain
  LoRA s (B A - B0 A0) at rank 2r (studio.adapters.formats.peft_bridge.modules_from_models);
- LoRA+ (loraplus_lr_ratio): B learns at ratio x the learning rate of A;
- rank allocation (rank_allocation = "ard", ARD-LoRA): a learned gate per rank component,
  pruned, so the file's modules end with different ranks (`rank_allocation`).

Trained with peft's LoraConfig; exported as kind lora (networks.lora, lycoris.kohya with DoRA).
"""
from __future__ import annotations

from studio.errors import StudioError
from studio.adapters.methods import rank_allocation
from studio.adapters.methods.base import ADAPTER_NAME, PeftMethod, PeftTraining


class LoRATraining(PeftTraining):
    """After a PiSSA / OLoRA init, keeps the injected factors: the export subtracts them.
    With rank_allocation = "ard" it holds the ARD-LoRA gates (their own parameter group, at
    ard_lr_ratio x the learning rate), adds their penalty and prunes them."""

    def __init__(self, method, net, max_steps=None):
        super().__init__(method, net, max_steps)
        self.initial_factors: dict[tuple[str, str], tuple] = {}
        self.gates = None
        if net.rank_allocation == "ard":
            if max_steps is None:
                raise StudioError("rank_allocation = 'ard' prunes after the run's last step; it needs max_steps")
            self.gates = rank_allocation.ARDGates(net, max_steps)

    def add(self, component, model, lr):
        groups = super().add(component, model, lr)
        if self.gates is not None:
            groups.append({"params": self.gates.add(component, model), "lr": lr * self.net.ard_lr_ratio})
        return groups

    def named_parameters(self, component):
        yield from super().named_parameters(component)
        if self.gates is not None:
            yield from self.gates.named_parameters(component)

    def state(self):
        return {**super().state(), **(self.gates.state() if self.gates is not None else {})}

    def load_state(self, state):
        super().load_state(state)
        if self.gates is not None:
            self.gates.load_state(state)

    def regularization(self):
        return self.gates.penalty() if self.gates is not None else None

    def after_step(self, done):
        if self.gates is not None:
            self.gates.after_step(done)

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

        if self.gates is not None:
            return self.gates.export(self.models, family)
        return export_adapter(self.models, family=family, adapter_name=ADAPTER_NAME,
                              initial_factors=self.initial_factors)


class LoRA(PeftMethod):
    name = "lora"
    summary = "lora"
    training_class = LoRATraining

    def check(self, net) -> None:
        """Every LoRA option applies; rank allocation with a plain init and no DoRA."""
        if net.rank_budget is not None and net.rank_allocation == "none":
            raise ValueError("rank_budget needs a rank_allocation (e.g. 'ard') to end under it")
        if net.rank_allocation == "ard":
            rank_allocation.check(net)

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
        if net.rank_allocation == "ard":
            args.update(algo="ard_lora", rank_allocation="ard", ard_l1=f"{net.ard_l1:g}", ard_tv=f"{net.ard_tv:g}",
                        ard_threshold=f"{net.ard_threshold:g}", ard_lr_ratio=f"{net.ard_lr_ratio:g}",
                        **({"rank_budget": str(net.rank_budget)} if net.rank_budget else {}))
        return module, args

    def label(self, net, adapter):
        """With rank allocation, what was trained and the ranks it ended with, e.g.
        "locon+ard (ranks 2-8)"."""
        label = super().label(net, adapter)
        if net.rank_allocation == "none":
            return label
        ranks = adapter.ranks
        return f"{label}+{net.rank_allocation} (ranks {ranks[0]}-{ranks[-1]})"

