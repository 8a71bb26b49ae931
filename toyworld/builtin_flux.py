"""The built-in tiny FLUX.1-architecture model (assets/builtin-flux): diffusers components at
toy size, deterministic random weights (toyworld/builtin_flux_training.py trains them).

- VAE: AutoencoderKL, 3 levels (16, 32, 32): 64x64x3 -> 16x16x16 latents (factor 4; FLUX.1
  has 16 channels at factor 8), with a shift and a scaling factor as FLUX.1's VAE has.
- Transformer: FluxTransformer2DModel, 2 double-stream + 4 single-stream blocks, 3 heads of
  32 (width 96), on 2x2 patches of the latents (8x8 = 64 image tokens), no guidance
  embedding (as FLUX.1-schnell: trained from scratch, it has no guidance to distil; the
  picture is steered with true classifier-free guidance instead).
- Text encoders: CLIPTextModel (the built-in SD model's architecture and toy tokenizer,
  pooled) and T5EncoderModel (2 gated-GELU layers, width 64) with a T5 tokenizer (a
  Unigram model over the same toy words, built with the `tokenizers` library), 32 CLIP
  and 16 T5 tokens.
- Scheduler: FlowMatchEulerDiscreteScheduler with FLUX.1-dev's config (dynamic shifting).
"""
from __future__ import annotations

from pathlib import Path

from studio import ASSETS_DIR
from studio.models.builtin import (CHARS, RESOLUTION, TEXT_HIDDEN_SIZE, VOCAB_WORDS, toy_clip, toy_vae,
                                   write_tokenizer)

FLUX_DIR = ASSETS_DIR / "builtin-flux"
VAE_BLOCK_OUT_CHANNELS = (16, 32, 32)
LATENT_CHANNELS = 16
LATENT_SIZE = RESOLUTION // 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)
HEADS, HEAD_DIM = 3, 32
# T5 prompt length: toy captions (with a trigger word) are at most 12 tokens; FluxPipeline
# callers pass max_sequence_length = tokenizer_2.model_max_length
T5_TOKENS = 16
DOUBLE_BLOCKS, SINGLE_BLOCKS = 2, 4
AXES_DIMS_ROPE = (8, 12, 12)
# FLUX.1-dev's scheduler config (scheduler/scheduler_config.json)
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def t5_vocab() -> list[tuple[str, float]]:
    """A Unigram vocabulary in T5's layout (<pad> 0, </s> 1, <unk> 2): whole toy-world words
    as `▁word` pieces (log-probability -1) and single characters with and without `▁`
    (-10), so known words stay whole and anything else (a trigger word) falls back to
    characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in VOCAB_WORDS]
    pieces += [(piece, -10.0) for ch in CHARS for piece in (f"▁{ch}", ch)]
    seen: set[str] = set()
    return [p for p in pieces if not (p[0] in seen or seen.add(p[0]))]


def t5_tokenizer():
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(), extra_ids=0, model_max_length=T5_TOKENS)


def build_pipeline(seed: int = 0):
    """A FluxPipeline of the built-in Flux architecture with deterministic random weights."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = toy_vae(VAE_BLOCK_OUT_CHANNELS, LATENT_CHANNELS, shift_factor=0.0, scaling_factor=1.0)
    tokenizer, text_encoder = toy_clip()
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=TEXT_HIDDEN_SIZE, d_kv=TEXT_HIDDEN_SIZE // 2, d_ff=2 * TEXT_HIDDEN_SIZE,
        num_layers=2, num_heads=2, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=T5_TOKENS, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        dropout_rate=0.0, tie_word_embeddings=False,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=DOUBLE_BLOCKS, num_single_layers=SINGLE_BLOCKS,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_HIDDEN_SIZE,
        pooled_projection_dim=TEXT_HIDDEN_SIZE, guidance_embeds=False, axes_dims_rope=AXES_DIMS_ROPE,
    )
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def save_pipeline(pipe, folder: str | Path = FLUX_DIR) -> None:
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder / "tokenizer")  # the slow CLIP files too, as the built-in SD model keeps them
