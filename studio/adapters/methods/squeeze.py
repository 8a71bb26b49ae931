"""LoRA-Squeeze (arXiv 2602.10993) annealed during training: train at network.rank, then
compress every LoRA module to network.squeeze_rank and train on (a LoRA / LoCon option;
the post-hoc form is `lora-studio resize`).

At the steps of the schedule (`squeeze_target`) each module whose rank r exceeds the
scheduled rank k gets the best rank-k approximation of its update (Eckart-Young),

    B' A' = U_k S_k V_k^T   where   B A = U S V^T,

with sqrt(S_k) split evenly between B' [out, k] and A' [k, in], computed exactly from the
factors by studio.adapters.merge.squeeze (QR of B and A^T and the SVD of the r x r core,
O((out + in) r^2)): a randomized SVD (torch.svd_lowrank) would only approximate what this
gets exactly at the same cost, since B A never has more than r singular values.

peft's scale s = alpha / r (alpha / sqrt(r) with rsLoRA) stays what it was: the layer's
rank becomes k and its alpha s * k (s * sqrt(k)), so the layer, its checkpoint and its
exported file (a plain LoRA at rank k, alpha s * k) all mean s B' A'. B' and A' are new
parameters (autograd keeps a leaf's shape, so a parameter cannot shrink in place); the
trainer puts them in the old ones' optimizer groups (LoRA+ ratios and block learning rates
hold) and their optimizer state restarts rather than being projected: Adam's second moment
is per coordinate of the old factor basis, which the SVD rotates, so no projection of it is
exact, and the bias correction of a fresh state keeps the first steps after the squeeze at
the learning rate's size.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field

from studio.adapters.methods.options import Section

if TYPE_CHECKING:
    import torch


class SqueezeOptions(Section):
    squeeze_rank: int | None = Field(
        None, ge=1, le=1024, description="LoRA-Squeeze: during training, compress every module to this rank by the "
                                         "truncated SVD of B·A, then train on (arXiv 2602.10993); off when unset.")
    squeeze_at_step: int = Field(100, ge=1, le=1_000_000, description="LoRA-Squeeze: the step after which the ranks start to fall.")
    squeeze_anneal_steps: int = Field(
        0, ge=0, le=1_000_000, description="LoRA-Squeeze: steps over which the rank falls linearly from rank to "
                                           "squeeze_rank (0 = all at once at squeeze_at_step).")


def check_training(net: SqueezeOptions, training) -> None:
    """Raise ValueError when the run's training settings cannot hold a squeeze: an EMA of the
    weights cannot follow their shape, and the squeeze must end before the last step (with
    max_epochs the worker counts the steps, so that is checked when it does)."""
    if net.squeeze_rank is None:
        return
    if training.ema_decay is not None:
        raise ValueError("network.squeeze_rank changes the adapter's shape mid-run, which an EMA of its "
                         "weights cannot follow; unset training.ema_decay or squeeze_rank")
    if training.max_epochs is None and net.squeeze_at_step + net.squeeze_anneal_steps >= training.max_steps:
        raise ValueError(f"network.squeeze_at_step + squeeze_anneal_steps ({net.squeeze_at_step} + "
                         f"{net.squeeze_anneal_steps}) must end before training.max_steps ({training.max_steps}), "
                         "so the squeezed adapter trains on")


def squeeze_target(net, done: int) -> int | None:
    """The rank every module should have at most after optimizer step `done`: None before
    squeeze_at_step; then falling linearly from network.rank to squeeze_rank over
    squeeze_anneal_steps steps (rounded up; all at once at squeeze_at_step when 0)."""
    if net.squeeze_rank is None or done < net.squeeze_at_step:
        return None
    progress = min(1.0, (done - net.squeeze_at_step + 1) / (net.squeeze_anneal_steps + 1))
    return max(net.squeeze_rank, math.ceil(net.rank - (net.rank - net.squeeze_rank) * progress))


def set_factors(layer, adapter: str, down: "torch.Tensor", up: "torch.Tensor") -> dict:
    """Give peft LoRA layer `layer` the factors A = down, B = up of a new rank k as new
    parameters, keeping its scale: r becomes k and lora_alpha the value that gives the same
    scale at k. Returns {old parameter: new parameter}."""
    import torch

    A, B = layer.lora_A[adapter], layer.lora_B[adapter]
    k = down.shape[0]
    scale = layer.scaling[adapter]
    replaced = {}
    for module, value in ((A, down), (B, up)):
        old = module.weight
        module.weight = torch.nn.Parameter(value.to(old.device, old.dtype).contiguous(), requires_grad=old.requires_grad)
        replaced[old] = module.weight
    for module, attr in ((A, "out_features"), (A, "out_channels"), (B, "in_features"), (B, "in_channels")):
        if hasattr(module, attr):
            setattr(module, attr, k)
    layer.r[adapter] = k
    layer.lora_alpha[adapter] = scale * (math.sqrt(k) if layer.use_rslora.get(adapter, False) else k)
    return replaced


def squeeze_layer(layer, adapter: str, rank: int) -> dict:
    """Replace the layer's B A by its best rank-`rank` approximation; returns {old parameter:
    new parameter}, empty (the layer untouched) when its rank is already at most `rank`."""
    import torch

    from studio.adapters.merge import Factors, squeeze

    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if A.shape[0] <= rank:
        return {}
    with torch.no_grad():
        squeezed = squeeze(Factors(up=B.detach(), down=A.detach()), rank=rank).factors
    return set_factors(layer, adapter, squeezed.down, squeezed.up)
