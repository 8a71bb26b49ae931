"""Single-file checkpoints (A1111 / CivitAI `.safetensors`) for SD 1.5 and SDXL, and files of a
denoiser alone (FLUX.1's BFL transformer file, `flux1-dev.safetensors`), offline.

- `detect_family(path_or_keys)`: the family name (studio.models.families) from a checkpoint's key
  names (or a diffusers folder's model_index.json); a StudioError naming what it saw otherwise.
- `load_single_file(path)`: a diffusers pipeline, built with the config skeletons in
  `assets/skeletons` (studio.models.skeletons) so that diffusers never asks the Hub.
- `save_single_file(pipe, path)`: the inverse, one `.safetensors` in the original LDM / sgm
  layout that A1111, Forge, ComfyUI and diffusers' own `from_single_file` load.

The UNet's module-path mapping (`down_blocks.1.attentions.0...` <-> `input_blocks.4.1...`),
which the LoRA file format (SDXL LoRA names use the LDM layout) and LoRA Block Weight read too,
is a UNet-family fact: studio.models.families.unet.

Layout of a single-file checkpoint:

    model.diffusion_model.*                          UNet, LDM names
    first_stage_model.*                              VAE, LDM names (attention as 1x1 convs)
    <text encoders>                                  each family's single_file_encoders: HF CLIP
                                                     names, or OpenCLIP's (fused in_proj qkv,
                                                     text_projection [width, dim])
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from studio import ASSETS_DIR
from studio.errors import StudioError
from studio.models.families import (BUILTIN_MODELS, FAMILIES, Family, family_from_pipeline_class, family_of_pipeline,
                                    get_family)
from studio.models.families.unet import config_get, unet_diffusers_to_ldm
from studio.fsutil import atomic_write_with
from studio.models.skeletons import skeleton_dir
from studio.safetensors_file import read_safetensors, read_safetensors_header, refuse_pickle, sniff_format

log = logging.getLogger(__name__)

_SUPPORTED = "only " + " and ".join(f.long_label for f in FAMILIES.values()) + " are supported"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: load_single_file's torch_dtype for "each component in the dtype its weights are stored in"
AS_STORED = "stored"

def _load_pickle_state_dict(path: Path) -> dict[str, Any]:
    """A pickled checkpoint's tensors, unpickled with torch's weights-only loader."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=sniff_format(path) == "zip-pickle")
    except Exception as exc:
        raise StudioError(
            f"Could not read {path} with torch's safe (weights-only) unpickler: {exc}. "
            "Convert it to .safetensors with a tool you trust and load that."
        ) from exc
    while isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise StudioError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    return dict(state)


def _checkpoint_shapes(path: Path, *, allow_pickle: bool) -> dict[str, tuple[int, ...] | None]:
    """Key -> shape of a single-file checkpoint, after checking what kind of file it is."""
    if not path.exists():
        raise StudioError(f"Checkpoint {path} does not exist.")
    if path.is_dir():
        raise StudioError(
            f"{path} is a folder, not a single-file checkpoint. A diffusers folder loads with "
            "DiffusionPipeline.from_pretrained; point this at a .safetensors file."
        )
    fmt = sniff_format(path)
    if fmt == "safetensors":
        if path.suffix.lower() != ".safetensors":
            raise StudioError(
                f"{path} holds safetensors data but is named {path.suffix!r}; rename it to end in "
                ".safetensors so loaders read it as such."
            )
        header, _ = read_safetensors_header(path)
        return {k: tuple(v["shape"]) for k, v in header.items()}
    if fmt in ("pickle", "zip-pickle"):
        if not allow_pickle:
            raise refuse_pickle(path, fmt)
        if path.suffix.lower() in (".safetensors", ".gguf"):
            raise StudioError(
                f"{path} is a pickle but named {path.suffix!r}; rename it to .ckpt so it is not "
                "mistaken for a safetensors file, then load it with allow_pickle=True."
            )
        return {k: tuple(getattr(v, "shape", ())) or None for k, v in _load_pickle_state_dict(path).items()}
    if fmt == "gguf":
        raise StudioError(f"{path} is a GGUF file; only .safetensors (or opted-in .ckpt) checkpoints load here.")
    if path.stat().st_size == 0:
        raise StudioError(f"{path} is empty (0 bytes); the download or copy failed. Get the file again.")
    # The message never quotes the file's bytes: the model field takes any server path.
    raise StudioError(f"{path} is not a safetensors checkpoint; the file is damaged or of another kind. "
                      "Download it again.")


# --------------------------------------------------------------------------------------
# Family detection
# --------------------------------------------------------------------------------------


def _shape_map(keys: Iterable[str] | Mapping[str, Any]) -> dict[str, tuple[int, ...] | None]:
    if isinstance(keys, Mapping):
        out: dict[str, tuple[int, ...] | None] = {}
        for key, value in keys.items():
            shape = getattr(value, "shape", None)
            if shape is None and isinstance(value, Mapping):  # a safetensors header entry
                shape = value.get("shape")
            out[str(key)] = tuple(shape) if shape is not None else None
        return out
    return {str(key): None for key in keys}


def _family_from_shapes(shapes: Mapping[str, tuple[int, ...] | None], source: str) -> Family:
    """The family whose single-file marker the keys have; refusals name what else it is."""
    keys = list(shapes)
    where = f"{source} " if source else ""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".hada_w1" in k for k in keys):
        raise StudioError(f"{where}is a LoRA/LyCORIS adapter, not a base model; add it as an adapter instead.")
    family = next((f for f in FAMILIES.values() if has(f.single_file_marker) or has(UNET_PREFIX + f.single_file_marker)),
                  None)
    if family is None:
        raise StudioError(where + _unsupported_checkpoint(keys, has))
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(conv_in[1], "a modified UNet")
        raise StudioError(
            f"{where}is {kind} ({family.long_label} UNet with {conv_in[1]} input channels, not 4); "
            "only text-to-image base models are supported."
        )
    attn2_k = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if attn2_k is not None and attn2_k[-1] in family.foreign_cross_attention:
        raise StudioError(f"{where}looks like {family.foreign_cross_attention[attn2_k[-1]]}; {_SUPPORTED}.")
    return family


def _unsupported_checkpoint(keys: list[str], has) -> str:
    """What a checkpoint of no supported family looks like, and what was expected."""
    if has("conditioner.embedders.0.model."):
        return "looks like the SDXL refiner (one OpenCLIP text encoder, no CLIP-L); only SDXL base models are supported."
    if has("cond_stage_model.model."):
        return ("looks like Stable Diffusion 2.x (OpenCLIP ViT-H text encoder under cond_stage_model.model.); "
                f"{_SUPPORTED}.")
    sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
    hint = ""
    if has(UNET_PREFIX):
        hint = " It has UNet weights (model.diffusion_model.*) but no text encoder."
    elif has("down_blocks.") or has("encoder.down") or has("decoder.up"):
        hint = " It looks like one component in diffusers layout (a UNet or VAE), not a full checkpoint."
    elif has("joint_blocks.") or has("model.diffusion_model.joint_blocks."):
        hint = " It looks like SD3."
    expected = " or ".join(f"{f.single_file_marker}* ({f.long_label})" for f in FAMILIES.values())
    return f"is not a checkpoint of a supported model: found {len(keys)} tensors such as {sample}.{hint} Expected {expected}."


def _family_from_folder(folder: Path) -> Family:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise StudioError(f"{folder} is a folder without model_index.json, so it is not a diffusers model folder.")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        unet_cfg_path = folder / "unet" / "config.json"
        unet_cfg = json.loads(unet_cfg_path.read_text(encoding="utf-8")) if unet_cfg_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise StudioError(f"Could not read the configs in {folder}: {exc}") from exc
    name = index.get("_class_name", "?")
    if unet_cfg.get("in_channels", 4) != 4:
        raise StudioError(f"{folder} ({name}) has a UNet with {unet_cfg['in_channels']} input channels; only text-to-image base models are supported.")
    family = family_from_pipeline_class(name)
    if family is None:
        classes = ", ".join(f"{f.pipeline_classes[0]} ({f.long_label})" for f in FAMILIES.values())
        raise StudioError(f"{folder} holds a {name}; only {classes} folders are supported.")
    absent = [attr for attr in family.text_encoders if (index.get(attr) or [None])[0] is None]
    if absent:
        raise StudioError(f"{folder} has no {' or '.join(absent)} (a refiner?); only {family.long_label} base models "
                          "are supported.")
    width = unet_cfg.get("cross_attention_dim")
    if width in family.foreign_cross_attention:
        raise StudioError(f"{folder} is {family.foreign_cross_attention[width]}; {_SUPPORTED}.")
    return family


def detect_family(
    path_or_keys: str | os.PathLike | Iterable[str] | Mapping[str, Any], *, allow_pickle: bool = False
) -> str:
    """The family name for a single-file checkpoint (path), a diffusers folder (path with
    model_index.json), or a checkpoint's keys (an iterable of names, or a mapping of names
    to tensors / safetensors header entries, which also lets shapes rule out inpainting
    and SD 2.x). Anything else raises a StudioError saying what it looks like."""
    if isinstance(path_or_keys, (str, os.PathLike)):
        path = Path(path_or_keys)
        if path.is_dir():
            return _family_from_folder(path).name
        return _family_from_shapes(_checkpoint_shapes(path, allow_pickle=allow_pickle), str(path)).name
    return _family_from_shapes(_shape_map(path_or_keys), "The checkpoint").name


def _check_components(shapes: Mapping[str, Any], family: Family, path: Path) -> None:
    needed = {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX, **{e.description: e.prefix for e in family.single_file_encoders}}
    missing = [f"{what} ({prefix}*)" for what, prefix in needed.items() if not any(k.startswith(prefix) for k in shapes)]
    if missing:
        raise StudioError(
            f"{path} is an incomplete {family.long_label} checkpoint: it has no weights for "
            f"{', '.join(missing)}. Use a full checkpoint (UNet, VAE and text encoders in one file)."
        )


# --------------------------------------------------------------------------------------
# VAE and text encoders: diffusers -> LDM state dicts
# --------------------------------------------------------------------------------------

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut", 1) if rest.startswith("conv_shortcut") else rest

    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(.+)", key)
    if m:
        return f"{m[1]}.{'norm_out' if m[2] == 'conv_norm_out' else m[2]}.{m[3]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key)
    if m:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    raise StudioError(f"VAE parameter {key!r} has no LDM name; this VAE layout is not supported.")


def _vae_to_ldm(vae: Any) -> dict[str, Any]:
    num_up = len(vae.config.up_block_types)
    out = {}
    for key, tensor in vae.state_dict().items():
        ldm = _vae_key_to_ldm(key, num_up)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # LDM's attention projections are 1x1 convs
        out[VAE_PREFIX + ldm] = tensor
    return out


def _clip_to_ldm(text_encoder: Any, prefix: str) -> dict[str, Any]:
    """CLIP-L in HF names under `prefix` (which ends in `text_model.`)."""
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        key = key.removeprefix("text_model.")  # transformers < 5.6 wraps CLIPTextModel in .text_model
        if key.startswith("text_projection"):
            continue  # CLIPTextModelWithProjection used as text encoder 1: LDM has no projection there
        out[prefix + key] = tensor
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _open_clip_to_ldm(text_encoder: Any, prefix: str) -> dict[str, Any]:
    """CLIPTextModelWithProjection -> OpenCLIP names (fused qkv, [width, dim] projection)."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for key, tensor in state.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".", 1)[1]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.t().contiguous()
        else:
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
            if not m:
                raise StudioError(f"Text encoder 2 parameter {key!r} has no OpenCLIP name.")
            layer, module, kind = m.groups()
            base = f"transformer.resblocks.{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, kind), {})[module.split(".")[1][0]] = tensor  # q / k / v
            elif module in _OPEN_CLIP_LAYER:
                out[f"{base}{_OPEN_CLIP_LAYER[module]}.{kind}"] = tensor
            else:
                raise StudioError(f"Text encoder 2 parameter {key!r} has no OpenCLIP name.")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise StudioError(f"Text encoder 2 layer {layer} lacks one of q/k/v_proj.{kind}.")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    if "text_projection" not in out:
        raise StudioError("Text encoder 2 has no text_projection; an OpenCLIP text encoder needs a "
                          "CLIPTextModelWithProjection.")
    return {prefix + k: v for k, v in out.items()}


_TEXT_ENCODER_LAYOUTS = {"clip": _clip_to_ldm, "open_clip": _open_clip_to_ldm}


def pipeline_family(pipe: Any) -> Family:
    """The family of a pipeline to save as a full checkpoint (refusing partial pipelines and
    look-alikes the studio does not support)."""
    family = family_of_pipeline(pipe)
    if getattr(pipe, family.denoiser, None) is None or getattr(pipe, "vae", None) is None:
        raise StudioError(f"The pipeline has no {family.denoiser} or VAE; nothing to save as a checkpoint.")
    absent = [attr for attr in family.text_encoders if getattr(pipe, attr, None) is None]
    if absent:
        raise StudioError(f"The pipeline has no {' or '.join(absent)} (a refiner?); nothing to save as a full "
                          "checkpoint.")
    width = config_get(getattr(pipe, family.denoiser).config, "cross_attention_dim")
    if width in family.foreign_cross_attention:
        raise StudioError(f"The pipeline is {family.foreign_cross_attention[width]}; {_SUPPORTED}.")
    return family


def pipeline_to_ldm_state_dict(pipe: Any, *, dtype: Any = None) -> dict[str, Any]:
    """All of a pipeline's weights under their single-file names, as CPU tensors
    (floating-point ones cast to `dtype` when given): the LDM/sgm layout of a whole SD
    pipeline, or the denoiser alone in its original layout where the family's single files
    are that (FLUX.1's BFL transformer, as flux1-dev.safetensors)."""
    family = pipeline_family(pipe)
    unet_state = getattr(pipe, family.denoiser).state_dict()
    adapter_keys = [k for k in unet_state if ".lora_" in k or ".base_layer." in k or "lora_magnitude" in k]
    for name in family.text_encoders:
        module = getattr(pipe, name, None)
        if module is not None:
            adapter_keys += [k for k in module.state_dict() if ".lora_" in k or ".base_layer." in k]
    if adapter_keys:
        raise StudioError(
            f"The pipeline still has LoRA adapter layers loaded (e.g. {adapter_keys[0]}); fuse them "
            "(pipe.fuse_lora()) and unload them (pipe.unload_lora_weights()) before saving a checkpoint."
        )
    state: dict[str, Any] = {}

    def put(key: str, tensor: Any) -> None:
        if key in state:
            raise StudioError(f"Two weights map to the same checkpoint name {key!r}; this layout is not supported.")
        state[key] = tensor

    if family.denoiser_to_single_file is not None:
        state.update(family.denoiser_to_single_file(unet_state))
    else:
        for key, tensor in unet_state.items():
            put(UNET_PREFIX + unet_diffusers_to_ldm(key, pipe.unet.config), tensor)
        for key, tensor in _vae_to_ldm(pipe.vae).items():
            put(key, tensor)
        for encoder in family.single_file_encoders:
            for key, tensor in _TEXT_ENCODER_LAYOUTS[encoder.layout](getattr(pipe, encoder.attr),
                                                                     encoder.prefix).items():
                put(key, tensor)

    out = {}
    for key, tensor in state.items():
        if tensor.is_meta:
            raise StudioError(f"Weight {key} is on the meta device (not loaded); load the model fully before saving.")
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    return out


def save_single_file(
    pipe: Any, path: str | os.PathLike, *, dtype: Any = None, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write an SD 1.x / SDXL pipeline as one `.safetensors` checkpoint in the original
    LDM/sgm layout (what A1111, Forge, ComfyUI and CivitAI use), a FLUX.1 one as its
    transformer in the BFL layout (loaded back with the rest of a model folder), atomically. `dtype`
    (e.g. torch.float16) casts floating-point weights; `metadata` adds header strings to
    the default `modelspec.*` entries. Returns the path written."""
    from safetensors.torch import save_file

    target = Path(path)
    if target.suffix.lower() != ".safetensors":
        raise StudioError(f"Checkpoint path {target} must end in .safetensors.")
    family = pipeline_family(pipe)
    state = pipeline_to_ldm_state_dict(pipe, dtype=dtype)
    header = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family.architecture(getattr(pipe, family.denoiser).config),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    atomic_write_with(target, lambda tmp: save_file(state, str(tmp), metadata=header))
    log.info("Saved %s checkpoint %s (%d tensors)", family.name, target, len(state))
    return target


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _check_config_dir(config: Path, family: Family) -> None:
    if not (config / "model_index.json").is_file():
        raise StudioError(f"Config folder {config} has no model_index.json; pass a diffusers-format config folder.")
    config_family = _family_from_folder(config)
    if config_family is not family:
        raise StudioError(
            f"Config folder {config} is for {config_family.long_label} but the checkpoint is "
            f"{family.long_label}; pass a matching config folder."
        )
    needed = ["unet", "vae", "scheduler", *family.text_encoders, *family.tokenizers]
    missing = [name for name in needed if not (config / name).is_dir()]
    if missing:
        raise StudioError(f"Config folder {config} lacks the subfolder(s) {', '.join(missing)}.")


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shapes compared up to trailing 1s: [C, C, 1, 1] convs and [C, C] linears are the
    same weight (LDM VAE attention, SD 1.x proj_in/out); diffusers converts either."""
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_against_config(shapes: Mapping[str, tuple[int, ...] | None], config: Path, family: Family, path: Path) -> None:
    """Every UNet and VAE tensor the configs call for is in the checkpoint with its shape.
    (The text encoders are checked after loading: their key spellings vary more.)"""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
    except Exception as exc:
        raise StudioError(f"The UNet/VAE configs in {config} are not valid: {exc}") from exc
    expected = {UNET_PREFIX + unet_diffusers_to_ldm(k, unet.config): tuple(v.shape) for k, v in unet.state_dict().items()}
    expected |= {k: tuple(v.shape) for k, v in _vae_to_ldm(vae).items()}
    wrong = [
        (k, got, want) for k, want in expected.items()
        if (got := shapes.get(k)) is not None and _squeeze(tuple(got)) != _squeeze(want)
    ]
    if wrong:
        key, got, want = wrong[0]
        raise StudioError(
            f"{path} does not fit the {family.long_label} configs in {config}: {len(wrong)} weight(s) have "
            f"other shapes, e.g. {key} is {list(got)} in the file but {list(want)} in the config. The "
            "checkpoint has another architecture or size; pass a matching config folder (config_dir)."
        )
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise StudioError(
            f"{path} lacks {len(missing)} of the {len(expected)} UNet/VAE weights the {family.long_label} "
            f"configs in {config} call for, e.g. {', '.join(missing[:3])}. The file is incomplete or "
            "damaged, or of another architecture (then pass a matching config folder, config_dir)."
        )


def _check_loaded(pipe: Any, path: Path) -> None:
    missing = []
    for name in ("unet", "vae", *family_of_pipeline(pipe).text_encoders):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for param_name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_meta:
                missing.append(f"{name}.{param_name}")
    if missing:
        raise StudioError(
            f"{path} lacks {len(missing)} weight(s) the model needs, e.g. {', '.join(missing[:3])}. "
            "The checkpoint is incomplete or of a different architecture than its config."
        )


def load_single_file(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    config_dir: str | os.PathLike | None = None,
    torch_dtype: Any = None,
    denoiser_dtype: Any = None,
    denoiser_quantization: Any = None,
):
    """Load an SD 1.x or SDXL single-file checkpoint as a StableDiffusionPipeline /
    StableDiffusionXLPipeline with no network access: the configs and tokenizers come
    from `config_dir`, else the shipped skeleton of the detected family. `denoiser_quantization`
    (a diffusers quantization config, e.g. BitsAndBytesConfig) loads the UNet quantized, its
    other layers in `denoiser_dtype` (default: `torch_dtype`). `torch_dtype = AS_STORED`: each
    component in the widest dtype its tensors are stored in (a file of the denoiser alone: fp32).

    Pickled checkpoints (.ckpt/.pt/.bin, detected by content) are refused unless
    `allow_pickle=True`, and even then read with torch's weights-only unpickler. Damaged,
    truncated or foreign files raise a StudioError that says what is wrong."""
    import diffusers

    path = Path(path).expanduser()
    shapes = _checkpoint_shapes(path, allow_pickle=allow_pickle)
    family = _family_from_shapes(shapes, str(path))
    if family.denoiser_from_single_file is not None:
        return _load_denoiser_file(path, family, config_dir, None if torch_dtype is AS_STORED else torch_dtype)
    _check_components(shapes, family, path)
    config = Path(config_dir).expanduser() if config_dir is not None else skeleton_dir(family.name)
    _check_config_dir(config, family)
    _check_against_config(shapes, config, family, path)
    pipeline_cls = getattr(diffusers, family.pipeline_classes[0])
    log.info("Loading %s checkpoint %s with configs from %s", family.name, path, config)
    components = {}
    try:
        if denoiser_quantization is not None:
            from diffusers import UNet2DConditionModel

            components["unet"] = UNet2DConditionModel.from_single_file(
                str(path), config=str(config), subfolder="unet", local_files_only=True,
                torch_dtype=denoiser_dtype or torch_dtype, quantization_config=denoiser_quantization,
            )
        if sniff_format(path) == "safetensors":
            components.update(_weighted_components(path, family, config, torch_dtype, skip=tuple(components)))
        if torch_dtype is not AS_STORED:
            components["torch_dtype"] = torch_dtype
        pipe = pipeline_cls.from_single_file(str(path), config=str(config), local_files_only=True, **components)
    except StudioError:
        raise
    except Exception as exc:
        raise StudioError(
            f"Could not load {path} as a {family.long_label} checkpoint with the configs in "
            f"{config}: {type(exc).__name__}: {exc}"
        ) from exc
    _check_loaded(pipe, path)
    return pipe


def _weighted_components(path: Path, family: Family, config: Path, torch_dtype: Any, skip: tuple[str, ...]) -> dict:
    """The denoiser, VAE and text encoders of a safetensors single file, built by diffusers'
    own per-component loader from tensors read one at a time into memory of their own and
    converted while read (studio.safetensors_file.read_safetensors): the pipeline's
    `from_single_file` would map the whole file and widen from that mapping, so a full-size
    SDXL file (fp16) loaded in fp32 held the file and the model at once. With AS_STORED each
    component keeps the widest dtype its tensors are stored in (no widening, no rounding)."""
    import diffusers
    import torch
    from diffusers.loaders.single_file import load_single_file_sub_model

    checkpoint = read_safetensors(path, dtype=None if torch_dtype is AS_STORED else torch_dtype,
                                  skip_prefixes=("model_ema.",))  # EMA copies: diffusers reads the model's weights
    prefixes = {"unet": (UNET_PREFIX,), "vae": (VAE_PREFIX,),
                **{e.attr: (e.prefix,) for e in family.single_file_encoders}}
    index = json.loads((config / "model_index.json").read_text(encoding="utf-8"))
    components = {}
    for name, owned in prefixes.items():
        if name in skip:
            continue
        dtype = torch_dtype
        if torch_dtype is AS_STORED:
            stored = {v.dtype for k, v in checkpoint.items() if k.startswith(owned) and v.is_floating_point()}
            dtype = max(stored, key=lambda d: torch.finfo(d).bits, default=torch.float32)
        library, class_name = index[name]
        components[name] = load_single_file_sub_model(
            library_name=library, class_name=class_name, name=name, checkpoint=checkpoint,
            pipelines=diffusers.pipelines, is_pipeline_module=False, cached_model_config_path=str(config),
            local_files_only=True, torch_dtype=dtype)
    return components


# --------------------------------------------------------------------------------------
# A file of the denoiser alone (FLUX.1's BFL transformer)
# --------------------------------------------------------------------------------------


def _denoiser_shapes(folder: Path, family: Family) -> dict[str, tuple[int, ...]]:
    """The denoiser's diffusers state-dict shapes from `folder`'s config, built on the meta device."""
    import diffusers
    import torch

    config = json.loads((folder / family.denoiser / "config.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder / family.denoiser))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _has_weights(folder: Path, attr: str) -> bool:
    return any((folder / attr).glob("*.safetensors"))


def _load_denoiser_file(path: Path, family: Family, config_dir: Any, torch_dtype: Any):
    """A pipeline whose denoiser comes from `path`, a file of the denoiser alone in the
    original model's layout (family.denoiser_from_single_file converts it), and whose other
    components (VAE, text encoders, tokenizers, scheduler) come with their weights from
    `config_dir`; without one, from the family's built-in tiny model when the file fits it.
    The full-size skeleton has configs only: such a file then needs a diffusers folder of
    the model for the rest."""
    import diffusers
    import torch
    from safetensors.torch import load_file

    stored = {k.removeprefix(UNET_PREFIX): v for k, v in load_file(str(path)).items()}
    candidates = ([Path(config_dir).expanduser()] if config_dir is not None else
                  [ASSETS_DIR / name for name, f in BUILTIN_MODELS.items() if f is family and (ASSETS_DIR / name).is_dir()]
                  + [skeleton_dir(family.name)])
    problem = ""
    for folder in candidates:
        shapes = _denoiser_shapes(folder, family)
        try:
            state = family.denoiser_from_single_file(stored, shapes)
        except (KeyError, ValueError) as exc:
            problem = f"it lacks {exc} of the model in {folder}"
            continue
        wrong = [k for k, v in state.items() if tuple(v.shape) != shapes[k]]
        if wrong:
            problem = f"{wrong[0]} is {list(state[wrong[0]].shape)} in the file, {list(shapes[wrong[0]])} in {folder}"
            continue
        others = [attr for attr in ("vae", *family.text_encoders) if not _has_weights(folder, attr)]
        if others:
            raise StudioError(f"{path.name} holds the {family.long_label} {family.denoiser} alone; the "
                              f"{', '.join(others)} weights must come from a diffusers {family.long_label} folder "
                              "(load that folder, or pass it as the config folder).")
        cls = getattr(diffusers, json.loads((folder / family.denoiser / "config.json").read_text())["_class_name"])
        with torch.device("meta"):
            denoiser = cls.from_config(cls.load_config(folder / family.denoiser))
        dtype = torch_dtype or torch.float32
        denoiser.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        pipeline_cls = getattr(diffusers, family.pipeline_classes[0])
        return pipeline_cls.from_pretrained(folder, local_files_only=True, torch_dtype=dtype,
                                            **{family.denoiser: denoiser}, **family.pipeline_kwargs)
    raise StudioError(f"{path} does not fit the {family.long_label} {family.denoiser}: {problem}. The file is "
                      "damaged or of another architecture; pass a matching config folder.")
