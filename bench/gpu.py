"""LoRA training on a GPU: SD1.5-size (512 px, batch 4), SDXL-size and FLUX.1-size (1024 px,
batch 1, gradient checkpointing) steps, our trainer against a loop equivalent to diffusers'
DreamBooth LoRA examples (SD1.5, SDXL), each with its it/s and peak CUDA memory, for fp32
(not FLUX.1: 67 GB of weights), bf16, bf16 with 8-bit AdamW, bf16 over an NF4 base (QLoRA)
and bf16 over an fp8 base.

    python -m bench.gpu [--steps 10] [--warmup 3] [--family sd15 sdxl flux]
    python -m bench.gpu --tiny        # the same code on the built-in models (runs on a CPU too)
    python -m bench.gpu --hyperlora   # also: seconds per step of the instant-adapter hypernetwork's
                                      # training (toyworld.train_hyperlora) on the same models

The models have random weights built from the SD1.5 / SDXL config skeletons
(assets/skeletons): speed and memory do not depend on the weights, and nothing is
downloaded. The reference loop has no NF4 or fp8 base, so those rows have no reference.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from studio import ASSETS_DIR

RANK = 16
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass(frozen=True)
class Size:
    family: str
    resolution: int
    batch_size: int
    gradient_checkpointing: bool
    reference: bool = True  # a loop of the diffusers example's beside ours (UNet families)
    fp32: bool = True  # the fp32 case fits a GPU of 80 GB
    storage: torch.dtype = torch.float16  # the random model's files, as the family ships


# FLUX.1 (12B transformer, T5-XXL) at 1024 px with checkpointing: what its users run on 24 GB
# cards is bf16 / NF4 / fp8; fp32 weights alone are 67 GB. Its rows have no reference loop.
SIZES = {"sd15": Size("sd15", 512, 4, False), "sdxl": Size("sdxl", 1024, 1, True),
         "flux": Size("flux", 1024, 1, True, reference=False, fp32=False, storage=torch.bfloat16)}
TINY = {"sd15": (Size("sd15", 64, 4, False), "builtin"),
        "flux": (Size("flux", 64, 4, False, reference=False), "builtin-flux")}


@dataclass(frozen=True)
class Case:
    name: str
    mixed_precision: str = "no"
    optimizer: str = "adamw"
    base_weights: str = "full"
    has_reference: bool = True  # the diffusers examples have no NF4 / fp8 base


CASES = (
    Case("fp32"),
    Case("bf16", mixed_precision="bf16"),
    Case("bf16 + 8-bit AdamW", mixed_precision="bf16", optimizer="adamw8bit"),
    Case("bf16 + NF4 base (QLoRA)", mixed_precision="bf16", base_weights="nf4", has_reference=False),
    Case("bf16 + fp8 base", mixed_precision="bf16", base_weights="fp8", has_reference=False),
)


def random_model(size: Size, folder: Path) -> Path:
    """A diffusers folder of the family's real architecture (assets/skeletons) with random
    weights, built and saved in `size.storage` (fp16; FLUX.1's bf16): on the GPU when there is
    one (seconds for SDXL's 3.5B parameters instead of minutes of CPU init), in that dtype
    from the start (FLUX.1's transformer in fp32 would be 48 GB)."""
    from studio.models.skeletons import skeleton_dir
    from toyworld.random_weights import skeleton_component, weighted_components

    skeleton = skeleton_dir(size.family)
    shutil.copytree(skeleton, folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    for component in weighted_components(skeleton):
        torch.set_default_dtype(size.storage)
        try:
            with torch.device(device):
                model = skeleton_component(skeleton, component)
        finally:
            torch.set_default_dtype(default)
        model.to(size.storage).save_pretrained(folder / component)
        del model
        _release()
    return folder


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def our_config(model: Path, size: Size, case: Case, steps: int):
    from studio.config import TrainConfig, network_config

    config = TrainConfig(name="gpu-bench", base_model=str(model))
    config.dataset.path = str(ASSETS_DIR / "demo-dataset")
    config.dataset.resolution = size.resolution
    config.network = network_config("lora", rank=RANK, alpha=float(RANK), target_modules=ATTENTION)
    t = config.training
    t.max_steps, t.batch_size, t.gradient_checkpointing = steps, size.batch_size, size.gradient_checkpointing
    t.mixed_precision, t.optimizer, t.base_weights = case.mixed_precision, case.optimizer, case.base_weights
    config.checkpoints.every_n_steps = 0
    return config


def time_ours(model: Path, size: Size, case: Case, steps: int, warmup: int) -> dict:
    """Our trainer's set-up (load, cache latents and captions, inject the adapter), then
    `warmup` untimed steps and `steps` timed ones."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    _release()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = AdapterTrainer(create_run(our_config(model, size, case, warmup + steps), Workspace.open(tmp)),
                          show_progress=False)
        trainer.setup()
        for step in range(warmup):
            trainer.train_step(step)
        _sync()
        started = time.perf_counter()
        for step in range(warmup, warmup + steps):
            trainer.train_step(step)
        _sync()
        it_s = steps / (time.perf_counter() - started)
        del trainer
    return {"it_s": it_s, "peak_gb": _peak_gb()}


def time_reference(model: Path, size: Size, case: Case, steps: int, warmup: int) -> dict:
    """The inner loop of diffusers' examples/dreambooth/train_dreambooth_lora.py (SD1.5) and
    train_dreambooth_lora_sdxl.py (SDXL), defaults kept: frozen models cast to the mixed
    precision (SDXL's VAE stays fp32, as the example keeps it), LoRA weights fp32, autocast;
    per step the pictures are transformed and VAE-encoded; SD1.5 tokenizes and text-encodes
    the prompt every step, SDXL encodes its one instance prompt once, as its example does."""
    import numpy as np
    from diffusers import DDPMScheduler, DiffusionPipeline
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image

    _release()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case.mixed_precision, torch.float32)
    pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True)
    sdxl = size.family == "sdxl"
    unet, vae = pipe.unet, pipe.vae
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
    unet.to(device, dtype)
    vae.to(device, torch.float32 if sdxl else dtype)
    for encoder in encoders:
        encoder.to(device, dtype)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=ATTENTION))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if size.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if case.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    images = sorted((ASSETS_DIR / "demo-dataset").glob("sks_*.png"))
    res, batch = size.resolution, size.batch_size
    prompt = "a photo of sks shape"

    def pixels(k):
        def one(i):
            image = Image.open(images[i % len(images)]).convert("RGB").resize((res, res), Image.Resampling.BILINEAR)
            return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)

        return torch.stack([one(k * batch + j) for j in range(batch)]).to(device)

    def encode_prompt():
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders):
            ids = tokenizer([prompt] * batch, padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=sdxl)
            hidden.append(out.hidden_states[-2] if sdxl else out[0])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    with torch.no_grad():
        sdxl_prompt = encode_prompt() if sdxl else None
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * batch, device=device, dtype=dtype)

    def step(k):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                latents = vae.encode(pixels(k).to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
                hidden, pooled = sdxl_prompt or encode_prompt()
            latents = latents.to(dtype)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}} if sdxl else {}
            pred = unet(noisy, timesteps, hidden, **extra).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    unet.train()
    for k in range(warmup):
        step(k)
    _sync()
    started = time.perf_counter()
    for k in range(warmup, warmup + steps):
        step(k)
    _sync()
    it_s = steps / (time.perf_counter() - started)
    del pipe, unet, vae, encoders, optimizer, params
    return {"it_s": it_s, "peak_gb": _peak_gb()}


def concept_folder(folder: Path) -> Path:
    """What `toyworld.train_hyperlora --concepts` reads: two concepts of six demo pictures each
    (captions with the trigger, a description.txt) and the demo's reg/ pictures."""
    demo = ASSETS_DIR / "demo-dataset"
    for i, name in enumerate(("first", "second")):
        sub = folder / name
        sub.mkdir(parents=True)
        for picture in sorted(demo.glob("sks_*.png"))[6 * i:6 * i + 6]:
            shutil.copy(picture, sub / picture.name)
            shutil.copy(picture.with_suffix(".txt"), sub / picture.with_suffix(".txt").name)
        (sub / "description.txt").write_text("a purple star\n")
    shutil.copytree(demo / "reg", folder / "reg")
    return folder


def time_hyperlora(model: Path, size: Size, steps: int) -> dict:
    """Seconds per step of the hypernetwork's training (2 concepts x 2 pictures a step; the
    base in bf16 on CUDA), its bank and set-up untimed, and the peak CUDA memory."""
    from toyworld.train_hyperlora import main as train_hyperlora

    _release()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--model", str(model), "--concepts", str(concept_folder(Path(tmp) / "concepts")),
                "--out", str(Path(tmp) / "hyperlora"), "--steps", str(steps), "--eval-seeds", "0",
                "--resolution", str(size.resolution), "--concepts-per-step", "2",
                "--dtype", "bf16" if torch.cuda.is_available() else "fp32"]
        report = train_hyperlora(args + (["--gradient-checkpointing"] if size.gradient_checkpointing else []))
    return {"s_per_step": report["training"]["seconds"] / steps, "peak_gb": _peak_gb()}


def runnable_cases(size: Size) -> tuple[Case, ...]:
    """Every case on CUDA (but fp32 where it does not fit); fp32 alone without CUDA (the others
    need it, studio.config says)."""
    cases = CASES if torch.cuda.is_available() else CASES[:1]
    return tuple(case for case in cases if size.fp32 or case.mixed_precision != "no")


def bench_size(model: Path, size: Size, steps: int, warmup: int) -> list[dict]:
    from studio.errors import StudioError

    rows = []
    for case in runnable_cases(size):
        label = (f"{size.family} {size.resolution} px, batch {size.batch_size}"
                 + (", checkpointing" if size.gradient_checkpointing else ""))
        try:
            ours = time_ours(model, size, case, steps, warmup)
            reference = (time_reference(model, size, case, steps, warmup) if case.has_reference and size.reference
                         else None)
        except (StudioError, ImportError) as error:  # e.g. no bitsandbytes there: the other cases still run
            print(f"| {label} | {case.name} | skipped: {error} |", flush=True)
            continue
        rows.append({"size": label, "case": case.name, "ours": ours, "reference": reference})
        print(_row(rows[-1]), flush=True)
    return rows


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _row(row: dict) -> str:
    ours, ref = row["ours"], row["reference"]
    cells = [row["size"], row["case"], f"{ours['it_s']:.2f}", _gb(ours["peak_gb"]),
             "-" if ref is None else f"{ref['it_s']:.2f}", "-" if ref is None else _gb(ref["peak_gb"]),
             "-" if ref is None else f"{ours['it_s'] / ref['it_s']:.2f}x"]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--family", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--tiny", action="store_true",
                        help="the built-in model at 64 px instead of the full-size random models")
    parser.add_argument("--hyperlora", action="store_true",
                        help="also time the instant-adapter hypernetwork's training steps")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("bench.gpu: no CUDA GPU on this machine; run it on one (or `python -m bench.gpu --tiny` here).",
              file=sys.stderr)
        raise SystemExit(2)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"bench.gpu on {device}, torch {torch.__version__}, {args.steps} timed steps after {args.warmup}")
    print("| size | case | ours it/s | ours peak GB | reference it/s | reference peak GB | ratio |")
    print("|---|---|---|---|---|---|---|")
    if args.tiny:
        rows, hyper_rows = [], []
        for family in [f for f in args.family if f in TINY]:
            size, name = TINY[family]
            rows += bench_size(ASSETS_DIR / name, size, args.steps, args.warmup)
            if args.hyperlora:
                hyper_rows.append({"size": f"{name} 64 px", **time_hyperlora(ASSETS_DIR / name, size, args.steps)})
        if hyper_rows:
            print_hyperlora(hyper_rows)
        return rows
    rows, hyper_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.family:
            model = random_model(SIZES[family], Path(tmp) / family)
            rows += bench_size(model, SIZES[family], args.steps, args.warmup)
            if args.hyperlora:
                hyper_rows.append({"size": f"{family} {SIZES[family].resolution} px",
                                   **time_hyperlora(model, SIZES[family], args.steps)})
            shutil.rmtree(model)
    if hyper_rows:
        print_hyperlora(hyper_rows)
    return rows


def print_hyperlora(rows: list[dict]) -> None:
    print("\n| size | hypernetwork training s/step (2 concepts x 2 pictures) | peak GB |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['size']} | {row['s_per_step']:.2f} | {_gb(row['peak_gb'])} |")


if __name__ == "__main__":
    main()
