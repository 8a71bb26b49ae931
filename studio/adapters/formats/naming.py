"""kohya module names <-> diffusers / transformers module paths, for every family's parts.

    SD 1.5 UNet   lora_unet_<diffusers path>     lora_unet_down_blocks_0_attentions_0_proj_in
    SDXL UNet     lora_unet_<LDM (sgm) path>     lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    SD 1.5 CLIP   lora_te_text_model_<path>      lora_te_text_model_encoder_layers_0_self_attn_q_proj
    SDXL CLIPs    lora_te1_text_model_..., lora_te2_text_model_...
    FLUX.1        lora_unet_<BFL path>           lora_unet_double_blocks_0_img_attn_qkv (fused: to_q, to_k,
                                                 to_v), lora_unet_single_blocks_0_linear2; lycoris_ /
                                                 lora_transformer_<diffusers path> for one part

The LDM path comes from studio.models.single_file.unet_diffusers_to_ldm. `text_model_` is always
written, whatever transformers' module layout (transformers 5's CLIPTextModel has no
`text_model` submodule; A1111 and ComfyUI match names that contain it).

Reading also accepts the other spelling of each name (SDXL files written with diffusers
paths, as diffusers' own exporter does; SD 1.x files with LDM paths; text-encoder names
without `text_model_`), so such files load too.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from studio.errors import StudioError
from studio.models.families import FAMILIES, Part, Piece, all_prefixes, family_of_pipeline, get_family
from studio.models.families.unet import unet_diffusers_to_ldm
from studio.models.skeletons import skeleton_dir

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
ALL_PREFIXES = all_prefixes()


def split_name(name: str) -> tuple[str, str]:
    """("lora_te2", "text_model_encoder_...") from a kohya module name; StudioError if no known prefix."""
    for prefix in ALL_PREFIXES:
        if name.startswith(prefix + "_"):
            return prefix, name[len(prefix) + 1:]
    raise StudioError(f"module {name!r} has an unknown prefix; expected one of {', '.join(ALL_PREFIXES)}")


def pipeline_models(pipe: Any) -> dict[str, torch.nn.Module]:
    """The adaptable models of a pipeline by attribute (unet, text_encoder[, text_encoder_2])."""
    parts = family_of_pipeline(pipe).parts
    return {p.attr: getattr(pipe, p.attr) for p in parts if getattr(pipe, p.attr, None) is not None}


def clip_kohya_path(path: str) -> str:
    """`text_model.`-prefixed path of a CLIP module, whatever transformers' layout."""
    path = path.removeprefix("text_model.")
    return path if path.startswith("text_projection") else "text_model." + path


def layout_piece(part: Part, path: str) -> Piece | None:
    """Where the module at `path` of a "layout" part sits in the layout kohya names follow
    (None: not a "layout" part, or a module that layout has no name for)."""
    return part.layout(path) if part.layout is not None else None


def kohya_name(part: Part, path: str, unet_config: Any = None) -> str:
    """The kohya name of the module at diffusers/transformers `path` of `part`'s model (for
    one part of a fused layer: the fused layer's name)."""
    if part.layout is not None:
        piece = part.layout(path)
        if piece is None:
            raise StudioError(f"{part.attr}.{path} has no name in the kohya layout")
        path = piece.path
    elif part.naming == "clip":
        path = clip_kohya_path(path)
    elif part.naming == "ldm":
        path = unet_diffusers_to_ldm(path, unet_config)
    return f"{part.prefix}_{path.replace('.', '_')}"


def alias_names(part: Part, path: str, unet_config: Any = None) -> list[str]:
    """Other spellings of the same module accepted when reading (see module doc)."""
    names = [f"{alias}_{path.replace('.', '_')}" for alias in part.alias_prefixes]
    if part.naming == "clip":
        names.append(f"{part.prefix}_{path.removeprefix('text_model.').replace('.', '_')}")
    elif part.naming == "ldm":
        names.append(f"{part.prefix}_{path.replace('.', '_')}")
    elif unet_config is not None and part.layout is None:
        try:
            names.append(f"{part.prefix}_{unet_diffusers_to_ldm(path, unet_config).replace('.', '_')}")
        except StudioError:
            pass
    return names


def _peft_parts() -> set[str]:
    return {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
            "lora_magnitude_vector", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
            "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


def clean_path(path: str) -> str:
    """A module path without peft's `.base_layer` wrappers."""
    return ".".join(p for p in path.split(".") if p != "base_layer")


def base_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """path -> Linear / Conv2d layer of the base model (peft wrappers unwrapped)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_parts = _peft_parts()
    out: dict[str, torch.nn.Module] = {}
    for path, module in model.named_modules():
        parts = path.split(".")
        if any(p in peft_parts for p in parts if p != "base_layer"):
            continue
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            out.setdefault(clean_path(path), module)
    return out


@dataclass(frozen=True)
class Target:
    """Where a kohya name points: the pipeline attribute, the module path, the layer; for a
    fused layer (FLUX.1's qkv) the layout's path, no layer, and its `pieces` (diffusers path,
    layer) stacked along the output rows in this order."""

    attr: str
    path: str
    layer: torch.nn.Module | None
    pieces: tuple[tuple[str, torch.nn.Module], ...] = ()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.pieces:
            first = tuple(self.pieces[0][1].weight.shape)
            return (sum(layer.weight.shape[0] for _, layer in self.pieces), *first[1:])
        return tuple(self.layer.weight.shape)

    def rows(self) -> list[tuple["Target", int, int]]:
        """(the target of one piece, first row, end row) of a fused target; itself whole otherwise."""
        if not self.pieces:
            return [(self, 0, self.weight_shape[0])]
        out, row = [], 0
        for path, layer in self.pieces:
            size = layer.weight.shape[0]
            out.append((Target(self.attr, path, layer), row, row + size))
            row += size
        return out

    @property
    def module_path(self) -> str:
        """A module path of the model (a fused target's first piece: its pieces are in one
        block), what block tables read."""
        return self.pieces[0][0] if self.pieces else self.path

    def base_weight(self) -> torch.Tensor:
        """The (fused) base weight."""
        if self.pieces:
            return torch.cat([layer.weight.detach() for _, layer in self.pieces])
        return self.layer.weight.detach()


def name_table(family_name: str, models: Mapping[str, torch.nn.Module]) -> dict[str, Target]:
    """kohya name (and accepted alias) -> Target for every Linear / Conv2d of the models; a
    layer its layout fuses from several modules gets one Target with its pieces."""
    table: dict[str, Target] = {}
    aliases: dict[str, Target] = {}
    for part in get_family(family_name).parts:
        model = models.get(part.attr)
        if model is None:
            continue
        config = getattr(model, "config", None) if part.attr == "unet" else None
        fused: dict[str, dict[int, tuple[str, torch.nn.Module]]] = {}
        counts: dict[str, int] = {}
        for path, layer in base_layers(model).items():
            target = Target(part.attr, path, layer)
            piece = layout_piece(part, path)
            if piece is not None and piece.fused:
                fused.setdefault(piece.path, {})[piece.index] = (path, layer)
                counts[piece.path] = piece.count
            else:
                try:
                    table[kohya_name(part, path, config)] = target
                except StudioError:  # a module with no kohya name (none with weights in SD/SDXL)
                    pass
            for alias in alias_names(part, path, config):
                aliases.setdefault(alias, target)
        for layout_path, found in fused.items():
            if len(found) == counts[layout_path]:
                name = f"{part.prefix}_{layout_path.replace('.', '_')}"
                table[name] = Target(part.attr, layout_path, None, tuple(found[i] for i in sorted(found)))
    return {**aliases, **table}


def path_to_name(family_name: str, attr: str, path: str, unet_config: Any = None) -> str:
    """kohya name of `path` in the pipeline attribute `attr` (for files without a model at hand).
    One part of a fused layer keeps a name of its own, the part's first alias prefix and
    its diffusers path (`lycoris_transformer_blocks_0_attn_to_q`, which ComfyUI reads)."""
    part = next((p for p in get_family(family_name).parts if p.attr == attr), None)
    if part is None:
        raise StudioError(f"{get_family(family_name).label} has no {attr}; the file is for another model family")
    piece = layout_piece(part, path)
    if piece is not None and piece.fused:
        return f"{part.alias_prefixes[0]}_{path.replace('.', '_')}"
    if part.naming == "ldm" and unet_config is None:
        unet_config = skeleton_unet_config(family_name)
    return kohya_name(part, path, unet_config)


@functools.lru_cache(maxsize=4)
def skeleton_unet_config(family: str) -> dict:
    """The UNet config of the real model of `family` (from the shipped skeletons)."""
    import json

    return json.loads((skeleton_dir(family) / "unet" / "config.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------
# sd-scripts' choice of modules
# --------------------------------------------------------------------------------------

# The UNet's attention blocks, and FLUX.1's DoubleStreamBlock / SingleStreamBlock as diffusers
# names them (sd-scripts' networks/lora_flux.py adapts every Linear in those).
UNET_TARGET_CLASSES = ("Transformer2DModel", "FluxTransformerBlock", "FluxSingleTransformerBlock")
UNET_CONV_TARGET_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP", "T5Attention",
                               "T5DenseGatedActDense")


def sd_scripts_targets(model: torch.nn.Module, *, text_encoder: bool, conv: bool = False) -> list[str]:
    """Module paths sd-scripts' networks/lora.py adapts: in the UNet every Linear and 1x1
    Conv2d inside Transformer2DModel blocks, plus with `conv` (LoCon) every Linear / Conv2d of
    ResnetBlock2D, Downsample2D and Upsample2D; in CLIP every Linear of CLIPAttention and
    CLIPMLP. Usable as peft `target_modules`."""
    classes = TEXT_ENCODER_TARGET_CLASSES if text_encoder else UNET_TARGET_CLASSES + (UNET_CONV_TARGET_CLASSES if conv else ())
    layers = base_layers(model)
    found: list[str] = []
    seen: set[str] = set()
    for path, module in model.named_modules():
        if type(module).__name__ not in classes:
            continue
        prefix = clean_path(path) + "."
        for child_path, layer in layers.items():
            if not child_path.startswith(prefix) or child_path in seen:
                continue
            is_1x1 = isinstance(layer, torch.nn.Linear) or tuple(layer.kernel_size) == (1, 1)
            if is_1x1 or conv:
                seen.add(child_path)
                found.append(child_path)
    return found


def targets_for(models: Mapping[str, torch.nn.Module], *, conv: bool = False,
                text_encoders: bool = True) -> dict[str, list[str]]:
    """sd-scripts' module paths per pipeline attribute."""
    out = {}
    denoisers = {f.denoiser for f in FAMILIES.values()}
    for attr, model in models.items():
        if attr in denoisers:
            out[attr] = sd_scripts_targets(model, text_encoder=False, conv=conv)
        elif text_encoders:
            out[attr] = sd_scripts_targets(model, text_encoder=True)
    return out


def describe_names(names: Iterable[str]) -> dict[str, int]:
    """Module count per kohya prefix."""
    counts: dict[str, int] = {}
    for name in names:
        try:
            prefix = split_name(name)[0]
        except StudioError:
            prefix = name.split("_", 1)[0]
        counts[prefix] = counts.get(prefix, 0) + 1
    return dict(sorted(counts.items()))
