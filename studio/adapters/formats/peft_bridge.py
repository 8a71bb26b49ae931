"""peft adapters in memory <-> file modules.

Export reads whatever peft adapter (LoRA / LoCon / DoRA / rsLoRA, LoHa, LoKr) sits on the
models under a given adapter name, with its rank and alpha from the layers (which carry
rank_pattern / alpha_pattern already resolved). Attach injects a file's modules as peft
layers (LoraConfig, LoHaConfig, LoKrConfig with per-module rank and alpha patterns, DoRA
via use_dora with the magnitude loaded) after checking every module against the model.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from studio.errors import StudioError
from studio.adapters.formats.modules import (LOHA, LOKR, LORA, AdapterModule, dora_axis, dora_scale_from_magnitude,
                                    magnitude_from_dora_scale, module_rows, stack_rows)
from studio.models.families import FAMILIES, get_family
from studio.adapters.formats.naming import (Target, base_layers, clean_path, kohya_name, layout_piece, name_table)

log = logging.getLogger(__name__)

NETWORK_TYPES = ("lora", "locon", "loha", "lokr")


@dataclass(frozen=True)
class AdapterType:
    """What kind of adapter a file holds: network in {lora, locon, loha, lokr} and the DoRA
    flag (rsLoRA only changes the scale, which the file's alpha carries). How it was trained
    is the method's business (studio.adapters.methods): DoRA, PiSSA and a T-LoRA's plain form all
    hold lora modules."""

    network: str = "lora"
    dora: bool = False

    def __post_init__(self):
        if self.network not in NETWORK_TYPES:
            raise StudioError(f"Unknown network type {self.network!r}; choose one of {', '.join(NETWORK_TYPES)}.")
        if self.dora and self.network not in ("lora", "locon"):
            raise StudioError("DoRA is available for lora and locon networks only.")

    @property
    def label(self) -> str:
        return self.network + ("+dora" if self.dora else "")

    @property
    def kind(self) -> str:
        """The file module kind (lora for LoRA and LoCon)."""
        return {"lora": LORA, "locon": LORA, "loha": LOHA, "lokr": LOKR}[self.network]

    @property
    def ss_network_module(self) -> str:
        return "networks.lora" if self.network in ("lora", "locon") and not self.dora else "lycoris.kohya"

    def ss_network_args(self, conv_dim: int | None = None, conv_alpha: float | None = None) -> dict[str, str]:
        args: dict[str, str] = {}
        if self.ss_network_module == "lycoris.kohya":
            args["algo"] = self.network
        if conv_dim is not None:
            args["conv_dim"] = str(conv_dim)
            args["conv_alpha"] = f"{conv_alpha:g}" if conv_alpha is not None else str(conv_dim)
        if self.dora:
            args["dora_wd"] = "True"
            args["wd_on_output"] = "True"
        return args

    @classmethod
    def of_modules(cls, modules: Mapping[str, AdapterModule]) -> "AdapterType":
        kinds = {m.kind for m in modules.values()}
        dora = any(m.is_dora for m in modules.values())
        if LOKR in kinds:
            network = "lokr"
        elif LOHA in kinds:
            network = "loha"
        elif any(m.is_conv_kernel for m in modules.values()):
            network = "locon"
        else:
            network = "lora"
        return cls(network, dora and network in ("lora", "locon"))


# --------------------------------------------------------------------------------------
# peft -> file modules
# --------------------------------------------------------------------------------------


def module_from_peft(kind: str, tensors: Mapping[str, torch.Tensor], *, r: int, alpha: float,
                     use_rslora: bool = False, magnitude: torch.Tensor | None = None) -> AdapterModule:
    """A file module from one peft layer's tensors (peft parameter names: lora_A, lora_B,
    hada_*, lokr_*), with the file alpha that reproduces peft's scale in kohya/LyCORIS loaders."""
    t = {k: v.detach().float().cpu().clone() for k, v in tensors.items()}
    if kind == LORA:
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        module = AdapterModule(LORA, {"lora_down.weight": t["lora_A"], "lora_up.weight": t["lora_B"]},
                               scale * t["lora_A"].shape[0])
        if magnitude is not None:
            module.magnitude = magnitude.detach().float().cpu().flatten().clone()
        return module
    if kind == LOHA:
        return AdapterModule(LOHA, t, alpha * t["hada_w1_b"].shape[0] / r)
    scale = alpha / r
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    if dim is None:  # two full factors: LyCORIS loaders apply no scale, so it goes into w1
        t["lokr_w1"] = t["lokr_w1"] * scale
        return AdapterModule(LOKR, t, None)
    return AdapterModule(LOKR, t, scale * dim)


def _minus_start(end: AdapterModule, start: AdapterModule) -> AdapterModule:
    """The LoRA module end - start (same rank and scale) as one module of twice the rank."""
    down = torch.cat([end.down, start.down], dim=0)
    up = torch.cat([end.up, -start.up], dim=1)
    module = AdapterModule(LORA, {"lora_down.weight": down, "lora_up.weight": up}, end.scale * down.shape[0])
    module.magnitude = end.magnitude
    return module


def _layer_state(layer, adapter_name: str):
    """(kind, tensors, r, alpha, use_rslora, magnitude) of one peft layer, or None when
    the adapter is not on it."""
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer
    from peft.tuners.lora.layer import LoraLayer

    if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
        if getattr(layer.lora_B[adapter_name], "bias", None) is not None:
            raise StudioError("LoRA layers with a bias (lora_bias=True) have no kohya file layout.")
        magnitude = None
        if layer.use_dora.get(adapter_name, False):
            magnitude = layer.lora_magnitude_vector[adapter_name].weight
        return (LORA, {"lora_A": layer.lora_A[adapter_name].weight, "lora_B": layer.lora_B[adapter_name].weight},
                layer.r[adapter_name], layer.lora_alpha[adapter_name], layer.use_rslora.get(adapter_name, False),
                magnitude)
    for cls, kind in ((LoHaLayer, LOHA), (LoKrLayer, LOKR)):
        if isinstance(layer, cls) and adapter_name in layer._available_adapters:
            tensors = {name: getattr(layer, name)[adapter_name] for name in layer.adapter_layer_names
                       if adapter_name in getattr(layer, name)}
            return kind, tensors, layer.r[adapter_name], layer.alpha[adapter_name], False, None
    return None


def modules_from_models(family: str, models: Mapping[str, torch.nn.Module], adapter_name: str = "default",
                        initial_factors: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] | None = None,
                        ) -> dict[str, AdapterModule]:
    """kohya name -> file module for the peft adapter `adapter_name` on the pipeline's
    models (the family's parts: unet, text_encoder, text_encoder_2). DoRA modules get both
    their peft magnitude and the dora_scale computed from the base weight.

    `initial_factors` {(model key, module path): (lora_A, lora_B) as injected} is for an
    init that moved the base weights (PiSSA, OLoRA: W_res = W - s B0 A0): those modules are
    written as the plain LoRA that turns the original W into the trained weight,
    s (B A - B0 A0) at rank 2r."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, AdapterModule] = {}
    for part in get_family(family).parts:
        model = models.get(part.attr)
        if model is None:
            continue
        config = getattr(model, "config", None) if part.attr == "unet" else None
        fused: dict[str, dict[int, tuple[str, AdapterModule]]] = {}
        for path, layer in model.named_modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            state = _layer_state(layer, adapter_name)
            if state is None:
                continue
            kind, tensors, r, alpha, rslora, magnitude = state
            base = layer.get_base_layer()
            if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                raise StudioError(f"{part.attr}.{clean_path(path)} is a {type(base).__name__}; only Linear and "
                                  "Conv2d layers have a kohya file layout.")
            module = module_from_peft(kind, tensors, r=r, alpha=alpha, use_rslora=rslora, magnitude=magnitude)
            initial = (initial_factors or {}).get((part.attr, path))
            if initial is not None:
                start = module_from_peft(kind, {"lora_A": initial[0], "lora_B": initial[1]}, r=r, alpha=alpha,
                                         use_rslora=rslora)
                module = _minus_start(module, start)
            if module.magnitude is not None:
                from peft.utils.integrations import dequantize_module_weight

                weight = dequantize_module_weight(base).detach().float()  # QDoRA: the 4-bit base, unpacked
                if initial is not None:
                    weight = weight + start.delta(weight.shape)  # the original weights, before the init moved them
                module.dora_scale = dora_scale_from_magnitude(weight, module.delta(weight.shape), module.magnitude)
            piece = layout_piece(part, clean_path(path))
            if piece is not None and piece.fused:
                fused.setdefault(piece.path, {})[piece.index] = (clean_path(path), module)
                continue
            name = kohya_name(part, clean_path(path), config)
            if name in out:
                raise StudioError(f"Two layers map to the kohya name {name}.")
            out[name] = module
        out.update(_fused_modules(part, model, fused))
    if not out:
        raise StudioError(f"No peft adapter named {adapter_name!r} on the models; nothing to export.")
    return out


def _fused_modules(part, model: torch.nn.Module, fused: Mapping[str, Mapping[int, tuple[str, AdapterModule]]]
                   ) -> dict[str, AdapterModule]:
    """The file modules of the layers `part`'s layout fuses (FLUX.1's qkv, linear1), from the
    modules trained on their diffusers parts: LoRA parts stack into the one module
    sd-scripts writes (stack_rows); a LoHa / LoKr has no such sum, so each part keeps a name
    of its own (the part's first alias prefix and its diffusers path: SimpleTuner's
    `lycoris_` names, which ComfyUI maps to the slice of the fused weight)."""
    if not fused:
        return {}
    layers = base_layers(model)
    by_layout: dict[str, dict[int, str]] = {}
    for path in layers:
        piece = layout_piece(part, path)
        if piece is not None and piece.fused:
            by_layout.setdefault(piece.path, {})[piece.index] = path
    out: dict[str, AdapterModule] = {}
    for layout_path, parts in fused.items():
        paths = [by_layout[layout_path][i] for i in sorted(by_layout[layout_path])]
        name = f"{part.prefix}_{layout_path.replace('.', '_')}"
        if all(module.kind == LORA for _, module in parts.values()):
            modules = [parts[i][1] if i in parts else None for i in sorted(by_layout[layout_path])]
            out[name] = stack_rows(modules, [layers[p].weight.shape[0] for p in paths], f"{part.attr}.{layout_path}")
        else:
            for path, module in parts.values():
                out[f"{part.alias_prefixes[0]}_{path.replace('.', '_')}"] = module
    return out


def plans_for(name: str, module: AdapterModule, target: Target) -> list["_Plan"]:
    """The peft layers a file module becomes: one, or for a fused layer one per part it
    updates (module_rows)."""
    if not target.pieces:
        return [_Plan(target.attr, target.path, target.layer, module)]
    plans = []
    for piece, start, stop in target.rows():
        part = module_rows(module, start, stop, f"{name} ({piece.path})")
        if part is not None:
            plans.append(_Plan(piece.attr, piece.path, piece.layer, part))
    return plans


# --------------------------------------------------------------------------------------
# file modules -> peft
# --------------------------------------------------------------------------------------


def _in_out(layer: torch.nn.Module) -> tuple[int, int, tuple[int, int]]:
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features, (1, 1)
    if layer.groups != 1:
        raise StudioError("grouped convolutions have no LoRA layout")
    return layer.in_channels, layer.out_channels, tuple(layer.kernel_size)


def check_fit(name: str, module: AdapterModule, target: Target) -> str | None:
    """Why `module` does not fit the layer it names (None when it fits)."""
    if target.pieces:
        try:
            module.delta(target.weight_shape)
            if module.kind == LORA and (module.down.shape[1] != target.weight_shape[1]
                                        or module.up.shape[0] != target.weight_shape[0]):
                raise StudioError(f"file {(module.up.shape[0], module.down.shape[1])}, model {target.weight_shape}")
            for plan in plans_for(name, module, target):
                why = check_fit(name, plan.module, Target(plan.attr, plan.path, plan.layer))
                if why:
                    return why
        except StudioError as error:
            return f"{name}: {error}"
        return None
    inp, out, kernel = _in_out(target.layer)
    conv = isinstance(target.layer, torch.nn.Conv2d)
    t = module.tensors
    shape = target.weight_shape
    if module.kind == LORA:
        down, up = module.down, module.up
        want_kernel = kernel if conv else (1, 1)
        got_kernel = tuple(down.shape[2:]) if down.ndim == 4 else (1, 1)
        if down.shape[1] != inp or up.shape[0] != out or got_kernel != want_kernel:
            got = (up.shape[0], down.shape[1], *(got_kernel if down.ndim == 4 else ()))
            return f"{name}: file {got}, model {shape}"
    else:
        try:
            module.delta(shape)
        except StudioError as error:
            return f"{name}: {error}"
        if module.kind == LOHA and "hada_t1" in t and tuple(t["hada_t1"].shape[2:]) != kernel:
            return f"{name}: Tucker core {tuple(t['hada_t1'].shape)} for a {kernel} kernel"
        if module.kind == LOKR:
            a, c = _lokr_w1_shape(t)
            b, d = _lokr_w2_dims(t, kernel)
            if a * b != out or c * d != inp:
                return f"{name}: Kronecker factors ({a}x{c}) x ({b}x{d}) for a layer of shape {shape}"
    if module.dora_scale is not None:
        try:
            dora_axis(module.dora_scale, shape)
        except StudioError as error:
            return f"{name}: {error}"
    if module.magnitude is not None and module.magnitude.numel() != out:
        return f"{name}: DoRA magnitude of {module.magnitude.numel()} values for {out} output channels"
    return None


def _lokr_w1_shape(t) -> tuple[int, int]:
    if "lokr_w1" in t:
        return tuple(t["lokr_w1"].shape[:2])
    return t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]


def _lokr_w2_dims(t, kernel) -> tuple[int, int]:
    k = kernel[0] * kernel[1]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
        return w2.shape[0], (w2.shape[1] if w2.ndim == 4 else w2.shape[1] // k)
    if "lokr_t2" in t:
        return t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1]
    return t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1] // k


@dataclass
class _Plan:
    attr: str
    path: str
    layer: torch.nn.Module
    module: AdapterModule


def _common(values: list) -> Any:
    return max(set(values), key=values.count)


def _lora_config(plans: list[_Plan]):
    from peft import LoraConfig

    dora = {p.module.is_dora for p in plans}
    if len(dora) > 1:
        raise StudioError("some modules have DoRA scales and others not; peft needs one or the other per model")
    for p in plans:
        if p.module.dora_scale is not None and p.module.magnitude is None:
            if dora_axis(p.module.dora_scale, tuple(p.layer.weight.shape)) == "input":
                raise StudioError(f"{p.path} has an input-axis dora_scale {tuple(p.module.dora_scale.shape)} (A1111 / "
                                  "legacy LyCORIS, normalised per input column); peft's DoRA normalises output rows "
                                  "and cannot reproduce it")
    ranks = {p.path: p.module.rank for p in plans}
    alphas = {p.path: p.module.effective_alpha for p in plans}
    r, alpha = _common(list(ranks.values())), _common(list(alphas.values()))
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(ranks),
                      rank_pattern={k: v for k, v in ranks.items() if v != r},
                      alpha_pattern={k: v for k, v in alphas.items() if v != alpha}, use_dora=dora.pop())


def _loha_config(plans: list[_Plan]):
    from peft import LoHaConfig

    tucker = set()
    for p in plans:
        t = p.module.tensors
        if t["hada_w1_b"].shape[0] != t["hada_w2_b"].shape[0]:
            raise StudioError(f"{p.path}: hada_w1 and hada_w2 have different ranks; peft's LoHa needs one rank")
        if p.module.dora_scale is not None:
            raise StudioError(f"{p.path}: DoRA on LoHa is not supported")
        kernel = _in_out(p.layer)[2]
        if kernel != (1, 1):
            tucker.add("hada_t1" in t)
    if len(tucker) > 1:
        raise StudioError("some conv modules use Tucker cores (hada_t1) and others not; peft needs one or the other")
    ranks = {p.path: p.module.rank for p in plans}
    alphas = {p.path: p.module.effective_alpha for p in plans}
    r, alpha = _common(list(ranks.values())), _common(list(alphas.values()))
    return LoHaConfig(r=r, alpha=alpha, target_modules=sorted(ranks),
                      rank_pattern={k: v for k, v in ranks.items() if v != r},
                      alpha_pattern={k: v for k, v in alphas.items() if v != alpha},
                      use_effective_conv2d=bool(tucker and tucker.pop()))


def _lokr_config(plans: list[_Plan]):
    """A LoKrConfig that makes peft build exactly the file's factors (peft re-derives the
    factorisation from decompose_factor and decomposes a factor only when the rank is small)."""
    from peft import LoKrConfig
    from peft.tuners.lokr.layer import factorization

    ranks, alphas, dims = {}, {}, {}
    decompose_both = any("lokr_w1_a" in p.module.tensors for p in plans)
    tucker = set()
    for p in plans:
        t = p.module.tensors
        inp, out, kernel = _in_out(p.layer)
        (a, c), (b, d) = _lokr_w1_shape(t), _lokr_w2_dims(t, kernel)
        dims[p.path] = (out, inp, a, b, c, d)
        if p.module.dora_scale is not None:
            raise StudioError(f"{p.path}: DoRA on LoKr is not supported")
        w1_full, w2_full = "lokr_w1" in t, "lokr_w2" in t
        if w2_full:
            if not w1_full:
                raise StudioError(f"{p.path}: a decomposed lokr_w1 with a full lokr_w2 has no peft equivalent")
            r = max(a, b, c, d)
        else:
            r = t["lokr_w2_b"].shape[0]
            if not r < max(b, d) / 2:
                raise StudioError(f"{p.path}: lokr_w2 is decomposed at rank {r}, which peft would keep full")
            if not w1_full and (t["lokr_w1_b"].shape[0] != r or not r < max(a, c) / 2):
                raise StudioError(f"{p.path}: lokr_w1 is decomposed at a rank peft cannot reproduce")
            if w1_full and decompose_both and r < max(a, c) / 2:
                raise StudioError(f"{p.path}: lokr_w1 is full where other modules decompose it; peft needs one rule")
            if kernel != (1, 1):
                tucker.add("lokr_t2" in t)
        ranks[p.path] = r
        alphas[p.path] = p.module.scale * r
    if len(tucker) > 1:
        raise StudioError("some conv modules use a Tucker core (lokr_t2) and others not; peft needs one or the other")
    candidates = [-1] + sorted({v for dims_ in dims.values() for v in dims_[2:]})
    factor = next((f for f in candidates if all(
        factorization(out, f) == (a, b) and factorization(inp, f) == (c, d)
        for out, inp, a, b, c, d in dims.values())), None)
    if factor is None:
        raise StudioError("the LoKr factor shapes follow no single decompose_factor; peft cannot rebuild them")
    r, alpha = _common(list(ranks.values())), _common(list(alphas.values()))
    return LoKrConfig(r=r, alpha=alpha, target_modules=sorted(ranks), decompose_both=decompose_both,
                      decompose_factor=factor, use_effective_conv2d=bool(tucker and tucker.pop()),
                      rank_pattern={k: v for k, v in ranks.items() if v != r},
                      alpha_pattern={k: v for k, v in alphas.items() if v != alpha})


def _tuner_layer(model: torch.nn.Module, path: str, adapter_name: str):
    """The peft layer at `path` (possibly nested in other adapters' wrappers) holding `adapter_name`."""
    layer = model.get_submodule(path)
    while layer is not None:
        if _layer_state(layer, adapter_name) is not None:
            return layer
        layer = getattr(layer, "base_layer", None)
    raise StudioError(f"peft did not put adapter {adapter_name!r} on {path}")


def _copy(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if value.numel() != param.numel() or (value.ndim == param.ndim and tuple(value.shape) != tuple(param.shape)):
        raise StudioError(f"{what}: the file has shape {tuple(value.shape)} where the model needs {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.reshape(param.shape).to(param.dtype))


def _load_into(layer, adapter_name: str, plan: _Plan) -> None:
    module, what = plan.module, f"{plan.attr}.{plan.path}"
    if module.kind == LORA:
        _copy(layer.lora_A[adapter_name].weight, module.down, what + " lora_down")
        _copy(layer.lora_B[adapter_name].weight, module.up, what + " lora_up")
        if module.is_dora:
            weight = layer.get_base_layer().weight.detach()
            magnitude = module.magnitude
            if magnitude is None:
                magnitude = magnitude_from_dora_scale(weight, module.delta(weight.shape), module.dora_scale)
            _copy(layer.lora_magnitude_vector[adapter_name].weight, magnitude, what + " DoRA magnitude")
        return
    for part, value in module.tensors.items():
        holder = getattr(layer, part)
        if adapter_name not in holder:
            raise StudioError(f"{what}: peft built no {part} for this module (the file's factor layout differs)")
        _copy(holder[adapter_name], value, f"{what} {part}")
    built = {n for n in layer.adapter_layer_names if adapter_name in getattr(layer, n)}
    if built != set(module.tensors):
        raise StudioError(f"{what}: peft built {sorted(built)} but the file has {sorted(module.tensors)}")


def _expose_conv_groups(model: torch.nn.Module, group: list[_Plan]) -> None:
    """peft's LoRA Conv2d reads `groups` from the module it wraps; a LoHa / LoKr wrapper of a
    conv (another adapter loaded earlier) lacks it, so give the wrapper its conv's value."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for plan in group:
        outer = model.get_submodule(plan.path)
        if isinstance(outer, BaseTunerLayer) and isinstance(plan.layer, torch.nn.Conv2d) and not hasattr(outer, "groups"):
            outer.groups = plan.layer.groups


def inject_peft_adapter(model: torch.nn.Module, config: Any, adapter_name: str) -> None:
    """Add a peft adapter to a diffusers UNet or a transformers text encoder.

    peft's own `inject_adapter_in_model`, not the models' `add_adapter`: transformers 5.24's
    `add_adapter` refuses every peft before 0.22, and 0.21.2 is the newest peft released,
    while peft's function works with every version pair. The adapter is active on its layers;
    `model.peft_config` lists it and the model is marked as carrying adapters, as both
    libraries' `add_adapter` would (so diffusers' enable/disable_adapters work)."""
    import warnings

    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # several adapters on one model is intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = True


def _remove(model: torch.nn.Module, adapter_name: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer) and adapter_name in getattr(layer, "_available_adapters", ()) | set(
                getattr(layer, "lora_A", {})):
            layer.delete_adapter(adapter_name)
    getattr(model, "peft_config", {}).pop(adapter_name, None)


def attach_modules(family: str, models: Mapping[str, torch.nn.Module], modules: Mapping[str, AdapterModule],
                   adapter_name: str, *, adapter_family: str | None = None, source: str = "adapter") -> None:
    """Inject `modules` (kohya name -> module) into the models as peft adapter `adapter_name`.
    Every module must name a layer of the right shape; otherwise a StudioError lists what
    did not match and nothing is loaded."""
    if adapter_family and adapter_family != family:
        raise StudioError(f"{source} was trained on {get_family(adapter_family).label} but the base model is "
                          f"{get_family(family).label}; use a base model of the family it was trained on.")
    table = name_table(family, models)
    known_prefixes = {x for p in get_family(family).parts if p.attr in models for x in (p.prefix, *p.alias_prefixes)}
    plans: dict[tuple[str, str], list[_Plan]] = {}
    adapted: dict[str, set[str]] = {}
    problems: list[str] = []
    foreign: list[str] = []
    for name, module in modules.items():
        target = table.get(name)
        if target is None:
            prefix = name.split("_", 2)[:2]
            if "_".join(prefix) not in known_prefixes and not any(name.startswith(p + "_") for p in known_prefixes):
                foreign.append(name)
            else:
                problems.append(f"{name} (no such layer)")
            continue
        why = check_fit(name, module, target)
        if why:
            problems.append(why)
            continue
        for plan in plans_for(name, module, target):
            if plan.path in adapted.setdefault(plan.attr, set()):
                problems.append(f"{name} ({plan.attr}.{plan.path} is adapted by another module of the file too)")
            adapted[plan.attr].add(plan.path)
            plans.setdefault((plan.attr, plan.module.kind), []).append(plan)
    if foreign:
        other = next((f.label for f in FAMILIES.values() if f.name != family and all(
            n.startswith(tuple(x + "_" for p in f.parts for x in (p.prefix, *p.alias_prefixes))) for n in foreign)),
            "another model family")
        raise StudioError(f"{source} does not fit this {get_family(family).label} base model: {len(foreign)} modules have "
                          f"prefixes it has no model for, e.g. {', '.join(sorted(foreign)[:3])} (an adapter for {other}?).")
    if problems:
        raise StudioError(f"{source} does not fit this {get_family(family).label} base model: {len(problems)} of "
                          f"{len(modules)} modules do not match, e.g. {'; '.join(sorted(problems)[:3])}. "
                          "Is it for another model family or model size?")
    if not plans:
        raise StudioError(f"{source} holds no modules for this base model.")
    kinds_per_model: dict[str, set[str]] = {}
    for attr, kind in plans:
        kinds_per_model.setdefault(attr, set()).add(kind)
    for attr, kinds in kinds_per_model.items():
        if len(kinds) > 1:
            raise StudioError(f"{source} mixes {' and '.join(sorted(kinds))} modules in the {attr}; one kind per model is supported.")
    builders = {LORA: _lora_config, LOHA: _loha_config, LOKR: _lokr_config}
    configs = {}
    for (attr, kind), group in plans.items():
        try:
            configs[(attr, kind)] = builders[kind](group)
        except StudioError as error:
            raise StudioError(f"{source}: {error}.") from None
    done: list[torch.nn.Module] = []
    try:
        for (attr, kind), group in plans.items():
            model = models[attr]
            if adapter_name in (getattr(model, "peft_config", None) or {}):
                raise StudioError(f"An adapter named {adapter_name!r} is already loaded in the {attr}.")
            if kind == LORA:
                _expose_conv_groups(model, group)
            inject_peft_adapter(model, configs[(attr, kind)], adapter_name)
            done.append(model)
            for plan in group:
                _load_into(_tuner_layer(model, plan.path, adapter_name), adapter_name, plan)
    except StudioError as error:
        for model in done:
            _remove(model, adapter_name)
        raise StudioError(f"{source}: {error}") from None
    log.info("attached %s as %r (%d modules)", source, adapter_name, len(modules))
