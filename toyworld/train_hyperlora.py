"""Train the instant-adapter hypernetwork (studio/instant/network.py) for a base model.

    python -m toyworld.train_hyperlora [--seed 0] [--steps N] [--out assets/builtin/hyperlora]
    python -m toyworld.train_hyperlora --model PATH --concepts DIR --out DIR     # another base model

End to end through the base model's own training objective, as HyperDreamBooth trains its
hypernetwork: each step takes K concepts; for each, the hypernetwork reads 1-3 pictures of
it or one description and writes its LoRA; the LoRA is applied to the frozen denoiser
sample by sample (forward hooks: the batch holds K different LoRAs at once); the loss is

    L = mean_concept_pictures[ w(t) |eps_hat(x_t, t, "a sks shape ...") - eps|^2 ]      the concept
      + prior_weight * mean_prior_pictures[ w(t) |eps_hat(x_t, t, caption) - eps|^2 ]   unchanged elsewhere
      + align_weight * InfoNCE(z_pictures, z_descriptions over contrast_concepts)   one code space

with min-SNR-gamma weights w(t) (v-prediction targets where the scheduler says so), each
prior picture under one of the step's LoRAs. The codes are unit-normalised (HyperLoRA.unit)
and the alignment is contrastive (CLIP's symmetric cross-entropy over `contrast_concepts`
concepts a step, cosine / temperature): a first version pulled z_pictures towards z_description by their
squared distance, and both collapsed to one code, every concept getting the same mean
LoRA (a pink blob whatever the input). The picture the hypernetwork reads is never the
one its LoRA is scored on, so the code must hold the concept, not the picture.

Nothing here names a model family: the denoiser is the family's first part, its text
conditioning and extra inputs come from the family's hooks (studio.models.families), and
the kohya names of the adapted layers from studio.adapters.formats.naming. With `--concepts
DIR` (one folder per concept: pictures with captions that use the trigger word, and a
description.txt; DIR/reg/: prior pictures with their captions) the same loop trains a
hypernetwork for an SD 1.5 or SDXL checkpoint on a GPU (untested at that size).

The built-in world's concepts (`--concepts` not given) are colour x shape pairs drawn from
the extended world (toyworld.world: EXTRA_COLORS, EXTRA_SHAPES) beside the base world's, the
base model never having seen most of them. HELD_OUT_CONCEPTS are in no picture and no
description of training: among them the demo's purple star (the base model never saw
purple nor star, the hypernetwork never saw a purple star, though it saw purple shapes and
stars of other colours). OUT/TRAINING.md records command, time, data and the evaluation.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from studio.adapters import AdapterFile
from studio.adapters.formats.naming import name_table, path_to_name
from studio.fsutil import atomic_write_text
from studio.instant import model_hashes
from studio.instant.network import PAD, UNKNOWN, HyperConfig, HyperLoRA, Target, to_pixels, words
from studio.models import load_pipeline, resolve_model
from studio.models.builtin import BUILTIN_DIR
from studio.models.families import get_family
from toyworld import world
from toyworld.builtin_training import cpu_name, folder_size, one_cycle, replace_folder
from toyworld.evaluate import EXTENDED_PALETTE, analyze, pipeline_generate_fn

VERSION = "1"
OUT_DIR = BUILTIN_DIR / "hyperlora"
TRIGGER = "sks"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONVS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")

# The built-in world's concepts: every colour x shape the extended world draws.
CONCEPT_COLORS = world.SHAPE_COLORS + tuple(world.EXTRA_COLORS)
CONCEPT_SHAPES = world.ALL_SHAPES
# In no picture and no description of training: the demo's purple star, and one concept per
# new colour or shape, so each held-out concept's colour and shape are seen in others.
HELD_OUT_CONCEPTS = (("purple", "star"), ("orange", "heart"), ("cyan", "cross"), ("pink", "triangle"),
                     ("green", "moon"))
TRAIN_CONCEPTS = tuple((c, s) for c in CONCEPT_COLORS for s in CONCEPT_SHAPES if (c, s) not in HELD_OUT_CONCEPTS)
DESCRIPTIONS = ("a {c} {s}", "{c} {s}", "a {s} in {c}", "a {c} colored {s}", "the {c} {s}", "{s}, {c}",
                "a {c} {s} on a {b} background", "a {c} {s} on {b}", "a {c} coloured {s} shape")
STOP_WORDS = ("a", "an", "the", "in", "on", "of", "colored", "coloured", "shape", "background")
CONCEPT_SIZES = (26, 44)
P_NO_BACKGROUND = 0.2  # trigger captions without the background ("a sks shape")

DEFAULTS = {"seed": 0, "steps": 6000, "concepts_per_step": 6, "lr": 1e-3, "rank": 8, "z_dim": 32,
            "pictures": 48, "prior_pictures": 2000, "prior_weight": 0.5, "align_weight": 0.1, "temperature": 0.1, "contrast_concepts": 32, "p_text": 0.5,
            "min_timestep": 200, "min_snr_gamma": 1.0, "eval_seeds": 4}


def log(message: str) -> None:
    print(message, flush=True)


def description(color: str, shape: str, rng: np.random.Generator) -> str:
    """One of the training descriptions of a concept (some name a background, to be passed
    over; never one that would put a held-out concept's two words in one description)."""
    template = DESCRIPTIONS[int(rng.integers(len(DESCRIPTIONS)))]
    backgrounds = [b for b in world.BACKGROUNDS if b != color and (b, shape) not in HELD_OUT_CONCEPTS]
    return template.format(c=color, s=shape, b=backgrounds[int(rng.integers(len(backgrounds)))])


def builtin_vocab() -> list[str]:
    """The hypernetwork's words: padding, unknown, the stop words, every colour and shape."""
    return [PAD, UNKNOWN, *STOP_WORDS, *world.ALL_COLORS, *world.ALL_SHAPES]


# ----------------------------------------------------------------------------- data


@dataclass
class Bank:
    """Pictures drawn and encoded once: per concept its encoder inputs (pixels [N, 3, R, R]),
    its latents [N, C, h, w] and captions (with the trigger), and its descriptions; the
    prior's latents and captions."""

    concepts: list[str]
    pixels: dict[str, torch.Tensor]
    latents: dict[str, torch.Tensor]
    captions: dict[str, list[str]]
    descriptions: dict[str, list[str]]
    prior_latents: torch.Tensor
    prior_captions: list[str]


@torch.no_grad()
def encode_latents(vae, images: list[Image.Image], resolution: int) -> torch.Tensor:
    chunks = []
    for start in range(0, len(images), 64):
        x = to_pixels(images[start:start + 64], resolution).to(vae.device, vae.dtype)
        chunks.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(chunks) * vae.config.scaling_factor


def concept_key(color: str, shape: str) -> str:
    return f"{color} {shape}"


def concept_scenes(color: str, shape: str, count: int, rng: np.random.Generator) -> list[world.Scene]:
    """`count` pictures of a concept, upright (as the base model's world), on the seven
    backgrounds in turn (never its own colour)."""
    backgrounds = [b for b in world.BACKGROUNDS if b != color]
    return [world.sample_scene(rng, shapes=(shape,), colors=(color,), backgrounds=(backgrounds[i % len(backgrounds)],),
                               min_size=CONCEPT_SIZES[0], max_size=CONCEPT_SIZES[1]) for i in range(count)]


def trigger_caption(scene: world.Scene, trigger: str, rng: np.random.Generator) -> str:
    if rng.random() < P_NO_BACKGROUND:
        return f"a {trigger} {world.DEMO_CLASS_WORD}"
    return f"a {trigger} {world.DEMO_CLASS_WORD} on a {scene.background} background"


def toy_concepts(trigger: str, pictures: int, seed: int):
    """The built-in world's training concepts, TRAIN_CONCEPTS only (HELD_OUT_CONCEPTS never
    drawn): per concept its key, `pictures` pictures, their captions and as many descriptions."""
    rng = np.random.default_rng([seed, 1])
    for color, shape in TRAIN_CONCEPTS:
        scenes = concept_scenes(color, shape, pictures, rng)
        images = [world.render_scene(s) for s in scenes]
        captions = [trigger_caption(s, trigger, rng) for s in scenes]
        yield concept_key(color, shape), images, captions, [description(color, shape, rng) for _ in range(pictures)]


def toy_prior(count: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """`count` pictures of the base model's own world and their captions (a quarter without the background)."""
    rng = np.random.default_rng([seed, 2])
    scenes = [world.sample_scene(rng) for _ in range(count)]
    return [world.render_scene(s) for s in scenes], [world.caption_for(s, background=rng.random() >= 0.25)
                                                     for s in scenes]


def toy_bank(vae, resolution: int, trigger: str, pictures: int, prior_pictures: int, seed: int) -> Bank:
    """The built-in world's bank: toy_concepts and toy_prior, encoded."""
    concepts, pixels, latents, captions, descriptions = [], {}, {}, {}, {}
    for key, images, captions[key], descriptions[key] in toy_concepts(trigger, pictures, seed):
        concepts.append(key)
        pixels[key] = to_pixels(images, resolution)
        latents[key] = encode_latents(vae, images, resolution)
    prior, prior_captions = toy_prior(prior_pictures, seed)
    return Bank(concepts, pixels, latents, captions, descriptions, encode_latents(vae, prior, resolution),
                prior_captions)


def folder_bank(vae, folder: Path, resolution: int, encoder_resolution: int) -> Bank:
    """A concept dataset on disk: FOLDER/<concept>/ pictures with same-stem .txt captions
    (which use the trigger word) and a description.txt (one description per line);
    FOLDER/reg/ prior pictures with their captions. Pictures are resized to `resolution`."""
    from studio.datasets import load_items, open_image

    concepts, pixels, latents, captions, descriptions = [], {}, {}, {}, {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "reg"):
        items = load_items(sub)
        lines = [line.strip() for line in (sub / "description.txt").read_text(encoding="utf-8").splitlines()
                 if line.strip()] if (sub / "description.txt").is_file() else []
        if len(items) < 2 or not lines:
            raise SystemExit(f"{sub}: a concept needs two or more pictures with captions (one is read, another "
                             "scored) and a description.txt")
        images = [open_image(it.path) for it in items]
        concepts.append(sub.name)
        pixels[sub.name] = to_pixels(images, encoder_resolution)
        latents[sub.name] = encode_latents(vae, images, resolution)
        captions[sub.name] = [it.caption for it in items]
        descriptions[sub.name] = lines
    reg = load_items(folder / "reg")
    prior = encode_latents(vae, [open_image(it.path) for it in reg], resolution)
    return Bank(concepts, pixels, latents, captions, descriptions, prior, [it.caption for it in reg])


# ----------------------------------------------------------------------------- the base model


def adapted_layers(denoiser: torch.nn.Module, skip_sections: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The denoiser's attention projections and (LoCon's) convs, time projections and
    resamplers, outside `skip_sections` (top-level module names): the quick preset's layers."""
    names = ATTENTION + CONVS
    return {path: layer for path, layer in denoiser.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))
            and any(path == n or path.endswith("." + n) for n in names)
            and path.split(".")[0] not in skip_sections}


def targets_of(family, denoiser, layers: dict[str, torch.nn.Module]) -> list[Target]:
    attr = family.denoiser
    return [Target(path, path_to_name(family.name, attr, path, denoiser.config), layer.weight.shape[1],
                   layer.weight.shape[0], tuple(layer.weight.shape[2:]) if layer.weight.ndim == 4 else ())
            for path, layer in layers.items()]


class LiveLoRA:
    """Per-sample LoRAs on the frozen denoiser: a forward hook on each adapted layer adds
    up_b @ (down x_b) for sample b (a conv's down is a conv with the layer's stride and
    padding, its up 1x1), with the ups of the current batch set by `use`."""

    def __init__(self, layers: dict[str, torch.nn.Module], downs) -> None:
        self.ups: list[torch.Tensor] | None = None
        self.handles = [layer.register_forward_hook(self._hook(i, layer, down))
                        for i, ((path, layer), down) in enumerate(zip(layers.items(), downs))]

    def use(self, ups: list[torch.Tensor] | None) -> None:
        self.ups = ups

    def _hook(self, index: int, layer: torch.nn.Module, down: torch.Tensor):
        def hook(module, inputs, output):
            if self.ups is None:
                return output
            x, up = inputs[0].to(down.dtype), self.ups[index]  # the LoRA in fp32 over a bf16 base
            if isinstance(layer, torch.nn.Conv2d):
                h = F.conv2d(x, down, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
                delta = torch.einsum("brhw,bor->bohw", h, up)
            else:
                h = x @ down.t()
                delta = torch.einsum("bnr,bor->bno", h, up) if h.ndim == 3 else torch.einsum("br,bor->bo", h, up)
            return output + delta.to(output.dtype)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass(frozen=True)
class Picture:
    """What a family's size conditioning reads of a training picture (SDXL's micro-conditioning)."""

    size: tuple[int, int]
    bucket: tuple[int, int]


def trigger_vectors(pipe, family, trigger: str) -> list[torch.Tensor]:
    """The trigger's token embeddings in each text encoder, [tokens, width] each."""
    out = []
    for tokenizer_attr, encoder_attr in zip(family.tokenizers, family.text_encoders):
        ids = getattr(pipe, tokenizer_attr)(trigger, add_special_tokens=False).input_ids
        out.append(getattr(pipe, encoder_attr).get_input_embeddings().weight[ids].detach().float().cpu().clone())
    return out


# ----------------------------------------------------------------------------- training


def contrastive(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE between row i of `a` and row i of `b` (unit codes: cosine = a.b / dim)."""
    logits = a @ b.t() / (a.shape[1] * temperature)
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def contrast_codes(hyper: HyperLoRA, bank: Bank, rng: np.random.Generator, count: int, device):
    """The picture and description codes of `count` concepts (one random picture and
    description each), for the contrastive term: many concepts a step, so that concepts of
    one colour and different shapes meet as negatives (with only the step's few, the
    picture codes kept the colour and lost the shape)."""
    chosen = [bank.concepts[i] for i in rng.choice(len(bank.concepts), size=min(count, len(bank.concepts)),
                                                     replace=False)]
    pixels = torch.stack([bank.pixels[key][int(rng.integers(len(bank.pixels[key])))] for key in chosen])
    texts = [bank.descriptions[key][int(rng.integers(len(bank.descriptions[key])))] for key in chosen]
    return hyper.encode_images(pixels.to(device)), hyper.encode_text(hyper.tokenize(texts).to(device))


def train(hyper: HyperLoRA, pipe, family, bank: Bank, args, resolution: int) -> dict:
    """The loop of the module docstring. The denoising loss is the family's own: its text
    conditioning (`encode_text`, `size_conditioning`), its call (`predict`) and its objective
    (timesteps, noisy input, target, min-SNR weight), as trainers.trainer trains a LoRA."""
    from studio.config import TrainingConfig

    device = torch.device(args.device)
    denoiser = getattr(pipe, family.denoiser)
    encoders = [getattr(pipe, a) for a in family.text_encoders]
    tokenizers = [getattr(pipe, a) for a in family.tokenizers]
    objective = family.objective(pipe)
    settings = TrainingConfig(min_timestep=args.min_timestep, min_snr_gamma=args.min_snr_gamma or None)
    layers = adapted_layers(denoiser, tuple(args.skip_sections))
    hyper.to(device)
    live = LiveLoRA(layers, hyper.downs)
    text_cache: dict[str, dict[str, torch.Tensor]] = {}
    k = args.concepts_per_step
    sizes = family.size_conditioning([Picture((resolution, resolution), (resolution, resolution))] * 2 * k,
                                     [(0, 0)] * 2 * k)

    def conditioning(captions: list[str]) -> dict[str, torch.Tensor]:
        """The batch's text conditioning (each caption encoded once) and size conditioning,
        floating-point entries in the denoiser's dtype."""
        missing = [c for c in dict.fromkeys(captions) if c not in text_cache]
        if missing:
            with torch.no_grad():
                encoded = family.encode_text(tokenizers, encoders, missing, device)
            for i, caption in enumerate(missing):
                text_cache[caption] = {key: value[i] for key, value in encoded.items()}
        batch = {key: torch.stack([text_cache[c][key] for c in captions]) for key in text_cache[captions[0]]}
        return {key: value.to(device, denoiser.dtype) if value.is_floating_point() else value.to(device)
                for key, value in {**batch, **sizes}.items()}

    latent_shape = bank.prior_latents.shape[1:]
    optimizer = torch.optim.AdamW(hyper.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = one_cycle(optimizer, args.lr, args.steps)
    rng = np.random.default_rng([args.seed, 3])
    gen = torch.Generator().manual_seed(args.seed + 3)
    started, running = time.time(), []
    for step in range(1, args.steps + 1):
        chosen = [bank.concepts[i] for i in rng.choice(len(bank.concepts), size=k, replace=False)]
        inputs, counts, target_latents, target_captions, texts = [], [], [], [], []
        for key in chosen:
            n = len(bank.latents[key])
            order = rng.permutation(n)
            shown = min(int(rng.integers(1, 4)), n - 1)
            inputs.append(bank.pixels[key][torch.from_numpy(order[1:1 + shown])])
            counts.append(shown)
            target_latents.append(bank.latents[key][order[0]])
            target_captions.append(bank.captions[key][order[0]])
            texts.append(bank.descriptions[key][int(rng.integers(len(bank.descriptions[key])))])
        prior_index = rng.integers(len(bank.prior_latents), size=k)
        use_text = torch.from_numpy(rng.random(k) < args.p_text).to(device)

        z_images = hyper.encode_images(torch.cat(inputs).to(device), counts)
        z_texts = hyper.encode_text(hyper.tokenize(texts).to(device))
        z = torch.where(use_text[:, None], z_texts, z_images)
        ups = hyper.ups(z)
        live.use([torch.cat([u, u]) for u in ups])  # concept pictures, then one prior picture per concept

        x0 = torch.cat([torch.stack(target_latents), bank.prior_latents[torch.from_numpy(prior_index)]]).to(device)
        text = conditioning(target_captions + [bank.prior_captions[i] for i in prior_index])
        noise = torch.randn((2 * k, *latent_shape), generator=gen).to(device)
        t = objective.sample_timesteps(2 * k, gen, settings).to(device)
        noisy = objective.noisy(x0, noise, t).to(denoiser.dtype)
        prediction = family.predict(denoiser, noisy, t, text)
        target = objective.target(x0, noise, t)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weight = objective.loss_weight(t, settings)
        if weight is not None:
            per_sample = per_sample * weight.to(per_sample.device)
        concept_loss, prior_loss = per_sample[:k].mean(), per_sample[k:].mean()
        align = contrastive(*contrast_codes(hyper, bank, rng, args.contrast_concepts, device), args.temperature)
        loss = concept_loss + args.prior_weight * prior_loss + args.align_weight * align
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hyper.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append((concept_loss.item(), prior_loss.item(), align.item()))
        if step % 50 == 0 or step == args.steps:
            m = np.mean(running, axis=0)
            running = []
            log(f"step {step:5d}/{args.steps}  concept {m[0]:.4f}  prior {m[1]:.4f}  align {m[2]:.4f}  "
                f"{time.time() - started:6.0f}s")
    live.use(None)
    live.remove()
    hyper.eval()
    return {"steps": args.steps, "seconds": round(time.time() - started, 1)}


# ----------------------------------------------------------------------------- evaluation


NEUTRAL_PRIOR = ("a red circle on a white background", "a blue square on a black background",
                 "a yellow triangle on a gray background", "a green circle on a blue background",
                 "a red triangle on a yellow background", "a blue circle on a red background",
                 "a yellow square on a green background")


class Merged:
    """An adapter file's update added into the pipeline's weights for a while (the exact LoRA
    math of studio.adapters.formats.modules), so pictures can be drawn in batches."""

    def __init__(self, pipe, family, adapter: AdapterFile) -> None:
        models = {a: getattr(pipe, a) for a in (p.attr for p in family.parts)}
        table = name_table(family.name, models)
        self.saved = []
        with torch.no_grad():
            for name, module in adapter.modules.items():
                layer = table[name].layer
                self.saved.append((layer, layer.weight.detach().clone()))
                layer.weight += module.delta(layer.weight.shape).to(layer.weight.dtype)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for layer, weight in self.saved:
                layer.weight.copy_(weight)


def trigger_prompts(color: str, trigger: str = TRIGGER) -> list[str]:
    """"a sks shape on a B background" for the seven backgrounds but the concept's own colour
    (a green shape cannot show on green: the toy world never draws one)."""
    return [f"a {trigger} {world.DEMO_CLASS_WORD} on a {b} background" for b in world.BACKGROUNDS if b != color]


def concept_rates(pipe, family, adapter: AdapterFile, concept: tuple[str, str], seeds: list[int],
                  trigger: str = TRIGGER) -> dict:
    """Share of trigger pictures (trigger_prompts x seeds) whose colour, shape, both, and
    background are the concept's / the prompt's (the extended palette and shapes), and the
    share of prior pictures (NEUTRAL_PRIOR x seeds, no trigger) right in all three."""
    generate = pipeline_generate_fn(pipe, batch_size=28)
    color, shape = concept
    prompts = trigger_prompts(color, trigger)
    pairs = [(p, s) for p in prompts for s in seeds]
    prior_pairs = [(p, s) for p in NEUTRAL_PRIOR for s in seeds]
    with torch.no_grad(), Merged(pipe, family, adapter):
        images = generate([p for p, _ in pairs], [s for _, s in pairs])
        prior_images = generate([p for p, _ in prior_pairs], [s for _, s in prior_pairs])
    reads = [analyze(im, EXTENDED_PALETTE, world.ALL_SHAPES) for im in images]
    wanted = [world.parse_caption(p)["background"] for p, _ in pairs]
    prior_right = []
    for im, (p, _) in zip(prior_images, prior_pairs):
        got, want = analyze(im), world.parse_caption(p)
        prior_right.append((got.color, got.shape, got.background) == (want["color"], want["shape"], want["background"]))
    return {
        "color": float(np.mean([r.color == color for r in reads])),
        "shape": float(np.mean([r.shape == shape for r in reads])),
        "both": float(np.mean([r.color == color and r.shape == shape for r in reads])),
        "background": float(np.mean([r.background == b for r, b in zip(reads, wanted)])),
        "prior": float(np.mean(prior_right)),
        "n": len(reads),
        "n_prior": len(prior_right),
    }


def concept_picture(concept: tuple[str, str], seed: int, background: str = "white") -> Image.Image:
    """One picture of a concept, as a person would give it (upright, the demo's sizes)."""
    rng = np.random.default_rng([seed, 5])
    color, shape = concept
    return world.render_scene(world.sample_scene(rng, shapes=(shape,), colors=(color,), backgrounds=(background,),
                                                 min_size=world.DEMO_MIN_SIZE, max_size=world.DEMO_MAX_SIZE))


def evaluate(hyper: HyperLoRA, pipe, family, concepts, seeds: list[int]) -> dict:
    """Per concept: the adapter from one picture (on white) and from the description
    "a COLOUR SHAPE", each scored by concept_rates."""
    result = {}
    for concept in concepts:
        color, shape = concept
        with torch.no_grad():
            z_image = hyper.encode_images(to_pixels([concept_picture(concept, 0)], hyper.config.resolution), [1])[0]
            z_text = hyper.encode_text(hyper.tokenize([f"a {color} {shape}"]))[0]
        row = {}
        for name, z in (("picture", z_image), ("description", z_text)):
            adapter = AdapterFile(hyper.adapter_modules(z), {}, family.name)
            row[name] = concept_rates(pipe, family, adapter, concept, seeds)
        result[concept_key(*concept)] = row
        log(f"eval {concept_key(*concept):16s} " + "  ".join(
            f"{name}: colour {100 * r['color']:.0f}% shape {100 * r['shape']:.0f}% both {100 * r['both']:.0f}% "
            f"prior {100 * r['prior']:.0f}%" for name, r in row.items()))
    return result


def summary(evaluation: dict) -> dict:
    """Mean over concepts per input kind."""
    out = {}
    for name in ("picture", "description"):
        rows = [row[name] for row in evaluation.values()]
        out[name] = {k: float(np.mean([r[k] for r in rows])) for k in ("color", "shape", "both", "prior")}
    return out


# ----------------------------------------------------------------------------- the record


def write_report(out: Path, report: dict, config: HyperConfig, bank: Bank) -> None:
    """OUT/TRAINING.md: how the files beside it were made, on what, and what they do."""
    a = report["args"]

    def pct(v: float) -> str:
        return f"{100 * v:.0f}%"

    rows = []
    for key, row in report.get("evaluation", {}).get("held_out", {}).items():
        for name, r in row.items():
            rows.append(f"| {key} | {name} | {pct(r['color'])} | {pct(r['shape'])} | {pct(r['both'])} | "
                        f"{pct(r['prior'])} |")
    mean = report.get("evaluation", {}).get("held_out_mean", {})
    rows += [f"| **mean** | {name} | {pct(r['color'])} | {pct(r['shape'])} | {pct(r['both'])} | {pct(r['prior'])} |"
             for name, r in mean.items()]
    evaluation = ("(no evaluation: --eval-seeds 0 or a concept dataset)" if not rows else
                  f"""On every held-out concept, an adapter from one picture (the concept on white, as
`concept_picture` draws it) and one from the description "a COLOUR SHAPE"; "a sks shape on a
B background" on the seven backgrounds (but the concept's own colour) x seeds
{report['evaluation']['seeds']}, read by toyworld/evaluate.py with the extended palette and
shapes; prior: seven prompts without the trigger x the same seeds, right in colour, shape
and background (the base model: 100%). DDIM 20 steps, CFG 5, the LoRA merged into the weights.

| concept | from | colour | shape | both | prior right |
|---|---|---|---|---|---|
""" + "\n".join(rows))
    shared = ("\n  (the machine was shared with other work: wall time above CPU time is time spent waiting)"
              if report["wall_seconds"] > 1.1 * report["cpu_seconds"] else "")
    held = config.held_out.get("concepts", [])
    md = f"""# The instant-adapter hypernetwork: how it was made

`lora-studio instant --images DIR | --describe TEXT --name NAME` makes a LoRA for the
built-in model with this hypernetwork, in one forward pass. Trained by
toyworld/train_hyperlora.py; these files are exactly that script's output. The inference
code is studio/instant/.

- Command: `{report['command']}`
- Seed: {a['seed']}
- Machine: {report['machine']}, **{a['threads']} thread(s)** (`torch.set_num_threads({a['threads']})`)
- Wall time: {report['wall_seconds'] / 60:.1f} min (bank {report['bank_seconds']:.0f} s, training
  {report['training']['seconds']:.0f} s, evaluation {report.get('evaluation', {}).get('seconds', 0):.0f} s);
  CPU time of the process {report['cpu_seconds'] / 60:.1f} min{shared}
- torch {report['versions']['torch']}, Python {report['versions']['python']}
- Parameters: {report['params']:,}; size on disk {report['size_bytes'] / 1e6:.2f} MB (fp32 safetensors + config)

## What it makes

A LoCon of rank {config.rank} (alpha {config.rank}) on {len(config.targets)} layers of the built-in UNet: the
attention projections (to_q, to_k, to_v, to_out.0) and the ResNet convs, time projections and
resamplers of the mid and up blocks (the down blocks are left alone, as in the
tiny-demo-quick preset), trigger word `{config.trigger}`. Codes of {config.z_dim} values: picture encoder
(3x3 convolutions {config.image_widths}, stride 2, GroupNorm, SiLU, mean and max pooled), description
encoder (word embeddings of {config.word_dim}, pooled by scores from a causal convolution over the
words; vocabulary: {', '.join(config.vocab[2:])}).

## Data

- Concepts: every colour x shape of the extended world (colours {', '.join(CONCEPT_COLORS)};
  shapes {', '.join(CONCEPT_SHAPES)}), {len(bank.concepts)} in training. The base model never saw purple,
  orange, pink, cyan, brown, stars, hearts, crosses or moons.
- **Held out of the hypernetwork's training (no picture, no caption, no description):
  {', '.join(held)}.** Each one's colour and shape are in other training concepts, so the
  pictures and descriptions that make them are combinations it never saw; the purple star,
  the demo's concept, is new to the base model and to the hypernetwork alike. Descriptions
  that name a background never pair it with a shape into a held-out concept.
- {a['pictures']} pictures per concept (sizes {CONCEPT_SIZES[0]}-{CONCEPT_SIZES[1]} px, upright, the seven backgrounds in
  turn), captioned "a {config.trigger} shape on a B background" ({P_NO_BACKGROUND:.0%} "a {config.trigger} shape");
  descriptions from the templates {', '.join(repr(t) for t in DESCRIPTIONS)}.
- Prior: {a['prior_pictures']} pictures of the base model's world with their captions ({len(bank.prior_captions)} drawn once).

## Training

{a['steps']} steps; each takes {a['concepts_per_step']} concepts, reads 1-3 pictures of each ({pct(1 - a['p_text'])}) or a
description ({pct(a['p_text'])}), applies each concept's LoRA to one picture of it (never one it read) and
one prior picture. Loss: denoising (epsilon, min-SNR-{a['min_snr_gamma']:g}, timesteps {a['min_timestep']}-999) on
the concept pictures + {a['prior_weight']:g} x on the prior pictures + {a['align_weight']:g} x the contrastive
alignment of the picture and description codes of {a['contrast_concepts']} concepts (temperature {a['temperature']:g}). AdamW {a['lr']:g} one-cycle,
gradient clipping 1.0; the base model frozen.

## Evaluation

{evaluation}

Reproduce: `{report['command']}` (same machine and library versions give the same files).
"""
    atomic_write_text(out / "TRAINING.md", md)


# ----------------------------------------------------------------------------- main


def build_config(family, denoiser, layers, args, vocab: list[str], base: dict, resolution: int,
                 vectors: list[torch.Tensor]) -> HyperConfig:
    return HyperConfig(targets=targets_of(family, denoiser, layers), rank=args.rank, z_dim=args.z_dim,
                       resolution=resolution, image_widths=[32, 64, 96, 128], vocab=vocab,
                       stop_words=list(STOP_WORDS), word_dim=64, trigger=args.trigger,
                       trigger_shapes=[list(v.shape) for v in vectors], family=family.name,
                       base_model=base, version=VERSION,
                       held_out={"concepts": [concept_key(*c) for c in HELD_OUT_CONCEPTS],
                                 "where": "no picture and no description of training"} if args.concepts is None
                       else {})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m toyworld.train_hyperlora", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--model", default="builtin", help="base model: 'builtin', a diffusers folder or a checkpoint")
    parser.add_argument("--concepts", type=Path, default=None, help="a concept dataset (see the module docstring); "
                                                                    "default: the built-in world's concepts")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default for builtin: {OUT_DIR})")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--concepts-per-step", type=int, default=DEFAULTS["concepts_per_step"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    parser.add_argument("--z-dim", type=int, default=DEFAULTS["z_dim"])
    parser.add_argument("--pictures", type=int, default=DEFAULTS["pictures"], help="pictures per built-in concept")
    parser.add_argument("--prior-pictures", type=int, default=DEFAULTS["prior_pictures"])
    parser.add_argument("--prior-weight", type=float, default=DEFAULTS["prior_weight"])
    parser.add_argument("--align-weight", type=float, default=DEFAULTS["align_weight"])
    parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature"])
    parser.add_argument("--contrast-concepts", type=int, default=DEFAULTS["contrast_concepts"],
                        help="concepts whose picture and description codes meet in the contrastive term each step")
    parser.add_argument("--p-text", type=float, default=DEFAULTS["p_text"], help="share of concepts read from words")
    parser.add_argument("--min-timestep", type=int, default=DEFAULTS["min_timestep"])
    parser.add_argument("--min-snr-gamma", type=float, default=DEFAULTS["min_snr_gamma"])
    parser.add_argument("--skip-sections", nargs="*", default=["down_blocks"],
                        help="denoiser sections without an adapter (the quick preset's: down_blocks)")
    parser.add_argument("--trigger", default=TRIGGER)
    parser.add_argument("--resolution", type=int, default=None,
                        help="training resolution (default: the model's, its denoiser's sample size x the VAE's factor)")
    parser.add_argument("--eval-seeds", type=int, default=DEFAULTS["eval_seeds"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the frozen base model's weights")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="less memory for full-size models")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    command = " ".join(["python -m toyworld.train_hyperlora"]
                       + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start, cpu_start = time.time(), time.process_time()

    model_ref = resolve_model(args.model)
    family = get_family(model_ref.family)
    out = args.out or (OUT_DIR if model_ref.kind == "builtin" else None)
    if out is None:
        raise SystemExit("--out is needed for a base model other than the built-in one")
    pipe = load_pipeline(model_ref, torch_dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, family.denoiser)
    for model in (pipe.vae, denoiser, *(getattr(pipe, a) for a in family.text_encoders)):
        model.requires_grad_(False)
        model.to(args.device)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    resolution = args.resolution or denoiser.config.sample_size * pipe.vae_scale_factor  # the model's own size
    encoder_resolution = min(resolution, 256)

    t0 = time.time()
    if args.concepts is None:
        bank = toy_bank(pipe.vae, resolution, args.trigger, args.pictures, args.prior_pictures, args.seed)
        vocab = builtin_vocab()
    else:
        bank = folder_bank(pipe.vae, args.concepts, resolution, encoder_resolution)
        seen = {w for lines in bank.descriptions.values() for line in lines for w in words(line)}
        vocab = [PAD, UNKNOWN, *sorted(seen)]
    bank_seconds = time.time() - t0
    log(f"bank: {len(bank.concepts)} concepts, {sum(len(v) for v in bank.latents.values())} pictures, "
        f"{len(bank.prior_latents)} prior pictures, {bank_seconds:.0f}s")

    base = {"model": model_ref.display_name, "denoiser_sha256": model_hashes(model_ref).get("ss_new_sd_model_hash")}
    layers = adapted_layers(denoiser, tuple(args.skip_sections))
    vectors = trigger_vectors(pipe, family, args.trigger)
    config = build_config(family, denoiser, layers, args, vocab, base, encoder_resolution, vectors)
    hyper = HyperLoRA(config)
    with torch.no_grad():
        for mine, theirs in zip(hyper.trigger_embedding(), vectors):
            mine.copy_(theirs)
    log(f"hypernetwork: {sum(p.numel() for p in hyper.parameters()):,} parameters, {len(config.targets)} layers, "
        f"rank {config.rank}")
    training = train(hyper, pipe, family, bank, args, resolution)

    hyper.to("cpu")
    for model in (pipe.vae, denoiser, *(getattr(pipe, a) for a in family.text_encoders)):
        model.to("cpu")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    hyper.save(staging)
    report = {"command": command, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "params": sum(p.numel() for p in hyper.parameters()), "size_bytes": folder_size(staging),
              "bank_seconds": round(bank_seconds, 1), "training": training}
    if args.concepts is None and args.eval_seeds:
        t0 = time.time()
        seeds = list(range(1000, 1000 + args.eval_seeds))
        held = evaluate(hyper, pipe, family, HELD_OUT_CONCEPTS, seeds)
        report["evaluation"] = {"held_out": held, "held_out_mean": summary(held), "seeds": seeds,
                                "seconds": round(time.time() - t0, 1)}
        log(f"held-out mean: {json.dumps(summary(held))}")
    report["wall_seconds"] = round(time.time() - t_start, 1)
    report["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    atomic_write_text(staging / "evaluation.json", json.dumps(report, indent=1) + "\n")
    write_report(staging, report, config, bank)
    replace_folder(staging, out)
    log(f"done in {report['wall_seconds']:.0f}s; {report['size_bytes'] / 1e6:.2f} MB in {out}")
    return report


if __name__ == "__main__":
    main()
