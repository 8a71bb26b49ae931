"""Tiny SD 1.5 and SDXL pipelines for tests: the real architectures (same diffusers /
transformers classes, same wiring) at toy size, with deterministic weights.

    from tests.tiny_models import tiny_sd15_pipeline, tiny_sdxl_pipeline, write_config_folder

    pipe = tiny_sdxl_pipeline(seed=0)          # StableDiffusionXLPipeline, 64x64 images
    image = generate(pipe, "a red circle")     # numpy [1, 64, 64, 3], 2 steps, seeded
    config = write_config_folder(pipe, tmp_path / "config")  # configs + tokenizers, no weights

Both are small enough to build, save, load and sample in a test on a CPU (use
`torch.set_num_threads(1)` on a shared machine). Weights are random (seeded), so images are
noise: compare them to each other, not to anything meaningful.

Sizes (SDXL): UNet block_out_channels (32, 64, 64), layers_per_block 2, down blocks
(DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D) and transformer_layers_per_block
(1, 1, 2) like real SDXL's (1, 2, 10) pattern, linear proj_in/out, addition_embed_type
"text_time"; text encoder 1 = CLIPTextModel (hidden 32), text encoder 2 =
CLIPTextModelWithProjection (hidden 64, projection 48) so cross_attention_dim = 32 + 64 = 96
and projection_class_embeddings_input_dim = 6 * 8 + 48 = 96. The two hidden sizes differ on
purpose: diffusers tells SDXL's two text encoders apart by width when loading a single file.
Tokenizers use the built-in toy vocabulary (studio.models.builtin); tokenizer_2 pads with "!"
like SDXL's OpenCLIP tokenizer.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

RESOLUTION = 64

SDXL_TE1_HIDDEN = 32
SDXL_TE2_HIDDEN = 64
SDXL_TE2_PROJECTION = 48
SDXL_TIME_EMBED_DIM = 8


def tiny_sd15_pipeline(seed: int = 0):
    """The built-in tiny SD-1.5-architecture StableDiffusionPipeline (DDIM scheduler)."""
    from studio.models.builtin import build_pipeline

    return build_pipeline(seed)


def _toy_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    from studio.models.builtin import MAX_TOKENS, write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS, pad_token=pad_token)


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline of SDXL's architecture at toy size (see module doc),
    Euler scheduler with SDXL's config, no watermarker."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.models.builtin import MAX_TOKENS

    torch.manual_seed(seed)
    tokenizer = _toy_tokenizer()
    tokenizer_2 = _toy_tokenizer(pad_token="!")

    def text_config(hidden: int, projection: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
            hidden_act=act, projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )

    text_encoder = CLIPTextModel(text_config(SDXL_TE1_HIDDEN, SDXL_TE1_HIDDEN, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(SDXL_TE2_HIDDEN, SDXL_TE2_PROJECTION, "gelu"))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
        cross_attention_dim=SDXL_TE1_HIDDEN + SDXL_TE2_HIDDEN, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_TE2_PROJECTION,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=RESOLUTION, scaling_factor=0.13025, force_upcast=False,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def write_config_folder(pipe, folder: Path) -> Path:
    """A diffusers-format config folder for `pipe` with no weights: model_index.json, each
    component's config, tokenizer files. What `load_single_file(config_dir=...)` needs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if component is None:
            continue
        target = folder / name
        if hasattr(component, "save_vocabulary"):  # tokenizer
            component.save_pretrained(target)
        elif hasattr(component, "save_config"):  # diffusers model or scheduler
            component.save_config(target)
        else:  # transformers model: its config only
            component.config.save_pretrained(target)
    return folder


def generate(pipe, prompt: str = "a red circle", seed: int = 0, steps: int = 2):
    """One seeded 64x64 image as a float numpy array [1, H, W, 3]."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        prompt, num_inference_steps=steps, generator=generator, output_type="np",
        height=RESOLUTION, width=RESOLUTION,
    ).images
