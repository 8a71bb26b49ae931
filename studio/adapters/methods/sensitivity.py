"""Sensitivity-LoRA (arXiv 2509.09119): per-module ranks set before training, in proportion
to each adapted module's sensitivity, under a total rank budget (network.rank_allocation =
"sensitivity", network.rank_budget). A LoRA / LoCon option.

Sensitivity of module m with base weight W_m, from the second-order term of the loss's
Taylor expansion, E(W + dW) ~ E + g.dW + 1/2 dW.H.dW: the paper's global metric is the
trace of H restricted to W_m. Here H is the empirical Fisher (the Gauss-Newton
approximation of H for a squared loss), whose diagonal needs only gradients:

    s_m = sum over W_m's entries of (1/N) sum_{i<N} (dL_i / dW_m)^2

over N batches of the run's own data (network.sensitivity_batches), drawn from a random
stream of their own (the trainer's micro-generators, stream 3: trainers.trainer.PREPARE_STREAM), so the allocation is a
function of the seed. The paper's local metrics (effective rank, top-k of the Hessian
diagonal) refine the split further; this keeps the global one, which decides it.

Ranks: r_m = budget * s_m / sum s, water-filled so no module exceeds min(out, in) (its
largest meaningful rank), then floored, raised to at least 1, and the rest of the budget
handed out by largest remainder: sum r_m <= budget, == budget unless every module is full.
peft receives them as an exact-name rank_pattern; alpha stays network.alpha, so each module
scales by alpha / its rank, as block ranks do.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Callable, Mapping

from pydantic import Field

from studio.errors import StudioError
from studio.adapters.methods.options import Section

if TYPE_CHECKING:
    import torch


class SensitivityOptions(Section):
    sensitivity_batches: int = Field(4, ge=1, le=256, description="Sensitivity-LoRA: batches of the run's data its sensitivities are measured on.")


def adapted_modules(model: "torch.nn.Module", config) -> dict[str, "torch.nn.Module"]:
    """path -> layer for every Linear / Conv2d of `model` that the peft `config` would adapt
    (peft's own target matching)."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists

    return {path: layer for path, layer in model.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and check_target_module_exists(config, path)}


def configured_rank(config, path: str) -> int:
    """The rank peft gives module `path` under `config` (its rank_pattern, first match, else r)."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(config.rank_pattern), path)
    return config.rank_pattern.get(key, config.r)


def largest_rank(layer: "torch.nn.Module") -> int:
    """min(out, in x kernel): the rank of the layer's full weight, beyond which a LoRA adds nothing."""
    weight = layer.weight
    return min(weight.shape[0], weight[0].numel())


def fisher_sensitivity(weights: Mapping[str, "torch.nn.Parameter"], loss: Callable[[int], "torch.Tensor"],
                       batches: int) -> dict[str, float]:
    """s_m = sum (1/N) sum_i (dL_i/dW_m)^2 for each named base weight (see the module
    docstring); `loss(i)` is the loss of the i-th batch. The weights' requires_grad is
    restored after. With several processes, each batch's gradient is the mean over them."""
    import torch
    import torch.distributed as dist

    names, params = list(weights), list(weights.values())
    was = [p.requires_grad for p in params]
    totals = [torch.zeros((), dtype=torch.float64, device=p.device) for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for i in range(batches):
            grads = torch.autograd.grad(loss(i), params, allow_unused=True)
            for total, grad in zip(totals, grads):
                if grad is None:
                    continue
                if dist.is_available() and dist.is_initialized():
                    grad = grad.clone()
                    dist.all_reduce(grad)
                    grad /= dist.get_world_size()
                total += grad.double().square().sum() / batches
    finally:
        for p, flag in zip(params, was):
            p.requires_grad_(flag)
    return {name: float(total) for name, total in zip(names, totals)}


def allocate_ranks(sensitivity: Mapping[str, float], budget: int, caps: Mapping[str, int]) -> dict[str, int]:
    """Ranks in proportion to `sensitivity` summing to at most `budget`, each in [1, caps[m]]
    (see the module docstring). Deterministic: ties go to the module named first in sorted order."""
    names = sorted(sensitivity)
    if budget < len(names):
        raise StudioError(f"network.rank_budget is {budget} but {len(names)} modules are adapted and each needs at "
                          f"least rank 1; raise rank_budget to at least {len(names)} or adapt fewer modules.")
    target: dict[str, float] = {}
    free = list(names)
    while free:  # water-filling: a module past its cap keeps the cap, the rest share what is left
        pool = budget - sum(target.values())
        total = sum(sensitivity[m] for m in free)
        share = {m: pool * (sensitivity[m] / total if total > 0 else 1 / len(free)) for m in free}
        full = [m for m in free if share[m] >= caps[m]]
        if not full:
            target.update(share)
            break
        for m in full:
            target[m] = float(caps[m])
            free.remove(m)
    ranks = {m: min(caps[m], max(1, math.floor(target[m]))) for m in names}
    # the minimum of 1 may overshoot: take back from the modules furthest above their share,
    # among equals the largest (one rank less matters least there)
    while sum(ranks.values()) > budget:
        m = max((m for m in names if ranks[m] > 1), key=lambda m: (ranks[m] - target[m], ranks[m], m))
        ranks[m] -= 1
    left = budget - sum(ranks.values())
    while left > 0:
        room = [m for m in names if ranks[m] < caps[m]]
        if not room:
            break
        for m in sorted(room, key=lambda m: -(target[m] - ranks[m]))[:left]:
            ranks[m] += 1
            left -= 1
    return ranks


def exact_rank_pattern(ranks: Mapping[str, int]) -> dict[str, int]:
    """peft rank_pattern entries that match exactly one module path each."""
    return {f"^{re.escape(path)}$": rank for path, rank in ranks.items()}
