"""What a model family is to the studio: data (names, metadata strings, block tables, memory
and speed guides) plus the few hooks where families compute differently: its denoiser (the first
part: a UNet or a transformer), its text conditioning, its training objective (noise
schedule, prediction target, loss weighting, timestep sampling: objectives.py) and the call
of its denoiser. The trainer and the engine read these and name no family, denoiser class
or text encoder. One instance per family module; nothing outside studio/models/families
names a family."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # torch loads only where a hook runs: the UI starts without it
    import torch

    from studio.models.families.objectives import Objective


@dataclass(frozen=True)
class Piece:
    """Where a diffusers module sits in the layout kohya names follow: that layout's module
    path, and (for a layer the layout fuses from several diffusers modules, e.g. FLUX.1's
    qkv) the module's place among the `count` parts, stacked along the output rows in
    this order."""

    path: str
    index: int = 0
    count: int = 1

    @property
    def fused(self) -> bool:
        return self.count > 1


@dataclass(frozen=True)
class Part:
    """One adaptable model of a pipeline: its kohya prefix, pipeline attribute and how its
    module paths become kohya names ("diffusers": as they are; "ldm": SDXL's sgm layout;
    "clip": `text_model.`-prefixed; "layout": `layout(path)`, the original model's names,
    which may fuse several diffusers modules into one). `alias_prefixes`: other trainers'
    prefixes for the same model whose names are its diffusers paths (read, and written for
    parts of a fused layer that cannot be fused)."""

    prefix: str
    attr: str
    naming: str
    layout: Callable[[str], Piece | None] | None = field(default=None, repr=False, compare=False)
    alias_prefixes: tuple[str, ...] = ()

    @property
    def diffusers_prefix(self) -> str:
        return self.attr


RUNTIME_GB = 0.35  # a worker's resident memory once torch, diffusers, transformers and peft are loaded (measured)
CHECKPOINTING_SHARE = 0.4  # the activations kept with gradient checkpointing (a guide value)


@dataclass(frozen=True)
class ResourceGuide:
    """What training a LoRA on the family's full-size model takes, for the Train tab's hint.

    Memory, in GiB, for `pixels` trained per step (batch x accumulation x resolution²), with
    s = pixels / resolution², c = CHECKPOINTING_SHARE with gradient checkpointing, else 1:

        CPU (fp32):  RAM  = parameters x 4 B + RUNTIME_GB + 2 x activations_gb x s x c
        GPU:         VRAM = base_gb x (1.6 in fp32) + activations_gb x s x c

    The CPU figure is measured (tests/test_realsize.py; bench/RESULTS.md, "Real size"): the
    weights of every part in fp32 (one copy at the peak, loading an fp32 single file included),
    the runtime, and activations in fp32 (twice the guide's fp16 ones). The earlier
    base_gb x 1.6 + activations said 7.0 GiB for SD 1.5 at 256 px (fp32, batch 1), where the
    training process peaked at 5.12-5.21 GiB (text-encoder LoRA) and 5.22-5.27 (UNet LoRA); this
    says 5.6. The GPU figures (`base_gb`, `activations_gb` in fp16 / bf16 at
    `resolution`, `it_s` on a recent 24 GB card, LoRA on the UNet attention) are planning
    guides, not measured here. `parameters`: denoiser, text encoders and VAE, counted on the
    skeletons' configs (assets/skeletons)."""

    resolution: int
    base_gb: float
    activations_gb: float
    it_s: float
    parameters: int

    def training_memory_gb(self, pixels: int, *, gpu: bool, full_precision: bool,
                           gradient_checkpointing: bool) -> float:
        """RAM (`gpu` False) or VRAM in GiB for one training process; the formula above."""
        share = pixels / self.resolution ** 2 * (CHECKPOINTING_SHARE if gradient_checkpointing else 1.0)
        if not gpu:
            return self.parameters * 4 / 2 ** 30 + RUNTIME_GB + 2 * self.activations_gb * share
        return self.base_gb * (1.6 if full_precision else 1.0) + self.activations_gb * share


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
class Sampler:
    """A sampler the engine offers for a family's models: what a person reads (A1111's name,
    written in a picture's `parameters`), the diffusers scheduler class, and the settings it
    changes in the pipeline's own scheduler config (the rest, e.g. FLUX.1's shift, is kept)."""

    label: str
    scheduler: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BlockTable:
    """A family's blocks as LoRA Block Weight (the sd-webui-lora-block-weight extension) names
    them: `names` the family's own vector (BASE = the text encoders, first), `full` the long
    form every model of the family also takes and the columns of a mixture's gates (one per
    block a module can be in, BASE first), `presets` the named vectors, and
    `module_block(path, denoiser_config)` the block (a name of `full`) of a denoiser module
    path, None outside the blocks (a UNet's conv_in, time embedding, conv_out)."""

    names: tuple[str, ...]
    full: tuple[str, ...]
    presets: Mapping[str, str]
    module_block: Callable[[str, Any], str | None] = field(repr=False)


@dataclass(frozen=True)
class Family:
    name: str                           # the id stored in configs and metadata ("sd15")
    label: str                          # what a person reads ("SD 1.5")
    long_label: str                     # in messages about checkpoints ("Stable Diffusion 1.x")
    pipeline_classes: tuple[str, ...]   # diffusers pipeline class names of a base model folder
    pipeline_kwargs: Mapping[str, Any]  # for its from_pretrained (no safety checker to load)
    parts: tuple[Part, ...]             # the denoiser first, then the text encoders
    tokenizers: tuple[str, ...]         # pipeline attributes, one per text encoder
    ss_base_model_version: str          # sd-scripts' metadata value
    modelspec_architecture: str         # without the "/lora" suffix
    modelspec_implementation: str
    metadata_prefixes: tuple[str, ...]  # ss_base_model_version / modelspec.architecture prefixes that mean it
    blocks: BlockTable                  # LoRA Block Weight, block-wise weights, mixture gates
    resources: ResourceGuide
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
    # config key of training.block_lr_<key> -> the first component of the denoiser's module
    # paths it multiplies (the family's coarse sections; block_rank_<key> likewise)
    sections: Mapping[str, str]
    # (tokenizers, encoders, captions, device) -> the text conditioning: named batch-first
    # tensors, cached per caption by the trainer and handed to `predict`
    encode_text: Callable[..., dict[str, torch.Tensor]] = field(repr=False)
    # (examples, crops) -> per-picture conditioning (SDXL's size and crop), named as encode_text's
    size_conditioning: Callable[..., dict[str, torch.Tensor]] = field(repr=False)
    # pipeline -> its training objective (studio.models.families.objectives.Objective)
    objective: Callable[[Any], "Objective"] = field(repr=False)
    # (denoiser, noisy latents, timesteps, conditioning) -> the denoiser's prediction, shaped as the latents
    predict: Callable[..., torch.Tensor] = field(repr=False)
    # training settings (studio.config.TrainingConfig) -> what the family's objective cannot honour, one
    # sentence each (the objective class's `check`, read before any model loads)
    objective_check: Callable[[Any], list[str]] = field(repr=False)
    # the samplers generation offers (name -> Sampler), the first the default
    samplers: Mapping[str, Sampler] = field(repr=False)
    # (pipe, prompt, negative_prompt, guidance_scale, width, height) -> the pipeline call's keyword
    # arguments for them (prompt and negative prompt may be lists): how the CFG scale steers this
    # family's models, which size a model draws when none is given
    generation_kwargs: Callable[..., dict] = field(repr=False)
    # (pipe, steps, width, height) -> the timesteps (in [0, T)) the pipeline's scheduler runs, in order
    sampling_timesteps: Callable[..., list[float]] = field(repr=False)
    # (args, kwargs) of a call of the denoiser -> (batch size, its timesteps in [0, T)): what a
    # forward pre-hook (T-LoRA's rank mask) reads
    call_timesteps: Callable[[tuple, dict], tuple[int, "torch.Tensor"]] = field(repr=False)
    # the text encoders (pipeline attributes) a text-encoder adapter (network.train_text_encoder) trains
    text_encoder_lora: tuple[str, ...] = ()
    # what check_training warns when network.train_text_encoder leaves some text encoders frozen
    text_encoder_note: str = ""
    # the denoiser's config -> modelspec.architecture (without "/lora") of that model, when the
    # family's variants differ (FLUX.1-dev / schnell); None: modelspec_architecture
    architecture_of: Callable[[Any], str] | None = field(default=None, repr=False)
    # (a single file holding the denoiser alone, denoiser state-dict shapes) -> its diffusers
    # state dict; None: the family's single files are whole pipelines (SD's LDM checkpoints)
    denoiser_from_single_file: Callable[..., dict] | None = field(default=None, repr=False)
    # its diffusers state dict -> the original layout's (a fused checkpoint is then the denoiser
    # alone, as the family's single files are); None: whole LDM pipelines
    denoiser_to_single_file: Callable[..., dict] | None = field(default=None, repr=False)
    # the denoiser's layers a low-precision base (fp8 storage) keeps at full precision: its
    # first and last layers, small and precision-critical
    full_precision_modules: tuple[str, ...] = ()

    @property
    def denoiser(self) -> str:
        """The pipeline attribute of the model that denoises (unet, transformer)."""
        return self.parts[0].attr

    @property
    def denoiser_part(self) -> Part:
        return self.parts[0]

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(p.attr for p in self.parts[1:])

    def architecture(self, denoiser_config: Any = None) -> str:
        """modelspec.architecture of a base model of this family (its denoiser's config tells
        the variant, where the family has several)."""
        if self.architecture_of is None or denoiser_config is None:
            return self.modelspec_architecture
        return self.architecture_of(denoiser_config)

    def lora_architecture_of(self, denoiser_config: Any = None) -> str:
        return f"{self.architecture(denoiser_config)}/lora"

    @property
    def lora_architecture(self) -> str:
        return f"{self.modelspec_architecture}/lora"

    @property
    def default_sampler(self) -> str:
        return next(iter(self.samplers))

    def means(self, metadata_value: str) -> bool:
        return metadata_value.startswith(self.metadata_prefixes)
