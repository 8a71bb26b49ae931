"""A LoRA / LoCon run that starts from an adapter file (network.init_from), e.g. an instant
adapter (studio.instant): HyperDreamBooth's use of its hypernetwork, a first guess that a
short run then sharpens.

Each module of the file goes into the injected peft layer of the same kohya name. Its
r_f <= r components become the layer's first r_f:

    A[:r_f] = down,   B[:, :r_f] = up x (file scale / layer scale),   B[:, r_f:] = 0

so the layer starts with exactly the file's update (peft computes B A x layer scale); the
other r - r_f components keep peft's init (A random, B = 0), free to learn what the file
lacks. Every module of the file must land: one for a layer the run does not adapt (another
target list, a section left out by block_lr_* = 0, a text encoder not trained) is refused,
as are kinds other than plain LoRA / LoCon (LoHa, LoKr, DoRA).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from pydantic import Field

from studio.adapters.methods.options import Section
from studio.errors import StudioError
from studio.models.families import get_family

if TYPE_CHECKING:  # torch, peft and the formats load in the functions that train: the config checks without them
    import torch


class InitFromOptions(Section):
    init_from: str = Field("", description="Start from this adapter file's LoRA factors (a path, or the name of an "
                                           "adapter in the library), e.g. an instant adapter (`lora-studio instant`): "
                                           "the file's rank at most rank / conv_rank. From a head start a lower "
                                           "learning rate than from scratch: 100 steps of tiny-demo-quick at 2e-3 "
                                           "from an instant adapter drew the purple star in 100% of prompts and kept "
                                           "the others; at its own 5e-3, 86% and 71% of the others right "
                                           "(bench.instant).")


def check(net) -> None:
    """The LoRA options init_from cannot start (ValueError, as the config's checks raise)."""
    if net.use_dora or net.init != "default" or net.rank_allocation != "none" or net.squeeze_rank is not None:
        raise ValueError("init_from starts a plain LoRA / LoCon: it does not work with use_dora, init = 'pissa' / "
                         "'olora', rank_allocation or squeeze_rank")


def _file(path: str):
    from studio.adapters.formats.files import load_adapter
    from studio.adapters.formats.modules import LORA

    adapter = load_adapter(Path(path))
    for name, module in adapter.modules.items():
        if module.kind != LORA or module.is_dora:
            kind = module.kind + ("+dora" if module.is_dora else "")
            raise StudioError(f"network.init_from: {Path(path).name} holds a {kind} module ({name}); a run can "
                              "start only from a plain LoRA / LoCon file.")
    return adapter


def check_components(path: str, models: Mapping[str, torch.nn.Module]) -> None:
    """Refuse a file with modules on a model the run does not adapt (`models`: component -> model)."""
    from studio.adapters.formats.naming import split_name

    adapter = _file(path)
    family = get_family(adapter.family)
    prefixes = {p.prefix: p.attr for p in family.parts}
    missing = sorted({prefixes.get(split_name(name)[0], name) for name in adapter.modules} - set(models))
    if missing:
        raise StudioError(f"network.init_from: {Path(path).name} adapts the {', '.join(missing)}, which this run does "
                          "not train; set network.train_text_encoder = true, or start from a file without it.")


def load_factors(path: str, component: str, model: torch.nn.Module, adapter_name: str) -> int:
    """Put the file's modules for `component` into the peft layers `adapter_name` just
    injected into `model` (see the module docstring); returns how many were loaded."""
    import torch
    from peft.tuners.lora.layer import LoraLayer

    from studio.adapters.formats.naming import clean_path, kohya_name, split_name

    adapter = _file(path)
    family = get_family(adapter.family)
    part = next(p for p in family.parts if p.attr == component)
    wanted = {name: m for name, m in adapter.modules.items() if split_name(name)[0] == part.prefix}
    config = getattr(model, "config", None) if component == "unet" else None
    loaded = set()
    with torch.no_grad():
        for path_in_model, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                continue
            name = kohya_name(part, clean_path(path_in_model), config)
            module = wanted.get(name)
            if module is None:
                continue
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            rank = module.rank
            if rank > a.shape[0]:
                raise StudioError(f"network.init_from: {name} has rank {rank} in the file but {a.shape[0]} in this "
                                  "run; set network.rank (and conv_rank) to at least the file's.")
            down, up = module.down.float(), module.up.float()
            if down.numel() != a[:rank].numel() or up.numel() != b[:, :rank].numel():
                raise StudioError(f"network.init_from: {name} does not fit its layer ({tuple(down.shape)} / "
                                  f"{tuple(up.shape)} against {tuple(a.shape)} / {tuple(b.shape)}).")
            a[:rank] = down.reshape(a[:rank].shape).to(a.dtype)
            scale = module.scale / layer.scaling[adapter_name]
            b[:, :rank] = (up * scale).reshape(b[:, :rank].shape).to(b.dtype)
            b[:, rank:] = 0
            loaded.add(name)
    unused = sorted(set(wanted) - loaded)
    if unused:
        raise StudioError(f"network.init_from: {len(unused)} module(s) of {Path(path).name} match no layer this run "
                          f"adapts (e.g. {unused[0]}); adapt the same layers (network.target_modules, "
                          "conv_target_modules, block_lr_* = 0 sections) as the file.")
    return len(loaded)
