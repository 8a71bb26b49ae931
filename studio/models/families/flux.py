"""FLUX.1 (Black Forest Labs): a transformer denoiser (diffusers `FluxTransformer2DModel`:
double-stream blocks over image and text tokens, then single-stream blocks, rotary
positions) on packed 2x2 patches of a 16-channel VAE's latents, conditioned on T5's hidden
states (the text tokens) and CLIP-L's pooled output (added to the timestep embedding); the
dev model also embeds a guidance value, schnell does not. Trained with flow matching
(objectives.FlowMatchObjective).

Adapter files name the transformer's modules as the original (BFL) model does, the way
sd-scripts' networks/lora_flux.py writes them: `lora_unet_double_blocks_0_img_attn_qkv`
is ONE module for diffusers' to_q, to_k and to_v (stacked along the output rows), and
`lora_unet_single_blocks_0_linear1` fuses to_q, to_k, to_v and proj_mlp. `layout` maps a
diffusers path to its BFL module and place; `lycoris_` / `lora_transformer_` (SimpleTuner,
OneTrainer: diffusers paths) are read too. CLIP-L is `lora_te1`, T5 `lora_te3` (sd-scripts).
"""
from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

from studio.errors import StudioError
from studio.models.families.family import BlockTable, Family, Part, Piece, ResourceGuide, Sampler
from studio.models.families.objectives import FlowMatchObjective, flow_match_objective

if TYPE_CHECKING:
    import torch

#: The guidance value a dev model is trained with (sd-scripts' `--guidance_scale 1.0`, its
#: recommendation for FLUX.1-dev LoRAs); schnell has no guidance embedding.
TRAINING_GUIDANCE = 1.0
#: FluxPipeline's longest T5 prompt (its max_sequence_length)
MAX_T5_TOKENS = 512
#: The transformer's timestep argument is t / T (FluxPipeline divides by 1000, as `predict` does)
TIMESTEP_SCALE = 1000
#: FLUX.1 samples with flow-matching Euler, its shift from the pipeline's scheduler config
SAMPLERS = {"euler": Sampler("Euler", "FlowMatchEulerDiscreteScheduler")}

# diffusers module (in a double block) -> (BFL module, place in it, parts)
_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 3), "attn.to_k": ("img_attn.qkv", 1, 3), "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3), "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", 0, 1), "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.net.0.proj": ("img_mlp.0", 0, 1), "ff.net.2": ("img_mlp.2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 1), "ff_context.net.2": ("txt_mlp.2", 0, 1),
    "norm1.linear": ("img_mod.lin", 0, 1), "norm1_context.linear": ("txt_mod.lin", 0, 1),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation.lin", 0, 1),
}
_GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
# Norm weights in the BFL checkpoint (not adaptable; the single-file layout needs them).
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


@functools.lru_cache(maxsize=4096)
def layout(path: str) -> Piece | None:
    """The BFL module (and place in it) of a diffusers FluxTransformer2DModel module path;
    None for a module the BFL model has no Linear for (norm_out.linear, whose rows BFL
    stores swapped)."""
    match = _BLOCK.match(path)
    if match is None:
        return Piece(_GLOBAL[path]) if path in _GLOBAL else None
    kind, index, rest = match.groups()
    table, prefix = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
    if rest not in table:
        return None
    name, place, count = table[rest]
    return Piece(f"{prefix}.{index}.{name}", place, count)


#: Double and single blocks of the full-size FLUX.1 transformers (dev, schnell).
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38
#: LoRA Block Weight's FLUX.1 vector: the text encoders (BASE), then double blocks D00..D18,
#: then single blocks S00..S37. A smaller transformer (the built-in tiny one) uses the first.
BLOCKS = ("BASE", *(f"D{i:02d}" for i in range(DOUBLE_BLOCKS)), *(f"S{i:02d}" for i in range(SINGLE_BLOCKS)))
PRESETS = {
    "NONE": ",".join(["0"] * len(BLOCKS)),
    "ALL": ",".join(["1"] * len(BLOCKS)),
    "ALL0.5": ",".join(["0.5"] * len(BLOCKS)),
    "DOUBLE": ",".join(["1"] * (1 + DOUBLE_BLOCKS) + ["0"] * SINGLE_BLOCKS),
    "SINGLE": ",".join(["1"] + ["0"] * DOUBLE_BLOCKS + ["1"] * SINGLE_BLOCKS),
}
_BLOCK_PATH = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def module_block(path: str, transformer_config) -> str | None:
    """The LBW block of a transformer module path: D<n> in double block n, S<n> in single
    block n; None outside the blocks (the embedders, the final layer)."""
    match = _BLOCK_PATH.match(path + ".")
    if match is None:
        return None
    return f"{'D' if match.group(1) == 'transformer_blocks' else 'S'}{int(match.group(2)):02d}"


def encode_text(tokenizers, encoders, captions: list[str], device) -> dict[str, torch.Tensor]:
    """As FluxPipeline.encode_prompt: T5's last hidden state (the text tokens, padded to
    the tokenizer's length, at most 512) and CLIP's pooled output."""
    clip_tokenizer, t5_tokenizer = tokenizers
    clip, t5 = encoders
    clip_ids = clip_tokenizer(captions, padding="max_length", max_length=clip_tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device)
    t5_ids = t5_tokenizer(captions, padding="max_length", max_length=min(t5_tokenizer.model_max_length, MAX_T5_TOKENS),
                          truncation=True, return_tensors="pt").input_ids.to(device)
    return {"encoder_hidden_states": t5(t5_ids, output_hidden_states=False)[0],
            "pooled_projections": clip(clip_ids, output_hidden_states=False).pooler_output}


def size_conditioning(examples, crops) -> dict:
    return {}


def predict(transformer, noisy: "torch.Tensor", timesteps: "torch.Tensor", conditioning: dict) -> "torch.Tensor":
    """The transformer's velocity for `noisy` [B, C, h, w] at `timesteps` (in [0, 1000)),
    called as FluxPipeline calls it: latents packed into 2x2 patches [B, hw/4, 4C] with their
    (0, row, column) ids, text ids all zero, timesteps / 1000, and for a dev model the
    guidance TRAINING_GUIDANCE; the output unpacked to the latents' shape."""
    import torch
    from diffusers import FluxPipeline

    batch, channels, height, width = noisy.shape
    device, dtype = noisy.device, transformer.dtype
    hidden = conditioning["encoder_hidden_states"].to(device, dtype)
    packed = FluxPipeline._pack_latents(noisy.to(dtype), batch, channels, height, width)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
    txt_ids = torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((batch,), TRAINING_GUIDANCE, device=device, dtype=torch.float32)
    out = transformer(hidden_states=packed, timestep=timesteps.to(device, dtype) / TIMESTEP_SCALE, guidance=guidance,
                      pooled_projections=conditioning["pooled_projections"].to(device, dtype),
                      encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, height, width, 1)


def generation_kwargs(pipe, prompt, negative_prompt: str, guidance_scale: float, width: int | None = None,
                      height: int | None = None) -> dict:
    """FluxPipeline's arguments for a request. A transformer with a guidance embedding
    (FLUX.1-dev) takes the CFG scale as its distilled guidance (one pass per step; 3.5 is
    BFL's default) and no negative prompt; one without (FLUX.1-schnell, the built-in tiny
    model) is steered with true classifier-free guidance against the negative prompt (the
    empty prompt when none): two passes per step, none above scale 1. The T5 prompt is the
    T5 tokenizer's length (at most 512), and a picture without a size is the VAE's native
    one (FluxPipeline's own default assumes FLUX.1's factor-8 VAE)."""
    size = pipe.vae.config.sample_size
    kwargs = {"prompt": prompt, "width": width or size, "height": height or size,
              "max_sequence_length": min(pipe.tokenizer_2.model_max_length, MAX_T5_TOKENS)}
    if pipe.transformer.config.guidance_embeds:
        if negative_prompt:
            raise StudioError("This FLUX.1 model (dev: a guidance embedding) is steered by its distilled guidance, "
                              "the CFG scale (3.5 is usual), and takes no negative prompt; leave it empty.")
        return {**kwargs, "guidance_scale": guidance_scale}
    negative = negative_prompt or ""
    return {**kwargs, "negative_prompt": [negative] * len(prompt) if isinstance(prompt, list) else negative,
            "true_cfg_scale": guidance_scale}


def sampling_timesteps(pipe, steps: int, width: int | None = None, height: int | None = None) -> list[float]:
    """The timesteps FluxPipeline runs for `steps` steps at that size: σ from 1 to 1/steps,
    shifted by mu for the picture's image tokens (diffusers' calculate_shift)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    size, factor = pipe.vae.config.sample_size, 2 * pipe.vae_scale_factor
    tokens = ((height or size) // factor) * ((width or size) // factor)
    config = pipe.scheduler.config
    mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return [float(t) for t in timesteps]


def call_timesteps(args: tuple, kwargs: dict) -> tuple[int, "torch.Tensor"]:
    """(batch, timesteps in [0, T)) of a FluxTransformer2DModel call, which takes t / T."""
    import torch

    hidden = args[0] if args else kwargs["hidden_states"]
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[3]
    return hidden.shape[0], torch.as_tensor(timestep, device=hidden.device).reshape(-1) * TIMESTEP_SCALE


def architecture_of(transformer_config) -> str:
    """sd-scripts' modelspec.architecture: FLUX.1-dev has a guidance embedding, schnell none
    (library/flux_utils.py tells them apart by guidance_in)."""
    guidance = (transformer_config.get("guidance_embeds") if isinstance(transformer_config, dict)
                else getattr(transformer_config, "guidance_embeds", True))
    return "flux-1-dev" if guidance else "flux-1-schnell"


def state_dict_to_bfl(state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """A diffusers FluxTransformer2DModel state dict under the original (BFL) checkpoint's
    names (`double_blocks.0.img_attn.qkv.weight`, ...): fused layers concatenated along the
    rows in their layout order, RMS norm weights as `.scale`, and norm_out's (scale, shift)
    rows as BFL's (shift, scale) in `final_layer.adaLN_modulation.1`."""
    import torch

    fused: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".")
        piece = layout(module)
        if piece is not None:
            fused.setdefault(f"{piece.path}.{kind}", {})[piece.index] = tensor
            continue
        if module == "norm_out.linear":
            scale, shift = tensor.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
            continue
        match = _BLOCK.match(module)
        norms = _DOUBLE_NORMS if match and match.group(1) == "transformer_blocks" else _SINGLE_NORMS
        if match is None or match.group(3) not in norms:
            raise ValueError(f"{key} has no place in a FLUX.1 checkpoint")
        prefix = "double_blocks" if match.group(1) == "transformer_blocks" else "single_blocks"
        out[f"{prefix}.{match.group(2)}.{norms[match.group(3)]}.scale"] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)])
    return out


def state_dict_from_bfl(bfl: dict[str, "torch.Tensor"], shapes: dict[str, tuple[int, ...]]) -> dict[str, "torch.Tensor"]:
    """The inverse of state_dict_to_bfl for a transformer whose diffusers state dict has
    `shapes` (key -> shape, e.g. of the model built on the meta device from its config):
    every fused BFL tensor split by the rows of its parts, in layout order. Own code, not
    diffusers' convert_flux_transformer_checkpoint_to_diffusers, which splits at FLUX.1's
    full-size widths (inner_dim 3072, hard-coded) and so cannot read another size."""
    import torch

    names = _bfl_names(shapes)
    rows: dict[str, list[tuple[int, str]]] = {}
    for key in shapes:
        piece = layout(key.rpartition(".")[0])
        if piece is not None:
            rows.setdefault(names[key], []).append((piece.index, key))
    start: dict[str, int] = {}
    for parts in rows.values():
        row = 0
        for _, key in sorted(parts):
            start[key] = row
            row += shapes[key][0]
    out = {}
    for key, shape in shapes.items():
        tensor = bfl[names[key]]
        if key in start:
            tensor = tensor[start[key]:start[key] + shape[0]]
        elif key.startswith("norm_out.linear."):
            shift, scale = tensor.chunk(2, dim=0)
            tensor = torch.cat([scale, shift])
        out[key] = tensor
    return out


def _bfl_names(keys) -> dict[str, str]:
    """diffusers state-dict key -> the BFL checkpoint key holding it (whole or in part)."""
    out = {}
    for key in keys:
        module, _, kind = key.rpartition(".")
        piece = layout(module)
        if piece is not None:
            out[key] = f"{piece.path}.{kind}"
        elif module == "norm_out.linear":
            out[key] = f"final_layer.adaLN_modulation.1.{kind}"
        else:
            match = _BLOCK.match(module)
            double = match is not None and match.group(1) == "transformer_blocks"
            norms = _DOUBLE_NORMS if double else _SINGLE_NORMS
            if match is None or match.group(3) not in norms:
                raise ValueError(f"{key} has no place in a FLUX.1 checkpoint")
            out[key] = f"{'double_blocks' if double else 'single_blocks'}.{match.group(2)}.{norms[match.group(3)]}.scale"
    return out


FAMILY = Family(
    name="flux", label="FLUX.1", long_label="FLUX.1",
    pipeline_classes=("FluxPipeline",),
    pipeline_kwargs={},
    parts=(Part("lora_unet", "transformer", "layout", layout=layout, alias_prefixes=("lycoris", "lora_transformer")),
           Part("lora_te1", "text_encoder", "clip"),
           Part("lora_te3", "text_encoder_2", "diffusers")),
    tokenizers=("tokenizer", "tokenizer_2"),
    # sd-scripts (library/flux_utils.py MODEL_VERSION_FLUX_V1, library/sai_model_spec.py)
    ss_base_model_version="flux1", modelspec_architecture="flux-1-dev",
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    metadata_prefixes=("flux1", "flux-1", "flux"),
    blocks=BlockTable(BLOCKS, BLOCKS, PRESETS, module_block),
    # FLUX.1-dev in bf16 is 24 GB of transformer weights alone: 16-24 GB cards train it with
    # an fp8 / NF4 base (training.base_weights) and gradient checkpointing.
    resources=ResourceGuide(resolution=1024, base_gb=24.0, activations_gb=10.0, it_s=0.5,
                            parameters=16_870_599_139),
    default_resolution=1024,
    single_file_encoders=(),
    single_file_marker="double_blocks.",
    foreign_cross_attention={},
    unet_name_hint=re.compile(r"lora_unet_(double_blocks|single_blocks)_"),
    diffusers_path_hint=re.compile(r"^(single_transformer_blocks|transformer_blocks\.\d+\.attn\.add_q_proj)"),
    embedding_keys=("clip_l", "t5"), embedding_file_keys=("clip_l", "t5"),
    denoiser_from_single_file=state_dict_from_bfl, denoiser_to_single_file=state_dict_to_bfl,
    # No sections: block_lr_* and block_rank_* split a UNet's down / mid / up blocks, which a
    # transformer has not; studio.jobs.runs.check_training refuses them by name.
    sections={},
    encode_text=encode_text, size_conditioning=size_conditioning,
    objective=flow_match_objective, predict=predict, objective_check=FlowMatchObjective.check,
    samplers=SAMPLERS, generation_kwargs=generation_kwargs, sampling_timesteps=sampling_timesteps,
    call_timesteps=call_timesteps, architecture_of=architecture_of,
    # CLIP-L only, as sd-scripts trains a FLUX.1 text-encoder LoRA unless asked for T5 (train_t5xxl)
    text_encoder_lora=("text_encoder",),
    text_encoder_note="network.train_text_encoder on FLUX.1 trains CLIP-L (text_encoder) only; T5-XXL (text_encoder_2) "
                      "stays frozen, as in sd-scripts without train_t5xxl.",
)
