"""SDXL base: two text encoders (CLIP ViT-L and OpenCLIP bigG) whose penultimate hidden
states are concatenated, the second's pooled projection and the picture's size and crop as
extra UNet inputs; kohya names its UNet modules by the LDM (sgm) layout."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from studio.models.families import unet
from studio.models.families.family import BlockTable, Family, Part, ResourceGuide, SingleFileEncoder
from studio.models.families.objectives import DiffusionObjective, diffusion_objective

if TYPE_CHECKING:
    import torch

TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."
TE2_PREFIX = "conditioner.embedders.1.model."

BLOCKS = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
# The SD1.x presets' groups on SDXL's blocks: shallow input (IN04, IN05), deep input (IN07,
# IN08), middle, deep output (OUT00-OUT02), shallow output (OUT03-OUT05).
PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 12),
}


def encode_text(tokenizers, encoders, captions: list[str], device) -> dict[str, torch.Tensor]:
    """Penultimate hidden states of both encoders concatenated, and the second encoder's
    pooled projection (the UNet's added `text_embeds`)."""
    import torch

    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}


def size_conditioning(examples, crops) -> dict[str, torch.Tensor]:
    """The UNet's added `time_ids`: (original height, width, crop top, left, target height,
    width) per picture."""
    import torch

    return {"time_ids": torch.tensor([[ex.size[1], ex.size[0], top, left, ex.bucket[1], ex.bucket[0]]
                                      for ex, (top, left) in zip(examples, crops)], dtype=torch.float32)}


FAMILY = Family(
    name="sdxl", label="SDXL", long_label="SDXL",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    pipeline_kwargs={},
    parts=(Part("lora_unet", "unet", "ldm"), Part("lora_te1", "text_encoder", "clip"),
           Part("lora_te2", "text_encoder_2", "clip")),
    tokenizers=("tokenizer", "tokenizer_2"),
    ss_base_model_version="sdxl_base_v1-0", modelspec_architecture="stable-diffusion-xl-v1-base",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    metadata_prefixes=("sdxl", "stable-diffusion-xl"),
    blocks=BlockTable(BLOCKS, unet.FULL_BLOCKS, PRESETS, unet.module_block),
    resources=ResourceGuide(resolution=1024, base_gb=10.0, activations_gb=6.0, it_s=1.0, parameters=3_468_837_867),
    single_file_encoders=(SingleFileEncoder("text_encoder", TE1_PREFIX, "clip", "text encoder 1 (CLIP-L)"),
                          SingleFileEncoder("text_encoder_2", TE2_PREFIX, "open_clip", "text encoder 2 (OpenCLIP bigG)")),
    single_file_marker=TE2_PREFIX, foreign_cross_attention={},
    unet_name_hint=re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks)_"),
    diffusers_path_hint=re.compile(r"transformer_blocks\.[1-9]"),  # deeper transformer stacks than SD 1.x
    default_resolution=1024,
    embedding_keys=("clip_l", "clip_g"), embedding_file_keys=("clip_l", "clip_g"),
    sections=unet.SECTIONS, encode_text=encode_text, size_conditioning=size_conditioning,
    objective=diffusion_objective, predict=unet.predict, objective_check=DiffusionObjective.check,
    full_precision_modules=unet.FULL_PRECISION,
    samplers=unet.SAMPLERS, generation_kwargs=unet.generation_kwargs, sampling_timesteps=unet.sampling_timesteps,
    call_timesteps=unet.call_timesteps, text_encoder_lora=("text_encoder", "text_encoder_2"),
)
