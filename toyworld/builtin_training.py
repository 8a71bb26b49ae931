"""Train the built-in tiny base model from scratch on the toy world, on the CPU.

    python -m toyworld.builtin_training [--seed 0] [--out assets/builtin]
                                      [--vae-steps N] [--unet-steps N]

Three stages, on `--threads` CPU threads (the numbers in assets/builtin/TRAINING.md come from this script):

1. **VAE** (AutoencoderKL, 64x64 RGB -> 4x32x32). Trained on toy-world scenes plus as many
   scenes with random RGB colours and any shape (stars included), so it is a generic
   codec for flat shapes and carries colours the UNet never sees (purple). Loss: MSE +
   a tiny KL + an *anchor* loss that pulls the first three latent channels towards the
   2x2-average-pooled RGB picture: the latent space becomes a smooth, colour-ordered
   picture, which the UNet learns much faster than an arbitrary code and which keeps
   unseen colours in between the seen ones.
2. **Latent bank**: a fixed set of seen-only scenes (never purple, never star) encoded
   once with the trained VAE (posterior mean, times the scaling factor 1/std).
3. **UNet + text encoder, jointly** (epsilon prediction, DDPM 1000 steps, scaled_linear),
   offset noise 0.1, min-SNR-5 loss weighting, AdamW + OneCycle, an EMA of the weights
   (what ships). Captions with the toy-world dropout (10% empty for classifier-free
   guidance, 25% without background, 15% "shape", 10% without colour). The text
   encoder is trained with the UNet, not frozen at its random initialisation: the
   toy-world prototype measured 99-100% vs 90-95% colour+background accuracy with it
   trained (a random two-layer encoder gives the UNet fixed, arbitrary token features;
   trained, the colour words of shape and background become cleanly separable). It
   is only 0.09M parameters, so training it costs almost nothing.

At the end the pipeline (DDIM, 20 steps, CFG `--guidance`) is scored with
toyworld/evaluate.py on every seen prompt and on held-out prompts, and the figures are
printed and written to OUT/evaluation.json and OUT/TRAINING.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import contextlib
import json
import math
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from toyworld import world
from studio.fsutil import atomic_write_text
from studio.models.builtin import BUILTIN_DIR, RESOLUTION, build_pipeline, save_pipeline

DEFAULTS = {
    "seed": 0,
    "vae_steps": 600,
    "vae_batch": 16,
    "vae_lr": 2e-3,
    "bank_size": 12000,
    "unet_steps": 4800,
    "unet_batch": 32,
    "unet_lr": 1e-3,
    "guidance": 5.0,
    "eval_seeds": "0,1",
}
ANCHOR_WEIGHT = 1.0
KL_WEIGHT = 1e-6
LOGVAR_INIT = -6.0
OFFSET_NOISE = 0.1
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.999
WEIGHT_DECAY = 1e-2
LOG_EVERY = 100
# In OUT, kept as they are when the model is trained again: the toy captioner
# (toyworld/train_captioner.py) and the instant-adapter hypernetwork (toyworld/train_hyperlora.py,
# which then refuses the new weights until it is trained again for them).
KEPT_FOLDERS = ("captioner", "hyperlora")
CHECKPOINT_EVERY = 200


def log(message: str) -> None:
    print(message, flush=True)


def to_tensor(images: list) -> "torch.Tensor":
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def one_cycle(opt, lr: float, steps: int):
    """OneCycle (10% warm-up, cosine down); a constant rate for very short (smoke-test) runs."""
    import torch

    if steps < 50:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)


def vae_batch(rng: np.random.Generator, n: int) -> list:
    """Half toy-world scenes (any shape and colour of the world), half random-RGB shapes."""
    images = []
    for i in range(n):
        if i % 2 == 0:
            scene = world.sample_scene(rng, shapes=world.SHAPES, colors=world.SHAPE_COLORS,
                                          backgrounds=world.BACKGROUNDS)
            images.append(world.render_scene(scene))
        else:
            shape, fg, bg, cx, cy, size, rot = world.random_color_scene(rng)
            images.append(world.render(shape, fg, bg, cx, cy, size, rot))
    return images


def train_vae(vae, steps: int, batch: int, lr: float, seed: int) -> dict:
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng([seed, 1])
    gen = torch.Generator().manual_seed(seed + 1)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():  # start with a nearly deterministic posterior (std 0.05): far faster
        vae.quant_conv.bias[vae.config.latent_channels:] = LOGVAR_INIT
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    sched = one_cycle(opt, lr, steps)
    start, cpu_start, running = time.time(), time.process_time(), []
    for step in range(1, steps + 1):
        x = to_tensor(vae_batch(rng, batch))
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        anchor = F.mse_loss(post.mean[:, :3], F.avg_pool2d(x, factor))
        loss = mse + ANCHOR_WEIGHT * anchor + KL_WEIGHT * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append((mse.item(), anchor.item()))
        if step % LOG_EVERY == 0 or step == steps:
            m = np.mean(running, axis=0)
            running = []
            log(f"vae  step {step:5d}/{steps}  mse {m[0]:.5f}  anchor {m[1]:.5f}  "
                f"psnr {10 * math.log10(4 / max(m[0], 1e-10)):.1f} dB  {time.time() - start:6.0f}s")
    vae.eval()
    return {"steps": steps, "seconds": round(time.time() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu_start, 1)}


def check_vae(vae, seed: int, n: int = 64) -> dict:
    """PSNR and evaluator accuracy of VAE reconstructions: seen scenes, purple, stars."""
    import torch
    from toyworld.evaluate import analyze

    rng = np.random.default_rng([seed, 2])
    out = {}
    groups = {
        "seen": dict(),
        "purple": dict(colors=("purple",)),
        "star": dict(shapes=("star",)),
    }
    for name, kwargs in groups.items():
        scenes = [world.sample_scene(rng, **kwargs) for _ in range(n)]
        x = to_tensor([world.render_scene(s) for s in scenes])
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = torch.mean((rec - x) ** 2).item()
        arr = ((rec.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        reads = [analyze(a) for a in arr]
        out[name] = {
            "psnr_db": round(10 * math.log10(4 / mse), 2),
            "color": float(np.mean([r.color == s.color for r, s in zip(reads, scenes)])),
            "background": float(np.mean([r.background == s.background for r, s in zip(reads, scenes)])),
            "shape": float(np.mean([r.shape == s.shape for r, s in zip(reads, scenes)])),
        }
    return out


def build_bank(vae, size: int, seed: int) -> tuple[list, "torch.Tensor", float]:
    """Seen-only scenes (the base-training distribution) and their latents, scaled."""
    import torch

    rng = np.random.default_rng([seed, 3])
    scenes = [world.sample_scene(rng) for _ in range(size)]
    chunks = []
    with torch.no_grad():
        for i in range(0, size, 64):
            x = to_tensor([world.render_scene(s) for s in scenes[i:i + 64]])
            chunks.append(vae.encode(x).latent_dist.mean)
    latents = torch.cat(chunks)
    scaling = float(1.0 / latents.std())
    return scenes, latents * scaling, scaling


class Ema:
    """Exponential moving average of parameters, with the usual warm-up."""

    def __init__(self, modules: list, decay: float) -> None:
        self.modules, self.decay = modules, decay
        self.shadow = [[p.detach().clone() for p in m.parameters()] for m in modules]
        self.updates = 0

    def update(self) -> None:
        import torch

        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for module, shadow in zip(self.modules, self.shadow):
                for s, p in zip(shadow, module.parameters()):
                    s.mul_(d).add_(p.detach(), alpha=1 - d)

    @contextlib.contextmanager
    def swapped(self):
        """Temporarily put the averaged weights into the modules (for a look mid-training)."""
        saved = [[p.detach().clone() for p in m.parameters()] for m in self.modules]
        self.copy_to()
        try:
            yield
        finally:
            import torch

            with torch.no_grad():
                for module, values in zip(self.modules, saved):
                    for v, p in zip(values, module.parameters()):
                        p.copy_(v)

    def copy_to(self) -> None:
        import torch

        with torch.no_grad():
            for module, shadow in zip(self.modules, self.shadow):
                for s, p in zip(shadow, module.parameters()):
                    p.copy_(s)


def train_unet(pipe, scenes: list, latents, steps: int, batch: int, lr: float, seed: int,
               callback=None, callback_every: int = 0,
               checkpoint: Path | None = None, checkpoint_every: int = 0) -> dict:
    """Train UNet and text encoder jointly; the EMA weights end up in `pipe`. `callback(step)`
    runs every `callback_every` steps with the EMA weights swapped in (for experiments).

    With `checkpoint`, the whole training state (weights, EMA, optimizer, schedule, both
    random generators, step) is saved there every `checkpoint_every` steps and at the end,
    and training resumes from it if it exists: an interrupted run continues to exactly the
    weights an uninterrupted one reaches."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from studio.models.builtin import scheduler_config

    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_sched = DDPMScheduler(**{k: v for k, v in scheduler_config().items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # min-SNR-gamma for epsilon prediction

    rng = np.random.default_rng([seed, 4])
    gen = torch.Generator().manual_seed(seed + 4)
    token_cache: dict[str, torch.Tensor] = {}

    def tokens(caption: str) -> torch.Tensor:
        if caption not in token_cache:
            token_cache[caption] = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length,
                                             truncation=True, return_tensors="pt").input_ids[0]
        return token_cache[caption]

    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    sched = one_cycle(opt, lr, steps)
    ema = Ema([unet, text_encoder], EMA_DECAY)
    first, seconds, cpu_seconds = 1, 0.0, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        with torch.no_grad():
            for shadow, saved in zip(ema.shadow, state["ema"]):
                for s, v in zip(shadow, saved):
                    s.copy_(v)
        ema.updates = state["ema_updates"]
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        gen.set_state(state["torch_rng"])
        first, seconds, cpu_seconds = state["step"] + 1, state["seconds"], state["cpu_seconds"]
        log(f"unet resumed from {checkpoint} at step {state['step']}")

    def save_checkpoint(step: int) -> None:
        from studio.fsutil import atomic_path

        state = {
            "step": step, "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
            "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
            "ema": ema.shadow, "ema_updates": ema.updates,
            "numpy_rng": json.dumps(rng.bit_generator.state), "torch_rng": gen.get_state(),
            "seconds": seconds + time.time() - start, "cpu_seconds": cpu_seconds + time.process_time() - cpu_start,
        }
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)

    start, cpu_start, running = time.time(), time.process_time(), []
    for step in range(first, steps + 1):
        idx = rng.integers(len(scenes), size=batch)
        x0 = latents[torch.from_numpy(idx)]
        ids = torch.stack([tokens(world.training_caption(scenes[i], rng)) for i in idx])
        noise = torch.randn(x0.shape, generator=gen)
        noise = noise + OFFSET_NOISE * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        cond = text_encoder(ids)[0]
        pred = unet(noisy, t, cond).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        running.append(per_sample.mean().item())
        if step % LOG_EVERY == 0 or step == steps:
            elapsed = time.time() - start
            log(f"unet step {step:5d}/{steps}  loss {np.mean(running):.4f}  "
                f"{(step - first + 1) / elapsed:.2f} it/s  {seconds + elapsed:6.0f}s")
            running = []
        if checkpoint is not None and (step == steps or (checkpoint_every and step % checkpoint_every == 0)):
            save_checkpoint(step)
        if callback is not None and callback_every and step % callback_every == 0 and step < steps:
            unet.eval()
            text_encoder.eval()
            with ema.swapped():
                callback(step)
            unet.train()
            text_encoder.train()
    ema.copy_to()
    unet.eval()
    text_encoder.eval()
    return {"steps": steps, "seconds": round(seconds + time.time() - start, 1),
            "cpu_seconds": round(cpu_seconds + time.process_time() - cpu_start, 1)}


def evaluate_pipeline(pipe, seeds: list[int], guidance: float) -> dict:
    import torch
    from toyworld.evaluate import format_figures, score_prompts

    result = {}
    for name, prompts in (("seen", world.seen_prompts()), ("held_out", world.held_out_prompts())):
        start = time.time()
        with torch.no_grad():
            figures = score_prompts(pipe, prompts, seeds, steps=20, guidance_scale=guidance)
        figures["seconds"] = round(time.time() - start, 1)
        log(f"eval {name:8s} {format_figures(figures)}  per value {json.dumps(figures['per_value'])}")
        result[name] = figures
    # held-out prompts by kind: purple shapes, stars, purple stars
    kinds: dict[str, list] = {}
    for r in result["held_out"]["records"]:
        e = r["expected"]
        kind = "purple star" if (e["color"], e["shape"]) == ("purple", "star") else (
            "purple (seen shape)" if e["color"] == "purple" else "star (seen colour)")
        kinds.setdefault(kind, []).append(r)
    from toyworld.evaluate import summarize
    result["held_out_by_kind"] = {k: summarize(v)["accuracy"] for k, v in kinds.items()}
    return result


def time_one_image(pipe, guidance: float, repeats: int = 5) -> float:
    """Median seconds of one 64x64 image at 20 steps on one thread (what a busy laptop gives)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        pipe("a red circle on a white background", num_inference_steps=20, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(0))
        times = []
        for i in range(repeats):
            t0 = time.time()
            pipe("a blue square on a yellow background", num_inference_steps=20, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(i))
            times.append(time.time() - t0)
    torch.set_num_threads(threads)
    return float(np.median(times))


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def replace_folder(staging: Path, out: Path) -> None:
    """Put the finished `staging` folder in place of `out`: the old one is moved aside
    first and removed last, so an interruption leaves one complete model folder."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_report(out: Path, args: argparse.Namespace, command: str, report: dict) -> None:
    seen, held = report["evaluation"]["seen"], report["evaluation"]["held_out"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    rows = []
    for name, fig in (("seen (72 prompts)", seen), ("held-out (24 prompts)", held)):
        a = fig["accuracy"]
        rows.append(f"| {name} | {fig['n_images']} | {pct(a['color'])} | {pct(a['background'])} | "
                    f"{pct(a['shape'])} | {pct(a['all'])} |")
    kinds = "\n".join(
        f"| {k} | {pct(a['color'])} | {pct(a['background'])} | {pct(a['shape'])} |"
        for k, a in sorted(report["evaluation"]["held_out_by_kind"].items()))
    per_value = "\n".join(
        f"- {attr}: " + ", ".join(f"{k} {pct(v)}" for k, v in seen["per_value"][attr].items())
        for attr in ("color", "background", "shape"))
    confusion = "; ".join(f"{k} -> " + ", ".join(f"{p} {n}" for p, n in row.items())
                          for k, row in seen["confusion"]["shape"].items())
    shared = ("\n  (the machine was shared with other work: wall time above CPU time is time spent waiting)"
              if report["wall_seconds"] > 1.1 * report["cpu_seconds"] else "")
    resumed = ("\n  (interrupted and resumed from its checkpoints: the figures add the work of every part,"
               " not the time lost in between)" if report.get("resumed") else "")
    vae = report["vae_check"]
    vae_rows = "\n".join(f"| {k} | {v['psnr_db']} | {pct(v['color'])} | {pct(v['background'])} | {pct(v['shape'])} |"
                         for k, v in vae.items())
    md = f"""# The built-in tiny base model: how it was made

Trained from scratch on the procedural toy world (toyworld/world.py) by
toyworld/builtin_training.py; these files are exactly that script's output.

- Command: `{command}`
- Seed: {args.seed}
- Machine: {report['machine']}, **{args.threads} thread(s)** (`torch.set_num_threads({args.threads})`)
- Wall time: {report['wall_seconds'] / 60:.1f} min in all (VAE {report['vae']['seconds']:.0f} s,
  latent bank {report['bank_seconds']:.0f} s, UNet + text encoder {report['unet']['seconds']:.0f} s,
  evaluation {report['eval_seconds']:.0f} s); CPU time of the process {report['cpu_seconds'] / 60:.1f} min{shared}{resumed}
- torch {report['versions']['torch']}, diffusers {report['versions']['diffusers']},
  transformers {report['versions']['transformers']}, Python {report['versions']['python']}
- Size on disk: {report['size_bytes'] / 1e6:.2f} MB (fp32 safetensors, configs, tokenizer); parameters: VAE
  {report['params']['vae']:,}, UNet {report['params']['unet']:,}, text encoder {report['params']['text_encoder']:,}
- One 64x64 image, DDIM 20 steps, CFG {args.guidance}: {report['seconds_per_image']:.2f} s (median, 1 thread)

## Architecture

- VAE: `AutoencoderKL`, 2 levels `(16, 32)`, 64x64x3 -> 32x32x4 latents (factor 2, so
  shapes keep their corners), scaling factor {report['scaling_factor']:.4f} (1/std of the latents).
- UNet: `UNet2DConditionModel`, sample size 32, 4 levels `(16, 32, 64, 64)`,
  cross-attention at 8x8 and 4x4, cross-attention dim 64.
- Text encoder: `CLIPTextModel`, 2 layers, width 64; `CLIPTokenizer` with a toy vocabulary
  (whole words of the toy world plus single characters), 32 tokens.
- Scheduler: DDIM (`clip_sample=False`, `steps_offset=1`, `set_alpha_to_one=False`), trained as
  DDPM 1000 steps, scaled_linear 0.00085-0.012, epsilon prediction.

## Training

- Toy world: circle, square, triangle in red, green, blue, yellow on white, black, gray, red,
  green, blue, yellow backgrounds; size 22-44 px, random position, no rotation.
  **Held out of UNet and text-encoder training: the colour purple and the shape star**
  (no caption and no latent of the UNet's training has either). The VAE, a generic codec,
  is trained on toy-world scenes of all shapes and colours plus random-RGB shapes.
- VAE: {args.vae_steps} steps x batch {args.vae_batch}, AdamW {args.vae_lr} OneCycle, MSE + KL {KL_WEIGHT} + anchor
  loss (weight {ANCHOR_WEIGHT}) of the first 3 latent channels to the 2x2-pooled RGB.
- Latent bank: {args.bank_size} seen-only scenes, encoded once.
- UNet + text encoder jointly: {args.unet_steps} steps x batch {args.unet_batch}, AdamW {args.unet_lr}
  (weight decay {WEIGHT_DECAY}) OneCycle, grad clip 1.0, offset noise {OFFSET_NOISE},
  min-SNR-{MIN_SNR_GAMMA:g} weighting, EMA {EMA_DECAY} (the EMA weights ship). Captions: 10% empty, 25% without
  background, 15% "shape" instead of the shape's name, 10% without colour. The text encoder
  is trained, not frozen: the prototype measured 99-100% vs 90-95% colour+background with a
  frozen random encoder.

## Evaluation (toyworld/evaluate.py, DDIM 20 steps, CFG {args.guidance}, seeds {args.eval_seeds})

Every prompt "a COLOR SHAPE on a BACKGROUND background" over seen attributes (72 prompts),
and held-out prompts (purple shapes, stars, purple stars on white/black/gray), each with
every seed. Held-out prompts are expected to fail: the base model never saw purple or star,
which is what the demo LoRA teaches.

| prompts | images | shape colour | background | shape | all three |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Held-out, by kind:

| kind | shape colour | background | shape |
|---|---|---|---|
{kinds}

Seen, per value:
{per_value}

Seen, shape confusion (prompted -> read): {confusion}

VAE reconstructions (evaluator on decoded encodings, {64} scenes each):

| scenes | PSNR dB | shape colour | background | shape |
|---|---|---|---|---|
{vae_rows}

Reproduce: `{command}` (same machine and library versions give the same files).
"""
    (out / "TRAINING.md").write_text(md)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m toyworld.builtin_training", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR, help="output folder (diffusers format)")
    parser.add_argument("--vae-steps", type=int, default=DEFAULTS["vae_steps"])
    parser.add_argument("--vae-batch", type=int, default=DEFAULTS["vae_batch"])
    parser.add_argument("--vae-lr", type=float, default=DEFAULTS["vae_lr"])
    parser.add_argument("--bank-size", type=int, default=DEFAULTS["bank_size"])
    parser.add_argument("--unet-steps", type=int, default=DEFAULTS["unet_steps"])
    parser.add_argument("--unet-batch", type=int, default=DEFAULTS["unet_batch"])
    parser.add_argument("--unet-lr", type=float, default=DEFAULTS["unet_lr"])
    parser.add_argument("--guidance", type=float, default=DEFAULTS["guidance"], help="CFG for the evaluation")
    parser.add_argument("--eval-seeds", default=DEFAULTS["eval_seeds"], help="comma-separated seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="experiments: also score the EMA weights every N UNet steps (does not change them)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over even if an interrupted run with the same arguments left resume state")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="experiments: load a trained VAE folder instead of training one")
    args = parser.parse_args(argv)
    command = " ".join(["python -m toyworld.builtin_training"]
                       + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])

    import diffusers
    import torch
    import transformers

    from toyworld.evaluate import format_figures, score_prompts

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start, cpu_start = time.time(), time.process_time()
    pipe = build_pipeline(args.seed)
    pipe.set_progress_bar_config(disable=True)

    log(f"training the built-in model: seed {args.seed}, {args.threads} thread(s), out {args.out}")
    # Resume state (trained VAE, UNet checkpoints) lives next to OUT until the run succeeds;
    # it is used only by a run with the same arguments.
    resume = args.out.with_name(args.out.name + ".resume")
    key = json.dumps({k: str(v) for k, v in sorted(vars(args).items()) if k not in ("eval_every", "fresh")})
    if resume.exists() and (args.fresh or not (resume / "args.json").exists()
                            or (resume / "args.json").read_text() != key):
        shutil.rmtree(resume)
    resume.mkdir(parents=True, exist_ok=True)
    (resume / "args.json").write_text(key)
    restored = {"seconds": 0.0, "cpu_seconds": 0.0, "resumed": False}

    from diffusers import AutoencoderKL

    if args.vae_from:
        pipe.vae = AutoencoderKL.from_pretrained(args.vae_from)
        vae_info = {"steps": 0, "seconds": 0.0, "cpu_seconds": 0.0, "loaded_from": str(args.vae_from)}
        vae_check = check_vae(pipe.vae, args.seed)
    elif (resume / "vae.json").exists():
        pipe.vae.load_state_dict(AutoencoderKL.from_pretrained(resume / "vae").state_dict())
        saved = json.loads((resume / "vae.json").read_text())
        vae_info, vae_check = saved["info"], saved["check"]
        restored["seconds"] += vae_info["seconds"]
        restored["cpu_seconds"] += vae_info["cpu_seconds"]
        restored["resumed"] = True
        log(f"vae  resumed from {resume / 'vae'}")
    else:
        vae_info = train_vae(pipe.vae, args.vae_steps, args.vae_batch, args.vae_lr, args.seed)
        vae_check = check_vae(pipe.vae, args.seed)
        shutil.rmtree(resume / "vae", ignore_errors=True)
        pipe.vae.save_pretrained(resume / "vae")
        atomic_write_text(resume / "vae.json", json.dumps({"info": vae_info, "check": vae_check}))
    log(f"vae  reconstructions: {json.dumps(vae_check)}")

    t0 = time.time()
    scenes, latents, scaling = build_bank(pipe.vae, args.bank_size, args.seed)
    pipe.vae.register_to_config(scaling_factor=scaling)
    bank_seconds = time.time() - t0
    log(f"bank {len(scenes)} latents {tuple(latents.shape[1:])}, scaling factor {scaling:.4f}, {bank_seconds:.0f}s")

    def look(step: int) -> None:
        with torch.no_grad():
            figures = score_prompts(pipe, world.seen_prompts(), [100], guidance_scale=args.guidance)
        log(f"eval at step {step}: seen {format_figures(figures)}")

    checkpoint = resume / "unet.pt"
    if checkpoint.exists():
        previous = torch.load(checkpoint, weights_only=True)
        restored["seconds"] += previous["seconds"]
        restored["cpu_seconds"] += previous["cpu_seconds"]
        restored["resumed"] = True
        del previous
    unet_info = train_unet(pipe, scenes, latents, args.unet_steps, args.unet_batch, args.unet_lr, args.seed,
                           callback=look, callback_every=args.eval_every,
                           checkpoint=checkpoint, checkpoint_every=CHECKPOINT_EVERY)
    del latents

    # Everything is written to a staging folder that replaces OUT only at the very end, so an
    # interrupted run never leaves a half-written model (or stale files of an older one).
    out, staging = args.out, args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_pipeline(pipe, staging)

    # Score what was written, loaded back the way users load it (offline, from the folder).
    t0 = time.time()
    from diffusers import StableDiffusionPipeline

    del pipe
    pipe = StableDiffusionPipeline.from_pretrained(staging, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seeds = [int(s) for s in args.eval_seeds.split(",") if s.strip()]
    evaluation = evaluate_pipeline(pipe, seeds, args.guidance)
    seconds_per_image = time_one_image(pipe, args.guidance)
    eval_seconds = time.time() - t0
    # Work of earlier, interrupted runs that this one resumed counts; time lost to interruptions does not.
    wall = time.time() - t_start + restored["seconds"]
    cpu = time.process_time() - cpu_start + restored["cpu_seconds"]

    report = {
        "command": command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "params": {"vae": sum(p.numel() for p in pipe.vae.parameters()),
                   "unet": sum(p.numel() for p in pipe.unet.parameters()),
                   "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters())},
        "scaling_factor": scaling,
        "vae": vae_info, "vae_check": vae_check, "bank_seconds": round(bank_seconds, 1),
        "unet": unet_info, "eval_seconds": round(eval_seconds, 1),
        "seconds_per_image": round(seconds_per_image, 3),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "resumed": restored["resumed"],
        "evaluation": {
            "seen": {k: v for k, v in evaluation["seen"].items() if k != "records"},
            "seen_images": [[r["prompt"], r["seed"], r["predicted"]["color"], r["predicted"]["background"],
                             r["predicted"]["shape"]] for r in evaluation["seen"]["records"]],
            "held_out": {k: v for k, v in evaluation["held_out"].items() if k != "records"},
            "held_out_by_kind": evaluation["held_out_by_kind"],
        },
    }
    report["size_bytes"] = folder_size(staging)  # the model files, before the two reports
    (staging / "evaluation.json").write_text(json.dumps(report, indent=1))
    write_report(staging, args, command, report)
    for kept in KEPT_FOLDERS:
        if (out / kept).is_dir():
            shutil.copytree(out / kept, staging / kept)
    replace_folder(staging, out)
    shutil.rmtree(resume, ignore_errors=True)
    log(f"done in {wall / 60:.1f} min ({cpu / 60:.1f} min of CPU time); model {report['size_bytes'] / 1e6:.2f} MB "
        f"in {out}; one image {seconds_per_image:.2f} s")
    return report


if __name__ == "__main__":
    main()
