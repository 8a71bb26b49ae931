"""What the UNet families (SD 1.x, SDXL) share: the UNet2DConditionModel call, its coarse
sections, the diffusers <-> LDM (sgm) module-path map that single files, SDXL's kohya names
and LoRA Block Weight read, and LBW's blocks."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from studio.errors import StudioError
from studio.models.families.family import Sampler

if TYPE_CHECKING:
    import torch

#: LoRA Block Weight's long form: BASE (the text encoders), IN00..IN11, M00, OUT00..OUT11
FULL_BLOCKS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
#: training.block_lr_<key> / network.block_rank_<key> -> the UNet's top-level module
SECTIONS = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}
#: kept at full precision under an fp8 base: the UNet's first and last convolutions
FULL_PRECISION = ("conv_in", "conv_out")
#: conditioning entries that go to the UNet as added_cond_kwargs (SDXL's pooled text and size)
ADDED_CONDITIONING = ("text_embeds", "time_ids")


#: The samplers of the UNet families (A1111's names); DDIM without sample clipping and with
#: the final alpha of the schedule (the settings the built-in model and SD were evaluated with).
SAMPLERS = {
    "ddim": Sampler("DDIM", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "euler": Sampler("Euler", "EulerDiscreteScheduler"),
    "euler_a": Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    "dpmpp_2m_karras": Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def generation_kwargs(pipe, prompt, negative_prompt: str, guidance_scale: float, width: int | None = None,
                      height: int | None = None) -> dict:
    """Classifier-free guidance at `guidance_scale` against the negative prompt (the empty
    prompt when none); no size: the pipeline's default (the UNet's sample size)."""
    if negative_prompt and isinstance(prompt, list):
        negative_prompt = [negative_prompt] * len(prompt)
    return {"prompt": prompt, "negative_prompt": negative_prompt or None, "guidance_scale": guidance_scale,
            "width": width, "height": height}


def sampling_timesteps(pipe, steps: int, width: int | None = None, height: int | None = None) -> list[float]:
    """The scheduler's timesteps for `steps` steps (the size does not change them)."""
    pipe.scheduler.set_timesteps(steps)
    return [float(t) for t in pipe.scheduler.timesteps]


def call_timesteps(args: tuple, kwargs: dict) -> tuple[int, "torch.Tensor"]:
    """(batch, timesteps) of a UNet2DConditionModel call: unet(sample, timestep, ...)."""
    import torch

    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    return sample.shape[0], torch.as_tensor(timestep, device=sample.device).reshape(-1)


def predict(unet, noisy: "torch.Tensor", timesteps: "torch.Tensor", conditioning: dict) -> "torch.Tensor":
    """The UNet's prediction for `noisy` at `timesteps`: cross-attention on the text's hidden
    states, and SDXL's pooled text and size conditioning as added_cond_kwargs."""
    device = noisy.device
    added = {key: conditioning[key].to(device) for key in ADDED_CONDITIONING if key in conditioning}
    return unet(noisy, timesteps, conditioning["encoder_hidden_states"].to(device),
                added_cond_kwargs=added or None).sample


# --------------------------------------------------------------------------------------
# UNet: diffusers <-> LDM module paths
# --------------------------------------------------------------------------------------

_EXACT, _PLAIN, _RESNET = "exact", "plain", "resnet"
_RESNET_TO_LDM = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET_TO_LDM.items()}


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """A key of a model config given as the config object or its dict."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _unet_layout_key(unet_config: Any) -> tuple:
    down = tuple(config_get(unet_config, "down_block_types") or ())
    up = tuple(config_get(unet_config, "up_block_types") or ())
    if not down or len(down) != len(up):
        raise StudioError("The UNet config needs down_block_types and up_block_types of equal length.")
    per_block = config_get(unet_config, "layers_per_block", 2)
    per_block = (int(per_block),) * len(down) if isinstance(per_block, int) else tuple(int(n) for n in per_block)
    return (
        down, up, per_block,
        config_get(unet_config, "mid_block_type", "UNetMidBlock2DCrossAttn") or "UNetMidBlock2DCrossAttn",
        config_get(unet_config, "addition_embed_type"),
        config_get(unet_config, "class_embed_type"),
    )


@functools.lru_cache(maxsize=32)
def _unet_tables(layout: tuple) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """(diffusers prefix -> (LDM prefix, kind), LDM prefix -> (diffusers prefix, kind))."""
    down, up, per_block, mid, addition, class_embed = layout
    pairs: list[tuple[str, str, str]] = [
        ("time_embedding", "time_embed", _EXACT),
        ("time_embedding.linear_1", "time_embed.0", _PLAIN),
        ("time_embedding.linear_2", "time_embed.2", _PLAIN),
        ("conv_in", "input_blocks.0.0", _PLAIN),
        ("conv_norm_out", "out.0", _PLAIN),
        ("conv_out", "out.2", _PLAIN),
    ]
    label_sources = []
    if addition == "text_time":
        label_sources.append("add_embedding")
    elif addition is not None:
        raise StudioError(f"UNet addition_embed_type {addition!r} has no LDM layout here (only 'text_time').")
    if class_embed in ("timestep", "projection"):
        label_sources.append("class_embedding")
    elif class_embed is not None:
        raise StudioError(f"UNet class_embed_type {class_embed!r} has no LDM layout here.")
    if len(label_sources) > 1:
        raise StudioError("A UNet with both add_embedding and class_embedding has no LDM layout.")
    for source in label_sources:
        pairs += [
            (source, "label_emb.0", _EXACT),
            (f"{source}.linear_1", "label_emb.0.0", _PLAIN),
            (f"{source}.linear_2", "label_emb.0.2", _PLAIN),
        ]

    index = 1
    for b, block_type in enumerate(down):
        if block_type not in ("DownBlock2D", "CrossAttnDownBlock2D"):
            raise StudioError(f"UNet down block type {block_type!r} has no LDM layout here.")
        for j in range(per_block[b]):
            pairs.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0", _RESNET))
            if block_type == "CrossAttnDownBlock2D":
                pairs.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{index}.1", _PLAIN))
            index += 1
        if b < len(down) - 1:
            pairs.append((f"down_blocks.{b}.downsamplers.0", f"input_blocks.{index}.0", _EXACT))
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{index}.0.op", _PLAIN))
            index += 1

    if mid != "UNetMidBlock2DCrossAttn":
        raise StudioError(f"UNet mid block type {mid!r} has no LDM layout here.")
    pairs += [
        ("mid_block", "middle_block", _EXACT),
        ("mid_block.resnets.0", "middle_block.0", _RESNET),
        ("mid_block.attentions.0", "middle_block.1", _PLAIN),
        ("mid_block.resnets.1", "middle_block.2", _RESNET),
    ]

    index = 0
    up_per_block = list(reversed(per_block))
    for b, block_type in enumerate(up):
        if block_type not in ("UpBlock2D", "CrossAttnUpBlock2D"):
            raise StudioError(f"UNet up block type {block_type!r} has no LDM layout here.")
        has_attn = block_type == "CrossAttnUpBlock2D"
        layers = up_per_block[b] + 1
        for j in range(layers):
            pairs.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0", _RESNET))
            if has_attn:
                pairs.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{index}.1", _PLAIN))
            if j == layers - 1 and b < len(up) - 1:
                pairs.append((f"up_blocks.{b}.upsamplers.0", f"output_blocks.{index}.{2 if has_attn else 1}", _PLAIN))
            index += 1

    to_ldm = {d: (l, kind) for d, l, kind in pairs}
    to_diffusers = {l: (d, kind) for d, l, kind in pairs}
    assert len(to_ldm) == len(to_diffusers) == len(pairs), "UNet layout table is not one-to-one"
    return to_ldm, to_diffusers


def _map_path(path: str, table: Mapping[str, tuple[str, str]], inner: Mapping[str, str], what: str) -> str:
    parts = path.split(".")
    for cut in range(min(len(parts), 5), 0, -1):
        hit = table.get(".".join(parts[:cut]))
        if hit is None:
            continue
        target, kind = hit
        rest = parts[cut:]
        if not rest:
            return target
        if kind == _PLAIN:
            return ".".join([target, *rest])
        if kind == _RESNET:
            for width in (2, 1):
                renamed = inner.get(".".join(rest[:width]))
                if renamed is not None and len(rest) >= width:
                    return ".".join([target, renamed, *rest[width:]])
        break
    raise StudioError(f"{path!r} is not a {what} UNet module or parameter name for this UNet config.")


def unet_diffusers_to_ldm(path: str, unet_config: Any) -> str:
    """The LDM/sgm name of a diffusers UNet module or parameter path, e.g.
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.
    transformer_blocks.0.attn1.to_q` (SD 1.5 and SDXL, `layers_per_block` 2). Works for
    any suffix below a mapped module (`.weight`, `.lora_A.default.weight`, ...).
    `unet_config` is `unet.config` or the config dict. Raises StudioError for paths with
    no LDM equivalent (e.g. `time_proj`, a whole `down_blocks.0`)."""
    to_ldm, _ = _unet_tables(_unet_layout_key(unet_config))
    return _map_path(path, to_ldm, _RESNET_TO_LDM, "diffusers")


def unet_ldm_to_diffusers(path: str, unet_config: Any) -> str:
    """The inverse of `unet_diffusers_to_ldm` (LDM path without `model.diffusion_model.`)."""
    _, to_diffusers = _unet_tables(_unet_layout_key(unet_config))
    return _map_path(path, to_diffusers, _RESNET_TO_DIFFUSERS, "LDM")


def module_block(path: str, unet_config: Any) -> str | None:
    """The LBW block of a diffusers UNet module path ('IN04', 'M00', 'OUT05'): its LDM
    input / middle / output block; None for layers outside the blocks (conv_in, time
    embedding, conv_out)."""
    try:
        ldm = unet_diffusers_to_ldm(path, unet_config)
    except StudioError:
        return None
    parts = ldm.split(".")
    if parts[0] == "input_blocks":
        return f"IN{int(parts[1]):02d}"
    if parts[0] == "middle_block":
        return "M00"
    if parts[0] == "output_blocks":
        return f"OUT{int(parts[1]):02d}"
    return None
