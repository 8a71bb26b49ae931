"""LoRA: W' = W + (alpha / r) B A, A [r, in] random (Gaussian, std 1/r), B [out, r] zero, and its options:

- DoRA (use_dora): W' = m (W + s B A) / ||W + s B A||_row, a learned magnitude m per output;
- rsLoRA (use_rslora): scale alpha / sqrt(r) instead of alpha / r, steadier at high ranks;
- PiSSA / OLoRA (init): A and B start from the base weights (SVD / QR) and W becomes
  W - s B0 A0, so the file, which must apply to the unmodified W, holds the equivalent plain
  LoRA s (B A - B0 A0) at rank 2r (studio.adapters.formats.peft_bridge.modules_from_models);
- LoRA+ (loraplus_lr_ratio): B learns at ratio x the learning rate of A;
- rank allocation, so the file's modules end with different ranks under rank_budget:
  ARD-LoRA (rank_allocation = "ard", ard.py), a learned gate per rank component, pruned;
  Sensitivity-LoRA (rank_allocation = "sensitivity", sensitivity.py), ranks set before
  training from each module's measured sensitivity;
- LoRA-Squeeze (squeeze_rank): every module compressed to squeeze_rank during training by
  the truncated SVD of B A, then trained on (squeeze.py).

Trained with peft's LoraConfig; exported as kind lora (networks.lora, lycoris.kohya with DoRA).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from studio.errors import StudioError
from studio.adapters.methods import ard, init_from, squeeze
from studio.adapters.methods.ard import ARDOptions
from studio.adapters.methods.init_from import InitFromOptions
from studio.adapters.methods.base import ADAPTER_NAME, PeftMethod, PeftTraining, is_text_encoder
from studio.adapters.methods.options import BlockRanks, NetworkOptions, RankBudget, RsLoRA
from studio.adapters.methods.sensitivity import (SensitivityOptions, adapted_modules, allocate_ranks, configured_rank,
                                                 exact_rank_pattern, fisher_sensitivity, largest_rank)
from studio.adapters.methods.squeeze import SqueezeOptions, set_factors, squeeze_layer, squeeze_target


class LoRAOptions(InitFromOptions, SqueezeOptions, ARDOptions, SensitivityOptions, RankBudget, RsLoRA, BlockRanks, NetworkOptions):
    """LoRA's options (LoCon's too): every LoRA option applies; rank allocation by ARD with
    a plain init and no DoRA; squeeze_rank is below rank and not with DoRA (its magnitude is
    learned for the uncompressed direction), a PiSSA / OLoRA init (whose file holds the
    injected factors too, so it would not be a LoRA at squeeze_rank) or ARD's gates (which
    prune the components a squeeze re-mixes)."""

    type: Literal["lora"] = "lora"
    use_dora: bool = Field(False, description="DoRA: learn a per-output magnitude besides the direction.")
    init: Literal["default", "pissa", "olora"] = Field(
        "default", description="LoRA init: default (B = 0), pissa or olora (from the base weights; exported as an equivalent plain LoRA).")
    loraplus_lr_ratio: float | None = Field(None, gt=0, le=1000, description="LoRA+: learning rate of B (up) = ratio x learning rate (16 is common).")
    rank_allocation: Literal["none", "sensitivity", "ard"] = Field(
        "none", description="How ranks are set per module; none = rank everywhere; sensitivity = "
                            "Sensitivity-LoRA, before training, in proportion to each module's empirical-Fisher "
                            "sensitivity on a few batches (arXiv 2509.09119); ard = ARD-LoRA, a learned scale per rank "
                            "component, an L1 + total-variation penalty on the components' sizes, the smallest pruned "
                            "(arXiv 2506.18267).")

    @model_validator(mode="after")
    def _check_lora(self):
        if self.rank_budget is not None and self.rank_allocation == "none":
            raise ValueError("rank_budget needs a rank_allocation ('sensitivity' or 'ard') to end under it")
        if self.rank_allocation == "ard":
            ard.check(self)
        if self.init_from:
            init_from.check(self)
        if self.squeeze_rank is not None:
            if self.squeeze_rank >= self.rank:
                raise ValueError(f"squeeze_rank ({self.squeeze_rank}) must be below rank ({self.rank})")
            if self.use_dora or self.init != "default":
                raise ValueError("squeeze_rank does not work with use_dora or init = 'pissa' / 'olora'; turn those "
                                 "off, or squeeze the finished adapter with `lora-studio resize`")
            if self.rank_allocation == "ard":
                raise ValueError("squeeze_rank and rank_allocation = 'ard' both decide the ranks; use one of them")
        return self

    def learning_rate_ratios(self):
        ratios = {"loraplus_lr_ratio": self.loraplus_lr_ratio} if self.loraplus_lr_ratio else {}
        if self.rank_allocation == "ard":
            ratios["ard_lr_ratio"] = self.ard_lr_ratio
        return ratios


class LoRATraining(PeftTraining):
    """After a PiSSA / OLoRA init, keeps the injected factors: the export subtracts them.
    With rank_allocation = "ard" it holds the ARD-LoRA gates (their own parameter group, at
    ard_lr_ratio x the learning rate), adds their penalty and prunes them; with
    "sensitivity", injects at the ranks `prepare` measured; with squeeze_rank, compresses
    after the steps of its schedule."""

    def __init__(self, method, net, max_steps=None):
        super().__init__(method, net, max_steps)
        self.initial_factors: dict[tuple[str, str], tuple] = {}
        self.gates = None
        if net.rank_allocation == "ard":
            if max_steps is None:
                raise StudioError("rank_allocation = 'ard' prunes after the run's last step; it needs max_steps")
            self.gates = ard.ARDGates(net, max_steps)
        self.ranks: dict[str, dict[str, int]] = {}  # component -> module path -> allocated rank

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

    def regularization(self):
        return self.gates.penalty() if self.gates is not None else None

    def prepare(self, models, loss):
        """Sensitivity-LoRA: every adapted module's empirical-Fisher sensitivity on
        net.sensitivity_batches batches, then its rank under net.rank_budget (default: the
        ranks the config gives, summed). Returns the allocation for the run's events. With
        init_from, first: the file adapts no model the run leaves alone."""
        if self.net.init_from:
            init_from.check_components(self.net.init_from, models)
        if self.net.rank_allocation != "sensitivity":
            return None

        layers, configured = {}, {}
        for component, model in models.items():
            config = self.method.peft_config(self.net, text_encoder=is_text_encoder(component))
            for path, layer in adapted_modules(model, config).items():
                layers[(component, path)] = layer
                configured[(component, path)] = configured_rank(config, path)
        if not layers:
            raise StudioError("No trainable parameters: network.target_modules matched no layer of the model.")
        names = {key: f"{key[0]}.{key[1]}" for key in layers}
        sensitivity = fisher_sensitivity({names[k]: layer.weight for k, layer in layers.items()}, loss,
                                         self.net.sensitivity_batches)
        budget = self.net.rank_budget or sum(configured.values())
        ranks = allocate_ranks(sensitivity, budget, {names[k]: largest_rank(layer) for k, layer in layers.items()})
        for (component, path), name in names.items():
            self.ranks.setdefault(component, {})[path] = ranks[name]
        return {"method": self.net.rank_allocation, "budget": budget, "total": sum(ranks.values()),
                "ranks": ranks, "sensitivity": sensitivity}

    def peft_config(self, component):
        config = super().peft_config(component)
        if self.ranks.get(component):
            config.rank_pattern = {**exact_rank_pattern(self.ranks[component]), **config.rank_pattern}
        return config

    def lora_layers(self):
        """(component, path, layer) for every peft LoRA layer of this run."""
        from peft.tuners.lora.layer import LoraLayer

        return [(component, path, layer) for component, model in self.models.items()
                for path, layer in model.named_modules() if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A]

    def after_step(self, done):
        if self.gates is not None:
            self.gates.after_step(done)

        rank = squeeze_target(self.net, done)
        replaced = {}
        if rank is not None:
            for _, _, layer in self.lora_layers():
                replaced.update(squeeze_layer(layer, ADAPTER_NAME, rank))
        return replaced

    def load_state(self, state):
        """A checkpoint written after a squeeze holds smaller factors: the layers take their
        shapes (and ranks) first, then peft loads the values."""
        import torch

        replaced = {}
        for component, path, layer in self.lora_layers():
            down = state.get(f"{component}.{path}.lora_A.weight")
            up = state.get(f"{component}.{path}.lora_B.weight")
            if down is not None and up is not None and down.shape[0] != layer.r[ADAPTER_NAME]:
                replaced.update(set_factors(layer, ADAPTER_NAME, torch.zeros_like(down), torch.zeros_like(up)))
        super().load_state(state)
        if self.gates is not None:
            self.gates.load_state(state)
        return replaced

    def injected(self, component, model):
        if self.net.init_from:
            init_from.load_factors(self.net.init_from, component, model, ADAPTER_NAME)
        if self.net.init == "default":
            return
        from peft.tuners.lora.layer import LoraLayer

        self.initial_factors.update({
            (component, path): (layer.lora_A[ADAPTER_NAME].weight.detach().clone(),
                                layer.lora_B[ADAPTER_NAME].weight.detach().clone())
            for path, layer in model.named_modules() if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A})

    def export(self, family):
        from studio.adapters.formats.files import export_adapter

        if self.gates is not None:
            return self.gates.export(self.models, family)
        return export_adapter(self.models, family=family, adapter_name=ADAPTER_NAME,
                              initial_factors=self.initial_factors)


class PeftLoRA(PeftMethod):
    """A method trained as peft LoRA layers (LoraConfig): the plain LoRA at network.rank with
    rsLoRA's scale and block ranks, which LoRA extends with its options and LoRA-FA trains
    with A frozen. `lora_config` is what LoraConfig takes beyond that."""

    def lora_config(self, net) -> dict:
        return {"init_lora_weights": "gaussian"}

    def peft_config(self, net, *, text_encoder):
        from peft import LoraConfig

        return LoraConfig(r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout, use_rslora=net.use_rslora,
                          target_modules=self.targets(net, text_encoder=text_encoder),
                          **self.rank_patterns(net, text_encoder=text_encoder), **self.lora_config(net))

    def ss_network(self, net, adapter):
        module, args = super().ss_network(net, adapter)
        if net.use_rslora:
            args["rs_lora"] = "True"
        return module, args


class LoRA(PeftLoRA):
    name = "lora"
    summary = "lora"
    options = LoRAOptions
    training_class = LoRATraining

    def check_training(self, net, training):
        super().check_training(net, training)
        if training.base_weights == "nf4" and net.rank_allocation != "none":
            raise ValueError("network.rank_allocation measures gradients of the base weights, which a 4-bit base "
                             "does not have; set training.base_weights = 'full' or 'fp8'")
        if training.base_weights == "nf4" and net.init != "default":
            raise ValueError(f"network.init = {net.init!r} rewrites the base weights, which is not supported on a "
                             "4-bit base; use init = 'default', or training.base_weights = 'full' or 'fp8'")
        squeeze.check_training(net, training)

    def lora_config(self, net):
        return {"init_lora_weights": {"default": "gaussian", "pissa": "pissa", "olora": "olora"}[net.init],
                "use_dora": net.use_dora}

    def param_groups(self, model, lr, net):
        """With LoRA+ the B (up) matrices get lr x ratio."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise StudioError("No trainable parameters: network.target_modules matched no layer of the model.")
        if not net.loraplus_lr_ratio:
            return [{"params": [p for _, p in params], "lr": lr}]
        up = [p for n, p in params if ".lora_B." in n]
        rest = [p for n, p in params if ".lora_B." not in n]
        return [{"params": rest, "lr": lr}, {"params": up, "lr": lr * net.loraplus_lr_ratio}]

    def ss_network(self, net, adapter):
        module, args = super().ss_network(net, adapter)
        if net.rank_allocation == "ard":
            args.update(algo="ard_lora", rank_allocation="ard", ard_l1=f"{net.ard_l1:g}", ard_tv=f"{net.ard_tv:g}",
                        ard_threshold=f"{net.ard_threshold:g}", ard_lr_ratio=f"{net.ard_lr_ratio:g}",
                        **({"rank_budget": str(net.rank_budget)} if net.rank_budget else {}))
        elif net.rank_allocation != "none":
            args["rank_allocation"] = net.rank_allocation
            if net.rank_budget is not None:
                args["rank_budget"] = str(net.rank_budget)
        if net.squeeze_rank is not None:
            args["squeeze_rank"] = str(net.squeeze_rank)
            args["squeeze_at_step"] = str(net.squeeze_at_step)
            args["squeeze_anneal_steps"] = str(net.squeeze_anneal_steps)
        return module, args

    def label(self, net, adapter):
        """With rank allocation, what was trained and the ranks it ended with, e.g.
        "locon+ard (ranks 2-8)"."""
        label = super().label(net, adapter)
        if net.rank_allocation == "none":
            return label
        ranks = adapter.ranks
        return f"{label}+{net.rank_allocation} (ranks {ranks[0]}-{ranks[-1]})"

