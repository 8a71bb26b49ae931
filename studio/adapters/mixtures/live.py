"""Member updates applied live, as forward hooks on the base layers: for a layer of block j
(the family's `blocks.full`; BASE for the text encoders) and input x of sample b,

    y = W x + sum_k  g[b, k, j] * dW_k x            (per sample: training the gates)
    y = W x + sum_k  r[b, t, k] * dW_k x_t          (per token t: arrow routing)

dW_k x is computed from the member's own factors for LoRA / LoCon modules (x @ down^T @
up^T x alpha / r, never a full weight-sized matrix) and from its full update for LoHa /
LoKr. Used where the engine's merged weights cannot express the mix: gates that must get a
gradient, and weights that change per token. Layers of other shapes (grouped convs) are
refused by the member file's own fit check before this runs."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from studio.adapters.formats.files import AdapterFile
from studio.adapters.formats.modules import LORA
from studio.adapters.formats.naming import name_table
from studio.adapters.merge import Factors, singular_triplets
from studio.models.families import get_family


class MemberUpdate:
    """dW_k x for one member module on one layer."""

    def __init__(self, module, layer: torch.nn.Module):
        self.conv = isinstance(layer, torch.nn.Conv2d)
        self.layer = layer
        weight = layer.weight
        if module.kind == LORA:
            self.down = module.down.to(weight.device, weight.dtype)
            self.up = (module.up.float() * module.scale).to(weight.device, weight.dtype)
            self.full = None
        else:
            self.full = module.delta(weight.shape).to(weight.device, weight.dtype)

    def direction_weight(self) -> torch.Tensor:
        """The full update [out, in(, kh, kw)] (for routing's singular directions)."""
        if self.full is not None:
            return self.full.float()
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return product.reshape(self.up.shape[0], *self.down.shape[1:])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if self.conv:
            conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            if self.full is not None:
                return F.conv2d(x, self.full, **conv)
            return F.conv2d(F.conv2d(x, self.down, **conv), self.up)
        if self.full is not None:
            return F.linear(x, self.full)
        return F.linear(F.linear(x, self.down), self.up)


class LiveMembers:
    """Hooks adding the members' gated updates to the layers of `models` ({component:
    model}; the members' modules of other components are left out, their files having been
    checked against the whole pipeline when read). `weights(layer_column, x, updates)` is asked per layer call for the weight of
    each member's update: a tensor that broadcasts against the update (per sample [B, 1..]
    or per token [B, N, 1]); see `per_sample`."""

    def __init__(self, family: str, models: dict[str, torch.nn.Module], members: list[AdapterFile]):
        table = name_table(family, models)
        fam = get_family(family)
        denoiser = models.get(fam.denoiser)
        self.layers: dict[int, tuple[torch.nn.Module, int | None, dict[int, MemberUpdate]]] = {}
        for k, adapter in enumerate(members):
            for name, module in adapter.modules.items():
                target = table.get(name)
                if target is None:  # a module of a component not in `models` (each gets its own hooks)
                    continue
                block = fam.blocks.module_block(target.path, denoiser.config) if target.attr == fam.denoiser else "BASE"
                column = fam.blocks.full.index(block) if block else None
                entry = self.layers.setdefault(id(target.layer), (target.layer, column, {}))
                entry[2][k] = MemberUpdate(module, target.layer)
        self.count = len(members)
        self.weights: Callable | None = None
        self._handles = []

    def install(self, weights: Callable) -> "LiveMembers":
        """Hook every layer; `weights(column, x, updates) -> [tensor per member or None]`."""
        self.weights = weights
        for layer, column, updates in self.layers.values():
            self._handles.append(layer.register_forward_hook(self._hook(column, updates)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, column: int | None, updates: dict[int, MemberUpdate]):
        def hook(_layer, inputs, output):
            x = inputs[0]
            weights = self.weights(column, x, updates)
            for k, update in updates.items():
                if weights[k] is not None:
                    output = output + weights[k] * update(x)
            return output

        return hook


def per_sample(gates: Callable[[], torch.Tensor]) -> Callable:
    """Weights from a gate tensor [B or 1, K, N] (`gates()`, read at each call): member k
    of a layer in block column j gets g[:, k, j] on each sample (1 outside the blocks)."""

    def weights(column, x, updates):
        g = gates()
        out = []
        for k in range(g.shape[1]):
            if k not in updates:
                out.append(None)
                continue
            value = g[:, k, column] if column is not None else torch.ones_like(g[:, k, 0])
            out.append(value.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1)))
        return out

    return weights


def routing(top_k: int, temperature: float, scales: list[float]) -> Callable:
    """Arrow routing (LAG, arXiv 2507.05346; Arrow of Ostapenko et al.): per layer, member
    k's prototype v_k is the top right singular vector of its update dW_k (unit length, sign
    free); token x_t scores |<v_k, x_t>| (a conv layer: the score of each input patch, one
    conv with the prototypes as filters); the top_k members of each token share it by
    softmax(score / temperature), times the member's own scale. Training-free: nothing
    but the members' weights decides."""
    prototypes: dict[int, tuple[list[int], torch.Tensor]] = {}

    def prototype(updates: dict[int, MemberUpdate]) -> tuple[list[int], torch.Tensor]:
        if id(updates) not in prototypes:
            members, rows = list(updates), []
            for k in members:
                update = updates[k]
                if update.full is None:  # exact top direction from the factors (QR + a small SVD)
                    _, _, vh = singular_triplets(Factors(update.up, update.down))
                else:
                    vh = torch.linalg.svd(update.full.flatten(1).double(), full_matrices=False)[2]
                rows.append(vh[0].float())
            first = updates[members[0]]
            shape = (len(members), *first.layer.weight.shape[1:])
            prototypes[id(updates)] = (members, torch.stack(rows).reshape(shape).to(first.layer.weight))
        return prototypes[id(updates)]

    def weights(column, x, updates):
        members, v = prototype(updates)
        any_update = updates[members[0]]
        if any_update.conv:
            layer = any_update.layer
            scores = F.conv2d(x, v, stride=layer.stride, padding=layer.padding, dilation=layer.dilation).abs()
            scores = scores.movedim(1, -1)  # [B, H, W, K]
        else:
            scores = (x @ v.t()).abs()  # [..., K]
        keep = min(top_k, len(members))
        top = scores.topk(keep, dim=-1)
        share = torch.zeros_like(scores).scatter(-1, top.indices, torch.softmax(top.values / temperature, dim=-1))
        out: list[torch.Tensor | None] = [None] * len(scales)
        for place, k in enumerate(members):
            w = share[..., place] * scales[k]
            out[k] = w[:, None] if any_update.conv else w[..., None]
        return out

    return weights
