"""The built-in tiny base model: SD-1.5-architecture diffusers components at toy size.

`build_pipeline(seed)` makes the components with deterministic weights; the toy-world
training script (toyworld/builtin_training.py) trains them. `save_pipeline` writes a
diffusers folder that `StableDiffusionPipeline.from_pretrained(dir)` loads offline.
"""
from __future__ import annotations

import json
from pathlib import Path

from studio import ASSETS_DIR

BUILTIN_DIR = ASSETS_DIR / "builtin"
RESOLUTION = 64
MAX_TOKENS = 32

# Words of the toy world. Anything else falls back to single characters, so a trigger
# word such as "sks" still tokenizes (as s, k, s</w>).
VOCAB_WORDS = """
a an the of on in with and or no not photo picture image drawing painting render style
shape shapes object thing background backdrop plain flat simple centered small large big
tiny huge left right top bottom middle corner red green blue yellow purple violet orange
white black gray grey pink cyan brown dark light bright circle square triangle star
diamond ring heart cross round sks ohwx zwx toy world colored coloured one two
""".split()
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(",.!?'-:;()/&+\"")


def tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-BPE vocabulary and merges: single characters (plain and end-of-word) plus
    whole toy-world words, each word reachable by left-to-right merges."""
    tokens: list[str] = []
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        if token not in index:
            index[token] = len(tokens)
            tokens.append(token)

    index: dict[str, int] = {}
    for ch in CHARS:
        add(ch)
    for ch in CHARS:
        add(ch + "</w>")
    for word in VOCAB_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for sym in symbols[1:]:
            merged = current + sym
            if (current, sym) not in merges:
                merges.append((current, sym))
            add(merged)
            current = merged
    for special in SPECIAL_TOKENS:
        add(special)
    return index, merges


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }))


def scheduler_config() -> dict:
    return {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "timestep_spacing": "leading",
    }


# Architecture (see assets/builtin/TRAINING.md for why): a VAE with two levels keeps a
# 32x32x4 latent of the 64x64 picture (factor 2: shapes keep their corners), a four-level
# UNet over it with cross-attention at 8x8 and 4x4, and a two-layer CLIP text encoder.
VAE_BLOCK_OUT_CHANNELS = (16, 32)
LATENT_CHANNELS = 4
LATENT_SIZE = RESOLUTION // 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)
UNET_BLOCK_OUT_CHANNELS = (16, 32, 64, 64)
UNET_DOWN_BLOCKS = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
TEXT_HIDDEN_SIZE = 64


def toy_vae(block_out_channels: tuple[int, ...], latent_channels: int, **config):
    """The built-in models' AutoencoderKL: one layer per level, no mid-block attention, over
    RESOLUTION px pictures (`config`: FLUX.1's shift and scaling factors)."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels, layers_per_block=1, norm_num_groups=8,
        sample_size=RESOLUTION, mid_block_add_attention=False, **config,
    )


def toy_clip():
    """(tokenizer, text encoder) of the built-in models: the toy-world CLIP tokenizer and a
    two-layer CLIPTextModel of width TEXT_HIDDEN_SIZE over MAX_TOKENS tokens."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)
    return tokenizer, CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN_SIZE, intermediate_size=2 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_HIDDEN_SIZE,
    ))


def build_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of the built-in architecture with deterministic weights
    (random: toyworld/builtin_training.py trains them)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    vae = toy_vae(VAE_BLOCK_OUT_CHANNELS, LATENT_CHANNELS)
    tokenizer, text_encoder = toy_clip()
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=UNET_BLOCK_OUT_CHANNELS, layers_per_block=1,
        down_block_types=UNET_DOWN_BLOCKS, up_block_types=UNET_UP_BLOCKS,
        cross_attention_dim=TEXT_HIDDEN_SIZE, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(**scheduler_config())
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe, folder: str | Path = BUILTIN_DIR) -> None:
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep the slow files too so any loader works.
    write_tokenizer(folder / "tokenizer")


if __name__ == "__main__":
    save_pipeline(build_pipeline())
    print(BUILTIN_DIR)
