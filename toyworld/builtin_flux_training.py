"""Train the built-in tiny FLUX.1-architecture model (assets/builtin-flux) from scratch on the
toy world, on the CPU.

    python -m toyworld.builtin_flux_training [--seed 0] [--out assets/builtin-flux]
                                           [--vae-steps N] [--steps N]

The stages and the held-out attributes are the built-in SD model's (toyworld/builtin_training.py,
whose pieces this reuses: the VAE's training and check, the latent bank of seen-only scenes,
the EMA, the caption dropout and the evaluation), with what FLUX.1 does differently:

1. **VAE** with 16 latent channels at factor 4 (64x64x3 -> 16x16x16), trained as the SD
   one is (MSE + tiny KL + the anchor loss of the first three channels to the pooled RGB).
   Its own: the SD model's VAE has 4 channels. Latents are shifted and scaled as FLUX.1's
   are, (z - shift) x scale, shift = their mean and scale = 1/std over the bank.
2. **Latent bank**: seen-only scenes (never purple, never star), encoded once.
3. **Transformer + both text encoders, jointly**, with the FLUX.1 family's own pieces
   (studio.models.families: encode_text, predict and the flow-matching objective, so
   the training here is the LoRA trainer's objective): x_σ = (1 - σ) x_0 + σ ε, target
   ε - x_0, σ logit-normal shifted as the scheduler generates. AdamW + OneCycle, an EMA
   of the weights (what ships). Captions with the toy-world dropout (10% empty: the
   unconditional prediction that true classifier-free guidance needs, as this model has
   no guidance embedding).

At the end the pipeline (FlowMatchEuler, 20 steps, true CFG `--guidance`) is scored with
toyworld/evaluate.py on every seen prompt and on held-out prompts, and the figures are
written to OUT/evaluation.json and OUT/TRAINING.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from studio.fsutil import atomic_write_text
from toyworld import world
from toyworld.builtin_flux import FLUX_DIR, build_pipeline, save_pipeline
from toyworld.builtin_training import (EMA_DECAY, LOG_EVERY, WEIGHT_DECAY, Ema, build_bank, check_vae, cpu_name,
                                       folder_size, log, one_cycle, train_vae)

DEFAULTS = {"seed": 0, "vae_steps": 800, "vae_batch": 16, "vae_lr": 2e-3, "bank_size": 12000, "steps": 1600,
            "batch": 32, "lr": 1e-3, "guidance": 5.0, "eval_seeds": "0,1"}
CHECKPOINT_EVERY = 200


class FullRange:
    """Training settings the objective reads: every timestep."""

    min_timestep, max_timestep = 0, 1000


def train_transformer(pipe, scenes: list, latents, steps: int, batch: int, lr: float, seed: int,
                      checkpoint: Path | None = None) -> dict:
    """Train the transformer and both text encoders jointly with the FLUX.1 family's
    conditioning, call and objective; the EMA weights end up in `pipe`. With `checkpoint`
    the whole state is saved every CHECKPOINT_EVERY steps and a run resumes from it."""
    import torch
    import torch.nn.functional as F

    from studio.models.families import get_family

    family = get_family("flux")
    objective = family.objective(pipe)
    models = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    rng = np.random.default_rng([seed, 4])
    gen = torch.Generator().manual_seed(seed + 4)
    for model in models:
        model.train()
    params = [p for model in models for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    sched = one_cycle(opt, lr, steps)
    ema = Ema(models, EMA_DECAY)
    first, seconds = 1, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        for model, saved in zip(models, state["models"]):
            model.load_state_dict(saved)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        with torch.no_grad():
            for shadow, saved in zip(ema.shadow, state["ema"]):
                for s, v in zip(shadow, saved):
                    s.copy_(v)
        ema.updates = state["ema_updates"]
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        gen.set_state(state["torch_rng"])
        first, seconds = state["step"] + 1, state["seconds"]
        log(f"transformer resumed from {checkpoint} at step {state['step']}")
    start, running = time.time(), []
    for step in range(first, steps + 1):
        idx = rng.integers(len(scenes), size=batch)
        x0 = latents[torch.from_numpy(idx)]
        captions = [world.training_caption(scenes[i], rng) for i in idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = objective.sample_timesteps(batch, gen, FullRange)
        conditioning = family.encode_text(tokenizers, encoders, captions, "cpu")
        pred = family.predict(pipe.transformer, objective.noisy(x0, noise, t), t, conditioning)
        loss = F.mse_loss(pred, objective.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        running.append(loss.item())
        if step % LOG_EVERY == 0 or step == steps:
            elapsed = time.time() - start
            log(f"transformer step {step:5d}/{steps}  loss {np.mean(running):.4f}  "
                f"{(step - first + 1) / elapsed:.2f} it/s  {seconds + elapsed:6.0f}s")
            running = []
        if checkpoint is not None and (step == steps or step % CHECKPOINT_EVERY == 0):
            from studio.fsutil import atomic_path

            state = {"step": step, "models": [m.state_dict() for m in models], "optimizer": opt.state_dict(),
                     "schedule": sched.state_dict(), "ema": ema.shadow, "ema_updates": ema.updates,
                     "numpy_rng": json.dumps(rng.bit_generator.state), "torch_rng": gen.get_state(),
                     "seconds": seconds + time.time() - start}
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
    ema.copy_to()
    for model in models:
        model.eval()
    return {"steps": steps, "seconds": round(seconds + time.time() - start, 1)}


def narrow_posterior(vae) -> None:
    """Make the VAE's posterior a point (log-variance -20 everywhere): the transformer learns
    posterior means (the latent bank), while the LoRA trainer, as kohya's does, samples
    mean + std x eps, and this VAE's std (0.37, against 0.69 for the means' spread: the KL
    weight is tiny) would bury the pictures in noise (a demo LoRA's loss started at 2.5
    instead of 0.07). Decoding is untouched."""
    import torch

    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = -20.0


def generate_fn(pipe, guidance: float, steps: int = 20, batch_size: int = 16):
    """(prompts, seeds) -> images: FluxPipeline with true classifier-free guidance (the
    empty prompt as the negative) at the tokenizer's T5 length."""
    import torch

    def generate(prompts, seeds):
        images = []
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
            with torch.no_grad():
                out = pipe(chunk, negative_prompt=[""] * len(chunk), true_cfg_scale=guidance, generator=gens,
                           num_inference_steps=steps, height=64, width=64,
                           max_sequence_length=pipe.tokenizer_2.model_max_length)
            images += out.images
        return images

    return generate


def evaluate(pipe, seeds: list[int], guidance: float) -> dict:
    from toyworld.evaluate import format_figures, score_prompts, summarize

    generate = generate_fn(pipe, guidance)
    result = {}
    for name, prompts in (("seen", world.seen_prompts()), ("held_out", world.held_out_prompts())):
        figures = score_prompts(generate, prompts, seeds, steps=20, guidance_scale=guidance)
        log(f"eval {name:8s} {format_figures(figures)}")
        result[name] = figures
    kinds: dict[str, list] = {}
    for r in result["held_out"]["records"]:
        e = r["expected"]
        kind = "purple star" if (e["color"], e["shape"]) == ("purple", "star") else (
            "purple (seen shape)" if e["color"] == "purple" else "star (seen colour)")
        kinds.setdefault(kind, []).append(r)
    result["held_out_by_kind"] = {k: summarize(v)["accuracy"] for k, v in kinds.items()}
    return result


def write_report(out: Path, args, command: str, report: dict) -> None:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    ev = report["evaluation"]
    rows = "\n".join(f"| {name} | {ev[key]['n_images']} | {pct(ev[key]['accuracy']['color'])} | "
                     f"{pct(ev[key]['accuracy']['background'])} | {pct(ev[key]['accuracy']['shape'])} | "
                     f"{pct(ev[key]['accuracy']['all'])} |"
                     for name, key in (("seen (72 prompts)", "seen"), ("held-out (24 prompts)", "held_out")))
    kinds = "\n".join(f"| {k} | {pct(a['color'])} | {pct(a['background'])} | {pct(a['shape'])} |"
                      for k, a in sorted(ev["held_out_by_kind"].items()))
    vae_rows = "\n".join(f"| {k} | {v['psnr_db']} | {pct(v['color'])} | {pct(v['background'])} | {pct(v['shape'])} |"
                         for k, v in report["vae_check"].items())
    p = report["params"]
    before = report.get("previous")
    continued = (f"\n- Continued from `{before['command']}` ({before['steps']} transformer steps, "
                 f"{before['wall_seconds'] / 60:.1f} min in all): its VAE as it was, the transformer and both text "
                 f"encoders trained {args.steps} steps further with a fresh schedule" if before else "")
    (out / "TRAINING.md").write_text(f"""# The built-in tiny FLUX.1-architecture model: how it was made

Trained from scratch on the toy world by toyworld/builtin_flux_training.py (architecture:
toyworld/builtin_flux.py); these files are exactly that script's output. Base model name
`builtin-flux`.

- Command: `{command}`{continued}
- Seed: {args.seed}
- Machine: {report['machine']}, **{args.threads} thread(s)** (`torch.set_num_threads({args.threads})`)
- Wall time: {report['wall_seconds'] / 60:.1f} min in all (VAE {report['vae']['seconds']:.0f} s, latent bank
  {report['bank_seconds']:.0f} s, transformer + text encoders {report['transformer']['seconds']:.0f} s,
  evaluation {report['eval_seconds']:.0f} s); CPU time of the process {report['cpu_seconds'] / 60:.1f} min
- torch {report['versions']['torch']}, diffusers {report['versions']['diffusers']}, transformers
  {report['versions']['transformers']}, Python {report['versions']['python']}
- Size on disk: {report['size_bytes'] / 1e6:.2f} MB (fp32 safetensors, configs, tokenizers); parameters: VAE
  {p['vae']:,}, transformer {p['transformer']:,}, CLIP {p['text_encoder']:,}, T5 {p['text_encoder_2']:,}

## Architecture (toyworld/builtin_flux.py)

- VAE: `AutoencoderKL`, 3 levels `(16, 32, 32)`, 64x64x3 -> 16x16x16 latents (factor 4),
  shift factor {report['shift_factor']:.4f}, scaling factor {report['scaling_factor']:.4f}; its posterior
  narrowed to a point before saving (narrow_posterior: the LoRA trainer samples it).
- Transformer: `FluxTransformer2DModel`, 2 double + 4 single blocks, 3 heads x 32, 64 image
  tokens (2x2 patches), no guidance embedding (FLUX.1-schnell's layout).
- Text encoders: `CLIPTextModel` (pooled; the built-in SD model's toy tokenizer, 32 tokens)
  and `T5EncoderModel` (2 gated-GELU layers, width 64; a Unigram T5 tokenizer over the toy
  words, 16 tokens).
- Scheduler: `FlowMatchEulerDiscreteScheduler` with FLUX.1-dev's config (dynamic shifting:
  shift {report['shift']:.3f} at 64 image tokens).

## Training

- Held out of the transformer's and the text encoders' training, as for the built-in SD
  model: **the colour purple and the shape star**. The VAE is trained on every shape and
  colour plus random-RGB shapes.
- VAE: {args.vae_steps} steps x batch {args.vae_batch}, AdamW {args.vae_lr} OneCycle (toyworld.builtin_training.train_vae).
- Latent bank: {args.bank_size} seen-only scenes.
- Transformer + CLIP + T5 jointly: {args.steps} steps x batch {args.batch}, AdamW {args.lr} (weight decay
  {WEIGHT_DECAY}) OneCycle, grad clip 1.0, EMA {EMA_DECAY} (the EMA weights ship); the FLUX.1
  family's flow-matching objective (logit-normal σ, shifted as generation shifts); captions
  with the toy-world dropout (10% empty).

## Evaluation (toyworld/evaluate.py; FlowMatchEuler 20 steps, true CFG {args.guidance} against the empty prompt, seeds {args.eval_seeds})

| prompts | images | shape colour | background | shape | all three |
|---|---|---|---|---|---|
{rows}

Held-out, by kind:

| kind | shape colour | background | shape |
|---|---|---|---|
{kinds}

VAE reconstructions (64 scenes each):

| scenes | PSNR dB | shape colour | background | shape |
|---|---|---|---|---|
{vae_rows}

Reproduce: `{command}`.
""")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m toyworld.builtin_flux_training", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--out", type=Path, default=FLUX_DIR)
    for key in ("vae_steps", "vae_batch", "bank_size", "steps", "batch"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=DEFAULTS[key])
    for key in ("vae_lr", "lr", "guidance"):
        parser.add_argument("--" + key.replace("_", "-"), type=float, default=DEFAULTS[key])
    parser.add_argument("--eval-seeds", default=DEFAULTS["eval_seeds"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from a trained folder of this script (its VAE as it is, the transformer and text "
                             "encoders trained --steps further with a fresh schedule) instead of from scratch")
    args = parser.parse_args(argv)
    command = " ".join(["python -m toyworld.builtin_flux_training"]
                       + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])

    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, FluxPipeline

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start, cpu_start = time.time(), time.process_time()
    pipe = build_pipeline(args.seed)
    if args.init_from:
        pipe = FluxPipeline.from_pretrained(args.init_from, local_files_only=True)
        previous = json.loads((args.init_from / "evaluation.json").read_text())
    pipe.set_progress_bar_config(disable=True)
    resume = args.out.with_name(args.out.name + ".resume")
    key = json.dumps({k: str(v) for k, v in sorted(vars(args).items())})
    if resume.exists() and (resume / "args.json").exists() and (resume / "args.json").read_text() != key:
        shutil.rmtree(resume)
    resume.mkdir(parents=True, exist_ok=True)
    (resume / "args.json").write_text(key)
    if args.init_from:
        vae_info, vae_check = {**previous["vae"], "from": str(args.init_from)}, previous["vae_check"]
    elif (resume / "vae.json").exists():
        pipe.vae.load_state_dict(AutoencoderKL.from_pretrained(resume / "vae").state_dict())
        saved = json.loads((resume / "vae.json").read_text())
        vae_info, vae_check = saved["info"], saved["check"]
    else:
        vae_info = train_vae(pipe.vae, args.vae_steps, args.vae_batch, args.vae_lr, args.seed)
        vae_check = check_vae(pipe.vae, args.seed)
        pipe.vae.save_pretrained(resume / "vae")
        atomic_write_text(resume / "vae.json", json.dumps({"info": vae_info, "check": vae_check}))
    log(f"vae  reconstructions: {json.dumps(vae_check)}")

    t0 = time.time()
    scenes, scaled, scaling = build_bank(pipe.vae, args.bank_size, args.seed)
    shift = float((scaled / scaling).mean())
    latents = scaled - shift * scaling  # (z - shift) x scale, as the trainer scales FLUX.1 latents
    pipe.vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    bank_seconds = time.time() - t0
    log(f"bank {len(scenes)} latents, shift {shift:.4f}, scaling {scaling:.4f}, {bank_seconds:.0f}s")

    info = train_transformer(pipe, scenes, latents, args.steps, args.batch, args.lr, args.seed,
                             checkpoint=resume / "transformer.pt")
    del latents
    narrow_posterior(pipe.vae)
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_pipeline(pipe, staging)

    t0 = time.time()
    pipe = FluxPipeline.from_pretrained(staging, local_files_only=True)  # scored as users load it
    pipe.set_progress_bar_config(disable=True)
    evaluation = evaluate(pipe, [int(s) for s in args.eval_seeds.split(",")], args.guidance)
    eval_seconds = time.time() - t0
    from studio.models.families import get_family

    report = {
        "command": command, "args": {k: str(v) for k, v in vars(args).items()},
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "params": {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                   for k in ("vae", "transformer", "text_encoder", "text_encoder_2")},
        "scaling_factor": scaling, "shift_factor": shift, "shift": get_family("flux").objective(pipe).shift,
        "vae": vae_info, "vae_check": vae_check, "bank_seconds": round(bank_seconds, 1),
        "transformer": info, "eval_seconds": round(eval_seconds, 1),
        **({"previous": {"command": previous["command"], "steps": previous["transformer"]["steps"],
                         "wall_seconds": previous["wall_seconds"]}} if args.init_from else {}),
        "wall_seconds": round(time.time() - t_start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "evaluation": {"seen": {k: v for k, v in evaluation["seen"].items() if k != "records"},
                       "held_out": {k: v for k, v in evaluation["held_out"].items() if k != "records"},
                       "held_out_by_kind": evaluation["held_out_by_kind"]},
    }
    report["size_bytes"] = folder_size(staging)
    (staging / "evaluation.json").write_text(json.dumps(report, indent=1))
    write_report(staging, args, command, report)
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    shutil.rmtree(resume, ignore_errors=True)
    log(f"done in {report['wall_seconds'] / 60:.1f} min; {report['size_bytes'] / 1e6:.2f} MB in {args.out}")
    return report


if __name__ == "__main__":
    main()
