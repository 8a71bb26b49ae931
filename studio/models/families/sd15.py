"""Stable Diffusion 1.x (and the built-in tiny model, which has its architecture): one CLIP
text encoder whose last hidden state conditions the UNet; kohya names its UNet modules by
their diffusers paths."""
from __future__ import annotations

from typing import TYPE_CHECKING

from studio.models.families import unet
from studio.models.families.family import BlockTable, Family, Part, ResourceGuide, SingleFileEncoder
from studio.models.families.objectives import DiffusionObjective, diffusion_objective

if TYPE_CHECKING:
    import torch

TE_PREFIX = "cond_stage_model.transformer.text_model."

BLOCKS = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
          "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
# The sd-webui-lora-block-weight extension's default SD1.x presets.
PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}


def encode_text(tokenizers, encoders, captions: list[str], device) -> dict[str, torch.Tensor]:
    """The text encoder's last hidden state."""
    tokenizer, encoder = tokenizers[0], encoders[0]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    return {"encoder_hidden_states": encoder(ids)[0]}


def size_conditioning(examples, crops) -> dict:
    return {}


FAMILY = Family(
    name="sd15", label="SD 1.5", long_label="Stable Diffusion 1.x",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    pipeline_kwargs={"safety_checker": None, "requires_safety_checker": False},
    parts=(Part("lora_unet", "unet", "diffusers"), Part("lora_te", "text_encoder", "clip")),
    tokenizers=("tokenizer",),
    ss_base_model_version="sd_v1", modelspec_architecture="stable-diffusion-v1",
    modelspec_implementation="diffusers", metadata_prefixes=("sd_v1", "stable-diffusion-v1"),
    blocks=BlockTable(BLOCKS, unet.FULL_BLOCKS, PRESETS, unet.module_block),
    resources=ResourceGuide(resolution=512, base_gb=4.0, activations_gb=2.5, it_s=2.5, parameters=1_066_235_307),
    single_file_encoders=(SingleFileEncoder("text_encoder", TE_PREFIX, "clip", "text encoder (CLIP-L)"),),
    single_file_marker="cond_stage_model.transformer.",
    foreign_cross_attention={1024: "Stable Diffusion 2.x (1024-wide cross-attention)"},
    unet_name_hint=None, diffusers_path_hint=None,
    default_resolution=512,
    # A1111 reads `string_to_param.*` (its .pt layout) in a bundle and any one tensor in an
    # embedding file; "emb_params" is what sd-scripts writes there.
    embedding_keys=("string_to_param.*",), embedding_file_keys=("emb_params",),
    sections=unet.SECTIONS, encode_text=encode_text, size_conditioning=size_conditioning,
    objective=diffusion_objective, predict=unet.predict, objective_check=DiffusionObjective.check,
    full_precision_modules=unet.FULL_PRECISION,
    samplers=unet.SAMPLERS, generation_kwargs=unet.generation_kwargs, sampling_timesteps=unet.sampling_timesteps,
    call_timesteps=unet.call_timesteps, text_encoder_lora=("text_encoder",),
)
