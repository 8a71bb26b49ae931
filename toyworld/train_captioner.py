"""Train the toy-world captioner that ships with the built-in model, on the CPU.

    python -m toyworld.train_captioner [--seed 0] [--out assets/builtin/captioner] [--steps N]

The network is `studio.datasets.captioning.toy_network` (the product's own inference code):
five 3x3 convolutions with GroupNorm, mean- and max-pooled, one linear head per attribute (shape colour,
shape, background), trained with cross-entropy on toy-world pictures of **every** colour
and shape, purple and star included (the captioner reads the demo concept, which the
diffusion model never saw). The pictures are drawn once into a bank: sizes 16-46 px
(wider than the world's 22-44), a quarter rotated up to 30 degrees, a third blurred (radius
up to 1.2 px) and half with Gaussian pixel noise (sigma up to 6 of 255), so that pictures
that are not exact renders (resized uploads, generated samples) are read too. Adam with a
one-cycle schedule; one thread, so the same seed gives the same weights.

At the end it is scored on fresh clean renders, fresh degraded renders and the shipped demo
dataset (purple stars and its regularisation pictures), and OUT/config.json,
OUT/model.safetensors, OUT/evaluation.json and OUT/TRAINING.md are written.
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
from PIL import Image, ImageFilter

from studio.datasets.captioning import BUILTIN_CAPTIONER_DIR, toy_batch, toy_network
from studio.fsutil import atomic_write_text
from toyworld import world
from toyworld.builtin_training import cpu_name, folder_size, replace_folder

WIDTHS = (16, 32, 48, 64, 64)
HEADS = {"color": list(world.SHAPE_COLORS), "shape": list(world.SHAPES), "background": list(world.BACKGROUNDS)}
TEMPLATE = "a {color} {shape} on a {background} background"
DEFAULTS = {"seed": 0, "bank": 12000, "steps": 1500, "batch": 32, "lr": 3e-3, "eval_images": 1000}
MIN_SIZE, MAX_SIZE = 16, 46
P_ROTATED, MAX_ROTATION = 0.25, 30.0
P_BLUR, MAX_BLUR = 1 / 3, 1.2
P_NOISE, MAX_NOISE = 0.5, 6.0


def log(message: str) -> None:
    print(message, flush=True)


def draw(rng: np.random.Generator, degrade: bool) -> tuple[Image.Image, dict[str, str]]:
    """A picture of any shape, colour and background and its labels; `degrade`: maybe
    rotated, blurred, noisy (see the module docstring)."""
    rotation = MAX_ROTATION if degrade and rng.random() < P_ROTATED else 0.0
    scene = world.sample_scene(rng, shapes=world.SHAPES, colors=world.SHAPE_COLORS, backgrounds=world.BACKGROUNDS,
                               min_size=MIN_SIZE if degrade else world.MIN_SIZE,
                               max_size=MAX_SIZE if degrade else world.MAX_SIZE, max_rotation=rotation)
    image = world.render_scene(scene)
    if degrade and rng.random() < P_BLUR:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, MAX_BLUR))))
    if degrade and rng.random() < P_NOISE:
        px = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(1, MAX_NOISE), (64, 64, 3))
        image = Image.fromarray(np.clip(np.rint(px), 0, 255).astype(np.uint8))
    return image, {"color": scene.color, "shape": scene.shape, "background": scene.background}


def labels_tensor(labels: list[dict[str, str]]):
    import torch

    return {name: torch.tensor([values.index(lab[name]) for lab in labels]) for name, values in HEADS.items()}


def accuracy(net, images: list[Image.Image], labels: list[dict[str, str]]) -> dict[str, float]:
    """Share right per attribute and all three at once."""
    import torch

    with torch.no_grad():
        logits = {k: [] for k in HEADS}
        for start in range(0, len(images), 256):
            out = net(toy_batch(images[start:start + 256], world.RESOLUTION))
            for k in HEADS:
                logits[k].append(out[k].argmax(1))
    truth = labels_tensor(labels)
    right = {k: torch.cat(logits[k]) == truth[k] for k in HEADS}
    figures = {k: float(v.float().mean()) for k, v in right.items()}
    figures["all"] = float(torch.stack(list(right.values())).all(0).float().mean())
    figures["n"] = len(images)
    return figures


def demo_set() -> tuple[list[Image.Image], list[dict[str, str]]]:
    """The shipped demo dataset: the purple stars (their captions say "sks shape") and the
    regularisation pictures (captioned in full)."""
    images, labels = [], []
    for scene, i in zip(world.demo_scenes(), range(world.DEMO_IMAGES)):
        images.append(Image.open(world.PROJECT_DEMO_DIR / f"sks_{i + 1:02d}.png").convert("RGB"))
        labels.append({"color": scene.color, "shape": scene.shape, "background": scene.background})
    for path in sorted((world.PROJECT_DEMO_DIR / "reg").glob("*.png")):
        images.append(Image.open(path).convert("RGB"))
        labels.append(world.parse_caption(path.with_suffix(".txt").read_text()))
    return images, labels


def write_report(out: Path, report: dict) -> None:
    ev = report["evaluation"]

    def row(name: str, f: dict) -> str:
        return (f"| {name} | {f['n']} | {100 * f['color']:.1f}% | {100 * f['shape']:.1f}% | "
                f"{100 * f['background']:.1f}% | {100 * f['all']:.1f}% |")

    md = f"""# The toy-world captioner: how it was made

`lora-studio dataset caption DATASET --model builtin` captions toy-world pictures with this
model ("a purple star on a white background"). Trained by toyworld/train_captioner.py; these
files are exactly that script's output. The inference code is studio/datasets/captioning.py.

- Command: `{report['command']}`
- Seed: {report['args']['seed']}
- Machine: {report['machine']}, **1 thread** (`torch.set_num_threads(1)`)
- Wall time: {report['wall_seconds']:.0f} s (bank {report['bank_seconds']:.0f} s, training {report['train_seconds']:.0f} s)
- torch {report['versions']['torch']}, Python {report['versions']['python']}
- Parameters: {report['params']:,}; size on disk {report['size_bytes'] / 1e3:.0f} kB (fp32 safetensors + config)

## Model and training

- Network: 3x3 convolutions {list(WIDTHS)} (first stride 1, then stride 2) with GroupNorm(4) and ReLU, mean and
  max pooling, one linear head per attribute: colour {HEADS['color']}, shape {HEADS['shape']},
  background {HEADS['background']}. Caption: `{TEMPLATE}`.
- Data: a bank of {report['args']['bank']} pictures of every colour and shape (purple and star
  included), sizes {MIN_SIZE}-{MAX_SIZE} px, {P_ROTATED:.0%} rotated up to {MAX_ROTATION:.0f} degrees,
  {P_BLUR:.0%} blurred (radius 0.3-{MAX_BLUR}), {P_NOISE:.0%} with pixel noise (sigma 1-{MAX_NOISE:.0f}).
- {report['args']['steps']} steps x batch {report['args']['batch']}, Adam {report['args']['lr']} one-cycle,
  cross-entropy summed over the heads. Final training loss {report['final_loss']:.4f}.

## Evaluation (fresh pictures, never in the bank)

| pictures | n | colour | shape | background | all three |
|---|---|---|---|---|---|
{row("clean renders (the world's sizes, no rotation)", ev['clean'])}
{row("degraded renders (as the bank: rotated, blurred, noisy)", ev['degraded'])}
{row("assets/demo-dataset (12 purple stars + 24 reg pictures)", ev['demo_dataset'])}

Reproduce: `python -m toyworld.train_captioner` (same machine and library versions give the same files).
"""
    atomic_write_text(out / "TRAINING.md", md)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m toyworld.train_captioner", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--out", type=Path, default=BUILTIN_CAPTIONER_DIR)
    parser.add_argument("--bank", type=int, default=DEFAULTS["bank"], help="pictures drawn once for training")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--eval-images", type=int, default=DEFAULTS["eval_images"])
    args = parser.parse_args(argv)
    command = " ".join(["python -m toyworld.train_captioner"]
                       + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t_start = time.time()
    rng = np.random.default_rng([args.seed, 7])
    drawn = [draw(rng, degrade=True) for _ in range(args.bank)]
    bank = toy_batch([im for im, _ in drawn], world.RESOLUTION)
    truth = labels_tensor([lab for _, lab in drawn])
    bank_seconds = time.time() - t_start
    log(f"bank of {args.bank} pictures in {bank_seconds:.0f}s")

    net = toy_network(WIDTHS, HEADS)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.2)
    order = torch.Generator().manual_seed(args.seed)
    t0, recent = time.time(), []
    for step in range(args.steps):
        idx = torch.randint(0, args.bank, (args.batch,), generator=order)
        out = net(bank[idx])
        loss = sum(torch.nn.functional.cross_entropy(out[k], truth[k][idx]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % 100 == 0:
            log(f"step {step + 1}/{args.steps} loss {np.mean(recent):.4f} ({time.time() - t0:.0f}s)")
    train_seconds = time.time() - t0
    net.eval()

    clean_rng, degraded_rng = np.random.default_rng([args.seed, 8]), np.random.default_rng([args.seed, 9])
    clean = [draw(clean_rng, degrade=False) for _ in range(args.eval_images)]
    degraded = [draw(degraded_rng, degrade=True) for _ in range(args.eval_images)]
    evaluation = {
        "clean": accuracy(net, [i for i, _ in clean], [lab for _, lab in clean]),
        "degraded": accuracy(net, [i for i, _ in degraded], [lab for _, lab in degraded]),
        "demo_dataset": accuracy(net, *demo_set()),
    }
    for name, figures in evaluation.items():
        log(f"{name}: {json.dumps(figures)}")

    out, staging = args.out, args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = {"kind": "toy-captioner", "resolution": world.RESOLUTION, "widths": list(WIDTHS), "heads": HEADS,
              "template": TEMPLATE}
    atomic_write_text(staging / "config.json", json.dumps(config, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(staging / "model.safetensors"))
    report = {
        "command": command, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "params": sum(p.numel() for p in net.parameters()), "size_bytes": folder_size(staging),
        "bank_seconds": round(bank_seconds, 1), "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1), "final_loss": float(np.mean(recent)),
        "evaluation": evaluation,
    }
    atomic_write_text(staging / "evaluation.json", json.dumps(report, indent=1) + "\n")
    write_report(staging, report)
    replace_folder(staging, out)
    log(f"done in {report['wall_seconds']:.0f}s; {report['size_bytes'] / 1e3:.0f} kB in {out}")
    return report


if __name__ == "__main__":
    main()
