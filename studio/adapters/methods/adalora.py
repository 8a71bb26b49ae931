"""AdaLoRA (Zhang et al., ICLR 2023): the update in SVD form, pruned during training to a
total rank budget, so the modules end with different ranks:

    W' = W + (alpha / r0) P Λ Q,   P [out, r0], Λ = diag(λ) [r0], Q [r0, in] (conv: [r0, in·kh·kw]),

r0 = adalora_init_r (default 1.5 x rank), λ starting at zero. peft's AdaLoraConfig makes the
layers (Linear and Conv2d) and its RankAllocator does the schedule: after step t it scores
every triplet (P_i, λ_i, Q_i) by the smoothed sensitivity |θ ∂L/∂θ| times its uncertainty,
and zeroes the λ of the lowest ones to the budget b(t), which falls cubically from r0 x
modules after adalora_tinit steps to rank x modules (or rank_budget) adalora_tfinal steps
before the end, reallocating every adalora_delta_t steps; the ranks are then fixed. The loss
gets adalora_orth_reg x the mean over P and Q of |PᵀP − I|_F and |QQᵀ − I|_F. One allocator
spans the UNet and the text encoders, so the budget is shared between them.

On disk it is a plain LoRA (networks.lora; ss_network_args {"algo": "adalora", ...}): down
= Λ Q and up = P restricted to the surviving (λ ≠ 0) triplets, with the scale folded into up
so that every module has alpha = network.alpha (see formats.modules.keep_components); a
module with none left is not written.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from studio.errors import StudioError
from studio.adapters.methods.base import ADAPTER_NAME, PeftMethod, PeftTraining, is_text_encoder
from studio.adapters.methods.options import ConvTargets, NetworkOptions, RankBudget


class AdaLoRAOptions(RankBudget, ConvTargets, NetworkOptions):
    """AdaLoRA allocates the ranks itself (no block ranks, rank allocation or squeeze), on
    the attention layers and, as LoCon, the UNet's convs."""

    type: Literal["adalora"] = "adalora"
    adalora_init_r: int | None = Field(None, ge=1, le=1024, description="AdaLoRA: starting rank of every module, pruned to an average of rank (or rank_budget in total); default 1.5 x rank.")
    adalora_tinit: int | None = Field(None, ge=0, le=1_000_000, description="AdaLoRA: steps before pruning starts (default 10% of max_steps).")
    adalora_tfinal: int | None = Field(None, ge=0, le=1_000_000, description="AdaLoRA: last steps, with the ranks fixed (default 30% of max_steps).")
    adalora_delta_t: int | None = Field(None, ge=1, le=1_000_000, description="AdaLoRA: steps between two reallocations (default 1% of max_steps, at least 1).")
    adalora_orth_reg: float = Field(0.1, ge=0, le=100, description="AdaLoRA: weight of the orthogonality penalty |PᵀP - I| + |QQᵀ - I| (the paper's 0.1).")

    @model_validator(mode="after")
    def _check_adalora(self):
        if self.adalora_init_r is not None and self.adalora_init_r <= self.rank:
            raise ValueError(f"adalora_init_r ({self.adalora_init_r}) must exceed rank ({self.rank}), the average "
                             "rank AdaLoRA prunes to")
        return self


def schedule(net, max_steps: int) -> dict[str, int]:
    """init_r, target_r, tinit, tfinal, deltaT for a run of `max_steps`: the adalora_*
    settings, or their defaults scaled to the run."""
    return {"init_r": net.adalora_init_r or math.ceil(1.5 * net.rank), "target_r": net.rank,
            "tinit": max_steps // 10 if net.adalora_tinit is None else net.adalora_tinit,
            "tfinal": (3 * max_steps) // 10 if net.adalora_tfinal is None else net.adalora_tfinal,
            "deltaT": max(1, max_steps // 100) if net.adalora_delta_t is None else net.adalora_delta_t}


def schedule_problem(net, max_steps: int) -> str | None:
    """Why the schedule cannot prune in a run of `max_steps`, or None. peft's RankAllocator
    fixes the ranks at step final = max_steps - tfinal from the importance scores it gathered
    at the steps before it (none at `final` itself), and prunes between tinit and final: so
    it needs tinit < final (peft's own check) and a step before final (final >= 2; a 1-step
    run met its first check and died in the allocator on the scores it never gathered)."""
    s = schedule(net, max_steps)
    final = max_steps - s["tfinal"]
    if s["tinit"] >= final:
        return (f"network.adalora_tinit ({s['tinit']}) and adalora_tfinal ({s['tfinal']}) leave no pruning phase "
                f"in a run of {max_steps} steps; lower them or train longer")
    if final < 2:
        return (f"adalora fixes its ranks at step max_steps - adalora_tfinal = {final} by the importance it measured "
                f"at the steps before it, and this run has none; set training.max_steps to at least "
                f"{s['tfinal'] + 2} or lower network.adalora_tfinal")
    return None


class AdaLoRATraining(PeftTraining):
    """The AdaLoRA layers on each model, one RankAllocator over all of them. Checkpoints hold
    the layers' P, λ, Q, the allocator's smoothed scores (`adalora.<ipt|unc>.<name>`) and the
    fixed ranks of the last phase (`adalora.keep.<name>`), so a resumed run allocates as the
    uninterrupted one."""

    def __init__(self, method, net, max_steps):
        super().__init__(method, net, max_steps)
        self.allocator = None
        self.keep: dict[str, list[bool]] | None = None

    def peft_config(self, component):
        """Without layers in the unadapted sections: the allocator scores every AdaLoRA layer
        by its gradient, which a frozen one does not have."""
        return self.without_unadapted(component, self.method.peft_config(
            self.net, text_encoder=is_text_encoder(component), max_steps=self.max_steps))

    def _all(self):
        import torch

        return torch.nn.ModuleDict(self.models)

    def _allocator(self):
        from peft.tuners.adalora.layer import RankAllocator

        if self.allocator is None:
            models = self._all()
            config = next(iter(self.models.values())).peft_config[ADAPTER_NAME]
            self.allocator = RankAllocator(models, config, ADAPTER_NAME)
            if self.net.rank_budget is not None:
                self.allocator.target_bgt = self.net.rank_budget
            if self.allocator.target_bgt >= self.allocator.init_bgt:
                raise StudioError(f"network.rank_budget ({self.allocator.target_bgt}) must be below the rank AdaLoRA "
                                  f"starts from, adalora_init_r x {len(self.allocator.name_set)} modules = "
                                  f"{self.allocator.init_bgt}; lower it or raise adalora_init_r.")
        return self.allocator

    def regularization(self):
        """orth_reg x mean over every P and Q of |PᵀP − I|_F (P) and |QQᵀ − I|_F (Q), as peft's
        AdaLoraModel.forward adds it."""
        import torch

        self._allocator()  # made before the first step: a budget it cannot meet stops the run here
        terms = []
        for model in self.models.values():
            for name, p in model.named_parameters():
                if ("lora_A." in name or "lora_B." in name) and p.requires_grad:
                    cov = p @ p.T if "lora_A." in name else p.T @ p
                    terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device)))
        if not terms or not self.net.adalora_orth_reg:
            return None
        return self.net.adalora_orth_reg * torch.stack(terms).mean()

    def after_step(self, done):
        """peft's AdaLoraModel.update_and_allocate for step `done` on all models together,
        with the step's gradients (the trainer calls this before clearing them)."""
        allocator, models = self._allocator(), self._all()
        final = self.max_steps - allocator.peft_config.tfinal
        if done < final:
            allocator.update_and_allocate(models, done)
        elif done == final:
            _, pattern = allocator.update_and_allocate(models, done, force_mask=True)
            self.keep = {n: list(v) for n, v in pattern.items()}
            allocator.reset_ipt()
        else:
            allocator.mask_using_rank_pattern(models, self.keep)

    def state(self):
        import torch

        state = super().state()
        if self.allocator is not None:
            for name in self.allocator.exp_avg_ipt:
                state[f"adalora.ipt.{name}"] = self.allocator.exp_avg_ipt[name]
                state[f"adalora.unc.{name}"] = self.allocator.exp_avg_unc[name]
        for name, keep in (self.keep or {}).items():
            state[f"adalora.keep.{name}"] = torch.tensor(keep, dtype=torch.float32)
        return state

    def load_state(self, state):
        import torch

        super().load_state(state)
        allocator = self._allocator()
        allocator.reset_ipt()
        for key, value in state.items():
            if not key.startswith("adalora."):
                continue
            kind, _, name = key.removeprefix("adalora.").partition(".")
            if kind == "keep":
                self.keep = {**(self.keep or {}), name: (value > 0.5).tolist()}
                continue
            p = self._all().get_parameter(name)
            value = value.to(p.device, p.dtype)
            allocator.ipt[name] = torch.zeros_like(p)
            (allocator.exp_avg_ipt if kind == "ipt" else allocator.exp_avg_unc)[name] = value

    def export(self, family):
        """Plain LoRA modules: down = Λ Q, up = P over the triplets with λ ≠ 0, at the layer's
        scale alpha / (r0 + 1e-5) (peft divides by ranknum + 1e-5)."""
        import torch

        from studio.adapters.formats.files import AdapterFile
        from studio.adapters.formats.modules import LoraModule
        from studio.adapters.formats.modules import keep_components
        from studio.adapters.formats.naming import clean_path, path_to_name
        from peft.tuners.adalora.layer import AdaLoraLayer

        modules = {}
        for component, model in self.models.items():
            config = getattr(model, "config", None) if not is_text_encoder(component) else None
            for path, layer in model.named_modules():
                if not (isinstance(layer, AdaLoraLayer) and ADAPTER_NAME in layer.lora_A):
                    continue
                with torch.no_grad():
                    e = layer.lora_E[ADAPTER_NAME].detach().float().cpu()
                    down = layer.lora_A[ADAPTER_NAME].detach().float().cpu() * e
                    up = layer.lora_B[ADAPTER_NAME].detach().float().cpu()
                weight = layer.get_base_layer().weight
                if weight.ndim == 4:  # conv: Q [r0, in·kh·kw] -> [r0, in, kh, kw], P -> [out, r0, 1, 1]
                    down = down.reshape(down.shape[0], *weight.shape[1:])
                    up = up[:, :, None, None]
                scale = layer.scaling[ADAPTER_NAME] / (float(layer.ranknum[ADAPTER_NAME]) + 1e-5)
                full = LoraModule(down, up, scale * down.shape[0])
                module = keep_components(full, e.flatten() != 0, self.net.alpha)
                if module is not None:
                    modules[path_to_name(family, component, clean_path(path), config)] = module
        if not modules:
            raise StudioError("AdaLoRA pruned every triplet; nothing to export (raise rank or rank_budget).")
        return AdapterFile(modules, {}, family, "peft")


class AdaLoRA(PeftMethod):
    name = "adalora"
    summary = "adalora (AdaLoRA: SVD-form update pruned to a rank budget during training, per-module ranks)"
    training_class = AdaLoRATraining
    options = AdaLoRAOptions
    nf4 = False

    def check_training(self, net, training):
        """The schedule, where the config gives the run's length (an epoch run's is counted by
        the worker, and checked by `training`)."""
        super().check_training(net, training)
        problem = schedule_problem(net, training.max_steps) if training.max_epochs is None else None
        if problem:
            raise ValueError(problem)

    def training(self, net, *, seed, max_steps=None):
        if max_steps is None:
            raise StudioError("adalora schedules its pruning by the run's length; it needs max_steps")
        problem = schedule_problem(net, max_steps)
        if problem:
            raise StudioError(problem + ".")
        return super().training(net, seed=seed, max_steps=max_steps)

    def peft_config(self, net, *, text_encoder, max_steps: int = 1):
        """peft's AdaLoraConfig for a run of `max_steps` (the schedule scales with it)."""
        from peft import AdaLoraConfig

        return AdaLoraConfig(lora_alpha=net.alpha, lora_dropout=net.dropout, total_step=max_steps,
                             orth_reg_weight=net.adalora_orth_reg, target_modules=self.targets(net, text_encoder=text_encoder),
                             **schedule(net, max_steps))

    def targets(self, net, *, text_encoder):
        """The attention layers and, in the UNet, the convs (conv_target_modules), as locon."""
        return super().targets(net, text_encoder=text_encoder) + ([] if text_encoder else list(net.conv_target_modules))

    def ss_network(self, net, adapter):
        """networks.lora with {"algo": "adalora"} and its settings (the schedule's steps where
        set; unset ones scale with ss_max_train_steps)."""
        module, args = super().ss_network(net, adapter)
        options = {"init_r": net.adalora_init_r or math.ceil(1.5 * net.rank), "target_r": net.rank,
                   "rank_budget": net.rank_budget, "tinit": net.adalora_tinit, "tfinal": net.adalora_tfinal,
                   "deltaT": net.adalora_delta_t, "orth_reg_weight": net.adalora_orth_reg}
        return "networks.lora", {**args, "algo": self.name,
                                 **{k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in options.items()
                                    if v is not None}}

    def label(self, net, adapter):
        ranks = adapter.ranks
        return f"{self.name} (ranks {ranks[0]}-{ranks[-1]})"
