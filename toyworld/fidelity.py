"""Fidelity of training on the built-in toy model, measured from pixels (toyworld.evaluate):

- concept: a DreamBooth LoRA from the demo dataset makes "sks" a purple star, which the
  base model never saw, while prompts without the trigger keep the base model's accuracy;
- composition: one LoRA teaching a colour and one teaching a shape, used together,
  give pictures with both.

LoRA vs T-LoRA from one picture is bench/tlora_single_image.py.

Used by tests/test_fidelity.py (few seeds) and `python -m bench.fidelity` (more seeds).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio import PRESETS_DIR
from toyworld.evaluate import analyze, score_images
from toyworld.world import (DEMO_CLASS_WORD, DEMO_IMAGES, DEMO_MAX_SIZE, DEMO_MIN_SIZE, SEEN_SHAPE_COLORS, SEEN_SHAPES,
                             render_scene, sample_scene, write_reg_images)

log = logging.getLogger(__name__)

COLOR_TRIGGER, SHAPE_TRIGGER = "zwx", "ohwx"
# The composition's colour adapter is a light attention-only LoRA (the shape adapter is the
# preset's LoCon): the text carries a colour in through cross-attention, and a LoCon colour
# adapter's conv deltas fight the shape adapter's outlines (75% purple stars together,
# against 88-92% with this one). 800 steps, not 400: at 400 one training seed in three left
# the stars on black pink-red (67%; bench/RESULTS.md).
COLOR_ADAPTER = {"type": "lora", "rank": 4, "alpha": 4.0}
COLOR_STEPS = 800
NEUTRAL = ("white", "black", "gray")


@dataclass(frozen=True)
class Target:
    color: str | None = None
    shape: str | None = None
    background: str | None = None

    def matches(self, image) -> dict[str, bool]:
        got = analyze(image)
        return {attr: getattr(got, attr) == want for attr in ("color", "shape", "background")
                if (want := getattr(self, attr)) is not None}


def match_rates(images, target: Target) -> dict[str, float]:
    """Share of images whose colour / shape / background is the target's, and all at once."""
    checks = [target.matches(image) for image in images]
    rates = {attr: float(np.mean([c[attr] for c in checks])) for attr in checks[0]}
    rates["all"] = float(np.mean([all(c.values()) for c in checks]))
    return rates


def write_concept_dataset(folder: Path, kind: str, *, count: int = DEMO_IMAGES, seed: int = 0,
                          trigger: str = "", color: str = "", shape: str = "") -> Path:
    """Pictures teaching one attribute under a trigger word: kind "color" (purple shapes of
    every seen shape, captioned 'a zwx <shape> ...') or "shape" (stars of seen colours,
    captioned 'a ohwx shape ...' like the demo's 'a sks shape ...': trigger and class word,
    the colour unnamed) or "object" (`color` `shape`s captioned 'a <trigger> shape ...', as
    the demo's), with the demo dataset's regularisation pictures. Upright and sized
    like the demo's stars: the base model never saw a rotated shape."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        background = (NEUTRAL[i % len(NEUTRAL)],)
        if kind == "color":
            scene = sample_scene(rng, shapes=(SEEN_SHAPES[i % len(SEEN_SHAPES)],), colors=("purple",),
                                 backgrounds=background, min_size=DEMO_MIN_SIZE, max_size=DEMO_MAX_SIZE)
            caption = f"a {COLOR_TRIGGER} {scene.shape} on a {scene.background} background"
        elif kind == "shape":
            scene = sample_scene(rng, shapes=("star",), colors=(SEEN_SHAPE_COLORS[i % len(SEEN_SHAPE_COLORS)],),
                                 backgrounds=background, min_size=DEMO_MIN_SIZE, max_size=DEMO_MAX_SIZE)
            caption = f"a {SHAPE_TRIGGER} {DEMO_CLASS_WORD} on a {scene.background} background"
        elif kind == "object":
            scene = sample_scene(rng, shapes=(shape,), colors=(color,), backgrounds=background,
                                 min_size=DEMO_MIN_SIZE, max_size=DEMO_MAX_SIZE)
            caption = f"a {trigger} {DEMO_CLASS_WORD} on a {scene.background} background"
        else:
            raise ValueError(kind)
        render_scene(scene).save(folder / f"{kind}_{i}.png")
        (folder / f"{kind}_{i}.txt").write_text(caption)
    write_reg_images(folder)
    return folder


def demo_config(*, name: str, preset: str = "tiny-demo", dataset: Path | None = None, steps: int | None = None,
                model: str = "builtin", learning_rate: float | None = None, prior_preservation: bool = True,
                seed: int | None = None, **network):
    """A demo preset's config (tiny-demo, or tiny-demo-quick; optionally on another dataset /
    step count / learning rate / network / base model / seed, or without its prior
    preservation), with no checkpoints or sample pictures: what the benches train."""
    from studio.config import load_config, network_config

    config = load_config(PRESETS_DIR / f"{preset}.toml")
    config.name = name
    config.base_model = model
    if seed is not None:
        config.seed = seed
    if steps is not None:
        config.training.max_steps = steps
    if learning_rate is not None:
        config.training.learning_rate = learning_rate
    if not prior_preservation:
        config.dataset.num_class_images = 0
    config.checkpoints.every_n_steps = 0
    config.sampling.every_n_steps = 0
    config.sampling.prompts = []
    if dataset is not None:
        config.dataset.path = str(dataset)
        config.dataset.trigger_word = ""
    config.network = network_config(like=config.network, **network)
    return config


def train(workspace, **settings) -> Path:
    """Train `demo_config(**settings)` in-process; returns the adapter file."""
    from studio.jobs.runs import create_run
    from trainers.run import train_run

    return train_run(create_run(demo_config(**settings), workspace), show_progress=False)


def generate(engine, prompts: list[str], seeds: list[int], adapters=(), model: str = "builtin") -> list:
    from studio.generation.engine import GenerateRequest

    images = []
    for prompt in prompts:
        for seed in seeds:
            images += engine.generate(GenerateRequest(prompt=prompt, model=model, seed=seed, adapters=list(adapters)))
    return images


PRIOR_PROMPTS = [f"a {c} {s} on a {b} background" for c, s, b in (
    ("red", "circle", "white"), ("blue", "square", "black"), ("yellow", "triangle", "gray"), ("green", "circle", "blue"))]


def prior_pictures(engine, seeds: list[int], adapters=(), model: str = "builtin") -> list:
    """PRIOR_PROMPTS (none names a trigger) x `seeds`, in that order."""
    return generate(engine, PRIOR_PROMPTS, seeds, adapters, model)


def paired_prior(base_pictures: list, kept_pictures: list) -> dict:
    """The prior prompts' pictures without and with an adapter, pair by pair (same prompt and
    seed): `same`, the share whose colour, shape and background read the same; `outline`, how
    well the kept picture's shape still fits the template of the base picture's shape (its
    IoU with the best-placed template), as a share of the base's own fit, mean and lowest
    (`lowest_outline`) over the pairs whose base shape reads as one. A shape may move with the
    adapter (the sampler's path changes); its outline should not bend: a circle drawn as a lumpy
    pentagon still reads "circle" but fits the circle template less."""
    same, outline = [], []
    for base, kept in zip(base_pictures, kept_pictures, strict=True):
        a, b = analyze(base), analyze(kept)
        same.append((a.color, a.shape, a.background) == (b.color, b.shape, b.background))
        if a.iou.get(a.shape):
            outline.append(b.iou.get(a.shape, 0.0) / a.iou[a.shape])
    return {"same": float(np.mean(same)), "outline": float(np.mean(outline)),
            "lowest_outline": float(np.min(outline))}


def concept_figures(engine, adapter: Path, seeds: list[int], model: str = "builtin",
                    base_pictures: list | None = None) -> dict:
    """Trigger prompts -> purple stars; prompts without the trigger keep the base model's
    accuracy and pictures (`base_pictures`: prior_pictures of the base model with these
    seeds, when already drawn)."""
    from studio.generation.engine import AdapterUse

    with_lora = [AdapterUse(adapter, 1.0)]
    triggered = [f"a sks shape on a {b} background" for b in NEUTRAL]
    concept = match_rates(generate(engine, triggered, seeds, with_lora, model), Target("purple", "star"))
    base = base_pictures if base_pictures is not None else prior_pictures(engine, seeds, (), model)
    kept = prior_pictures(engine, seeds, with_lora, model)
    prompts = [prompt for prompt in PRIOR_PROMPTS for _ in seeds]
    return {"concept": concept, "prior_base": score_images(base, prompts)["accuracy"],
            "prior_with_lora": score_images(kept, prompts)["accuracy"], "prior_paired": paired_prior(base, kept)}


def composition_figures(engine, color_adapter: Path, shape_adapter: Path, seeds: list[int],
                        model: str = "builtin") -> dict:
    """A colour LoRA and a shape LoRA at weight 1 each: pictures with both attributes."""
    from studio.generation.engine import AdapterUse

    prompts = [f"a {COLOR_TRIGGER} {SHAPE_TRIGGER} {DEMO_CLASS_WORD} on a {b} background" for b in NEUTRAL]
    both = [AdapterUse(color_adapter, 1.0), AdapterUse(shape_adapter, 1.0)]
    return {
        "both": match_rates(generate(engine, prompts, seeds, both, model), Target("purple", "star")),
        "color_only": match_rates(generate(engine, [f"a {COLOR_TRIGGER} circle on a {b} background" for b in NEUTRAL],
                                           seeds, both[:1], model), Target("purple", "circle")),
        "shape_only": match_rates(generate(engine, [f"a red {SHAPE_TRIGGER} {DEMO_CLASS_WORD} on a {b} background"
                                                    for b in NEUTRAL], seeds, both[1:], model), Target("red", "star")),
    }
