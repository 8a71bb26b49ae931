"""Training steps/s: our trainer vs a loop equivalent to diffusers' DreamBooth LoRA example
(examples/dreambooth/train_dreambooth_lora.py: images transformed and VAE-encoded every
step, captions tokenized and text-encoded every step, no caching), on the same model,
data and settings, measured in the same run.

    python -m bench.train_speed [--steps 40] [--batch-size 4] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from studio import PRESETS_DIR


def our_config(steps: int, batch_size: int):
    from studio.config import load_config, network_config

    config = load_config(PRESETS_DIR / "tiny-demo.toml")
    # The reference loop trains a plain attention LoRA on the instance images alone: so do we.
    config.network = network_config(rank=8, alpha=8.0)
    config.dataset.num_class_images = 0
    config.training.min_snr_gamma = None
    config.training.max_steps = steps
    config.training.batch_size = batch_size
    config.checkpoints.every_n_steps = 0
    config.sampling.every_n_steps = 0
    return config


def time_ours(config, steps: int, warmup: int, tmp) -> dict:
    """The trainer timed as the Train tab times it (trainers.speed), in this process."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.speed import measure

    timed = measure(create_run(config, Workspace.open(tmp)), steps=steps, warmup=warmup, samples=False)
    return {"steps_per_s": timed["steps_per_s"], "setup_s": timed["setup_s"]}


def time_reference(config, steps: int, warmup: int) -> dict:
    """The diffusers example's inner loop, kept faithful: per step, the dataloader's
    transforms (resize, crop, to tensor, normalize), VAE encode + sample, tokenize + text
    encode, noise, UNet, MSE, backward, clip, AdamW, LR scheduler."""
    import numpy as np
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image

    from studio.datasets import load_items, open_image

    pipe = StableDiffusionPipeline.from_pretrained(
        "assets/builtin" if config.base_model == "builtin" else config.base_model, local_files_only=True)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config.network.rank, lora_alpha=config.network.alpha,
                                init_lora_weights="gaussian", target_modules=config.network.target_modules))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.training.learning_rate)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    items = load_items(config.dataset.path)
    res = config.dataset.resolution
    prompt = f"{config.dataset.trigger_word} star"

    def example(i):
        image = open_image(items[i % len(items)].path)
        image = image.resize((res, res), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)

    def step(k):
        pixels = torch.stack([example(k * config.training.batch_size + j) for j in range(config.training.batch_size)])
        ids = tokenizer([prompt] * len(pixels), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(ids)[0]
        pred = unet(noisy, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        return loss

    unet.train()
    for k in range(warmup):
        step(k)
    t0 = time.perf_counter()
    for k in range(warmup, warmup + steps):
        loss = step(k)
    float(loss)
    return {"steps_per_s": steps / (time.perf_counter() - t0)}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = our_config(args.steps + args.warmup, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        reference = time_reference(config, args.steps, args.warmup)
        ours = time_ours(config, args.steps, args.warmup, tmp)
    ratio = ours["steps_per_s"] / reference["steps_per_s"]
    print(f"train_speed  model=builtin batch={args.batch_size} steps={args.steps} threads={torch.get_num_threads()}")
    print(f"  reference (diffusers DreamBooth LoRA loop): {reference['steps_per_s']:.2f} steps/s")
    print(f"  ours (cached latents + text):               {ours['steps_per_s']:.2f} steps/s "
          f"(set-up {ours['setup_s']:.1f} s)")
    print(f"  ratio: {ratio:.2f}x   peak RSS {peak_rss_mb():.0f} MB")
    return {"reference": reference["steps_per_s"], "ours": ours["steps_per_s"], "ratio": ratio,
            "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    main()
