"""Rank allocation during training for lora / locon (network.rank_allocation), so that the
modules end with different ranks under one total (network.rank_budget).

ARD-LoRA (arXiv 2506.18267) learns scaling factors that decide the ranks, trained with the
task loss plus an L1 sparsity term and a total-variation term. Here a gate vector s [r] sits
between A and B of every LoRA layer (one factor per rank component), so a layer computes

    W' x = W x + (alpha / r) B diag(s ⊙ m) A x,      s starts at 1, m the 0/1 mask of live components.

The paper's factors are one per layer and head, a rank r0·α; one per component lets the
penalty switch single components off, which is what a kohya file with per-module ranks can
hold. A gate alone is not identifiable in a LoRA: B absorbs any scale of s, and with Adam an
L1 term on |s| lowers every gate by about its step size per step whatever the component
does (B starts at zero, so at first no gate gets a gradient from the loss). While this was
built, L1 and TV on |s| left 1 of 912 components of a 160-step LoCon on the built-in model.
So the penalty and the pruning act on each component's size, the norm of the rank-1 update
it adds,

    c_i = |s_i| · |B[:, i]| · |A[i, :]|,   penalty = ard_l1 · Σ_i c_i + ard_tv · Σ_i |c_(i+1) − c_i|

summed over the live components of every module (a group-lasso L1 that shrinks s, A and B of
a component together, and the total variation along rank); the scales train at
ard_lr_ratio x the learning rate (the paper's step size of their own).

Pruning (after the last step, and every ard_prune_every steps): components with c_i below
ard_threshold x the largest c of their module get m = 0; after the last step, with
rank_budget, the smallest c over all modules go until rank_budget components are left. The
export folds s into B (B diag(s)) and writes each module at its number of live components; a
module with none is left out.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

from pydantic import Field

from studio.adapters.methods.base import ADAPTER_NAME, is_text_encoder
from studio.adapters.methods.options import Section

if TYPE_CHECKING:
    import torch

    from studio.adapters.formats.files import AdapterFile

log = logging.getLogger(__name__)

# The names of a gate in named_parameters() and in the checkpoints.
SCALE, MASK = "ard_scale", "ard_mask"


class ARDOptions(Section):
    ard_l1: float = Field(1e-3, ge=0, le=10, description="ARD-LoRA: weight of the L1 penalty sum c_i on the components' sizes c_i = |s_i| |B_i| |A_i| (s: the learned scales).")
    ard_tv: float = Field(1e-3, ge=0, le=10, description="ARD-LoRA: weight of the total variation sum |c_i+1 - c_i| of each module's component sizes along rank.")
    ard_threshold: float = Field(0.1, ge=0, le=1, description="ARD-LoRA: components smaller than this x their module's largest are pruned.")
    ard_prune_every: int = Field(0, ge=0, le=1_000_000, description="ARD-LoRA: also prune every N steps during training (0 = only after the last step).")
    ard_lr_ratio: float = Field(10.0, gt=0, le=1000, description="ARD-LoRA: the scales learn at this x the learning rate (a step size of their own, as the paper's).")


def check(net) -> None:
    """Raise ValueError for settings ARD-LoRA cannot honour."""
    if net.use_dora or net.init != "default":
        raise ValueError("rank_allocation = 'ard' gates the product B A, which DoRA's norm and a PiSSA / OLoRA init "
                         "do not go through; use use_dora = false and init = 'default'")


class ARDGates:
    """The gates of one run's peft LoRA layers, keyed (component, module path)."""

    def __init__(self, net, max_steps: int):
        self.net, self.max_steps = net, max_steps
        self.scales: dict[tuple[str, str], torch.nn.Parameter] = {}
        self.masks: dict[tuple[str, str], torch.Tensor] = {}
        self.factors: dict[tuple[str, str], tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}

    def add(self, component: str, model: "torch.nn.Module") -> list["torch.nn.Parameter"]:
        """Put a gate after every LoRA down-projection of `model` (a forward hook on lora_A);
        returns the new scales."""
        import torch
        from peft.tuners.lora.layer import LoraLayer

        added = []
        for path, layer in model.named_modules():
            if not (isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A):
                continue
            down = layer.lora_A[ADAPTER_NAME]
            scale = torch.nn.Parameter(torch.ones(layer.r[ADAPTER_NAME], device=down.weight.device))
            mask = torch.ones_like(scale, requires_grad=False)
            down.register_forward_hook(_gate(scale, mask, conv=isinstance(down, torch.nn.Conv2d)))
            self.scales[(component, path)], self.masks[(component, path)] = scale, mask
            self.factors[(component, path)] = (down.weight, layer.lora_B[ADAPTER_NAME].weight)
            added.append(scale)
        return added

    def named_parameters(self, component: str) -> Iterator[tuple[str, "torch.nn.Parameter"]]:
        return ((f"{path}.{SCALE}", s) for (c, path), s in self.scales.items() if c == component)

    def sizes(self, key) -> "torch.Tensor":
        """c_i = |s_i| |B[:, i]| |A[i, :]| of module `key`'s components (masked ones 0)."""
        import torch

        down, up = self.factors[key]
        scale = self.scales[key] * self.masks[key]
        return (scale.abs() * torch.linalg.vector_norm(up.transpose(0, 1).flatten(1), dim=1)
                * torch.linalg.vector_norm(down.flatten(1), dim=1))

    def penalty(self) -> "torch.Tensor | None":
        """ard_l1 Σ c_i + ard_tv Σ |c_(i+1) − c_i| over the live components of every module."""
        if not self.scales or not (self.net.ard_l1 or self.net.ard_tv):
            return None
        total = 0.0
        for key in self.scales:
            live = self.sizes(key)[self.masks[key].bool()]
            total = total + self.net.ard_l1 * live.sum() + self.net.ard_tv * (live[1:] - live[:-1]).abs().sum()
        return total

    def after_step(self, done: int) -> None:
        every = self.net.ard_prune_every
        if done == self.max_steps or (every and done % every == 0):
            self.prune(budget=self.net.rank_budget if done == self.max_steps else None)

    def prune(self, *, budget: int | None) -> None:
        """Mask the live components with c_i < ard_threshold x their module's largest c (all of
        a module whose components are all 0), then, with a budget, the smallest c over all
        modules until `budget` are left. The largest component of all always stays (an
        adapter with no component would be no adapter)."""
        import torch

        keys = list(self.scales)
        with torch.no_grad():
            sizes = {k: self.sizes(k).float() for k in keys}
        keep = torch.cat([(self.masks[k] > 0) & (sizes[k] > 0) & (sizes[k] >= self.net.ard_threshold * sizes[k].max())
                          for k in keys])
        size = torch.cat([sizes[k] for k in keys])
        keep[size.argmax()] = True
        if budget is not None and int(keep.sum()) > budget:
            order = torch.argsort(torch.where(keep, size, torch.full_like(size, -1.0)), descending=True)
            keep = torch.zeros_like(keep)
            keep[order[:budget]] = True
        start = 0
        with torch.no_grad():
            for k in keys:
                n = self.masks[k].numel()
                self.masks[k].copy_(keep[start:start + n].to(self.masks[k].dtype))
                self.scales[k].mul_(self.masks[k])
                start += n
        log.info("ARD-LoRA: %d of %d rank components live", int(keep.sum()), keep.numel())

    def ranks(self) -> dict[tuple[str, str], int]:
        """Live components per module."""
        return {k: int(m.sum()) for k, m in self.masks.items()}

    def state(self) -> dict[str, "torch.Tensor"]:
        return {f"ard.{c}.{path}.{part}": t for (c, path), s in self.scales.items()
                for part, t in ((SCALE, s), (MASK, self.masks[(c, path)]))}

    def load_state(self, state) -> None:
        import torch

        with torch.no_grad():
            for (c, path), scale in self.scales.items():
                scale.copy_(state[f"ard.{c}.{path}.{SCALE}"])
                self.masks[(c, path)].copy_(state[f"ard.{c}.{path}.{MASK}"])

    def export(self, models, family: str) -> "AdapterFile":
        """The plain LoRA file: B diag(s ⊙ m) written as up, each module at its live rank."""
        import torch

        from studio.adapters.formats.files import export_adapter
        from studio.adapters.formats.modules import keep_components
        from studio.adapters.formats.naming import clean_path, path_to_name
        from peft.tuners.lora.layer import LoraLayer

        layers = {(c, path): layer for c, model in models.items() for path, layer in model.named_modules()
                  if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A}
        saved = {k: layers[k].lora_B[ADAPTER_NAME].weight.detach().clone() for k in self.scales}
        with torch.no_grad():
            for k, scale in self.scales.items():
                up = layers[k].lora_B[ADAPTER_NAME].weight
                gate = (scale * self.masks[k]).to(up.dtype)
                up.mul_(gate.view(1, -1, *([1] * (up.ndim - 2))))
        try:
            adapter = export_adapter(models, family=family, adapter_name=ADAPTER_NAME)
        finally:
            with torch.no_grad():
                for k, up in saved.items():
                    layers[k].lora_B[ADAPTER_NAME].weight.copy_(up)
        modules = {}
        for (c, path), mask in self.masks.items():
            name = path_to_name(family, c, clean_path(path), getattr(models[c], "config", None) if not is_text_encoder(c) else None)
            module = keep_components(adapter.modules[name], mask, self.net.alpha)
            if module is not None:
                modules[name] = module
        adapter.modules = modules
        return adapter


def _gate(scale, mask, *, conv: bool):
    """The forward hook that multiplies lora_A's output by s ⊙ m along its rank axis."""

    def hook(module, inputs, output):
        gate = (scale * mask).to(output.dtype)
        return output * (gate.view(1, -1, 1, 1) if conv else gate)

    return hook
