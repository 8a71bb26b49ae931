"""What a model family is to the studio: data (names, metadata strings, block tables, GPU
guidance) plus the few hooks where families compute differently (text conditioning and the
UNet's extra inputs). One instance per family module; nothing outside studio/families names
a family."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # torch loads only where a hook runs: the UI starts without it
    import torch


@dataclass(frozen=True)
class Part:
    """One adaptable model of a pipeline: its kohya prefix, pipeline attribute and how its
    module paths become kohya names ("diffusers": as they are; "ldm": SDXL's sgm layout;
    "clip": `text_model.`-prefixed)."""

    prefix: str
    attr: str
    naming: str

    @property
    def diffusers_prefix(self) -> str:
        return self.attr


@dataclass(frozen=True)
class GpuGuide:
    """Rough guide values for full-size models (fp16/bf16, LoRA on the UNet attention
    layers): orders of magnitude for planning, not measurements from this machine."""

    resolution: int
    base_gb: float
    activations_gb: float
    it_s: float


@dataclass(frozen=True)
class SingleFileEncoder:
    """A text encoder in a single-file (A1111 / LDM) checkpoint: its pipeline attribute, key
    prefix, layout ("clip": transformers' CLIP names; "open_clip": OpenCLIP's, with fused
    qkv and a [width, dim] projection) and what a person calls it."""

    attr: str
    prefix: str
    layout: str
    description: str


@dataclass(frozen=True)
class Family:
    name: str                           # the id stored in configs and metadata ("sd15")
    label: str                          # what a person reads ("SD 1.5")
    long_label: str                     # in messages about checkpoints ("Stable Diffusion 1.x")
    pipeline_classes: tuple[str, ...]   # diffusers pipeline class names of a base model folder
    pipeline_kwargs: Mapping[str, Any]  # for its from_pretrained (no safety checker to load)
    parts: tuple[Part, ...]             # UNet first, then the text encoders
    tokenizers: tuple[str, ...]         # pipeline attributes, one per text encoder
    ss_base_model_version: str          # sd-scripts' metadata value
    modelspec_architecture: str         # without the "/lora" suffix
    modelspec_implementation: str
    metadata_prefixes: tuple[str, ...]  # ss_base_model_version / modelspec.architecture prefixes that mean it
    block_names: tuple[str, ...]        # LoRA Block Weight vector, BASE first
    block_presets: Mapping[str, str]
    gpu: GpuGuide
    default_resolution: int
    single_file_encoders: tuple[SingleFileEncoder, ...]
    single_file_marker: str                  # a key prefix only this family's checkpoints have
    foreign_cross_attention: Mapping[int, str]  # cross-attention widths of look-alikes it refuses
    unet_name_hint: re.Pattern | None        # matches kohya UNet names only this family writes
    diffusers_path_hint: re.Pattern | None   # matches diffusers UNet paths only this family has
    # A1111's embedding keys, one per text encoder: inside an adapter file after
    # `bundle_emb.<name>.` (bundled), and in a separate embedding file
    embedding_keys: tuple[str, ...]
    embedding_file_keys: tuple[str, ...]
    encode_text: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = field(repr=False)
    size_conditioning: Callable[..., torch.Tensor | None] = field(repr=False)
    unet_inputs: Callable[..., dict[str, Any]] = field(repr=False)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(p.attr for p in self.parts if p.attr != "unet")

    @property
    def unet_part(self) -> Part:
        return self.parts[0]

    @property
    def lora_architecture(self) -> str:
        return f"{self.modelspec_architecture}/lora"

    def means(self, metadata_value: str) -> bool:
        return metadata_value.startswith(self.metadata_prefixes)
