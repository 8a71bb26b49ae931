"""The toy world: flat shapes on plain backgrounds, drawn procedurally with captions.

The built-in tiny base model is trained on this world (toyworld/builtin_training.py), the
evaluator (toyworld/evaluate.py) reads its images back, and the demo dataset is drawn from it.

A scene is one shape (circle, square, triangle or star) of one colour on a plain
background, at a random position and size. Two attributes are **held out** of the base
model's UNet training entirely: the colour ``purple`` and the shape ``star``. The
functions here can still draw them (for the demo dataset and for evaluation); only the
base-training sampler (`sample_scene` with its defaults) never produces them, so a LoRA
that teaches "purple star" teaches something the base model has never seen.

The **extended world** adds colours (`EXTRA_COLORS`: orange, pink, cyan, brown) and shapes
(`EXTRA_SHAPES`: heart, cross, moon) that neither the base model's training nor the demo
ever draws; the instant-adapter hypernetwork (toyworld/train_hyperlora.py) learns from
concepts drawn with them. `COLORS` and `SHAPES` (what the base model's sampler, the VAE's
data and the evaluator's default palette use) are unchanged, so every scene, caption and
pixel drawn before is drawn the same.

Everything is deterministic: a scene comes from a `numpy.random.Generator`, and the same
seed gives the same scenes, captions and pixels.

    >>> rng = np.random.default_rng(0)
    >>> scene = sample_scene(rng)
    >>> image = render_scene(scene)          # 64x64 RGB PIL image
    >>> caption_for(scene)                   # e.g. 'a red circle on a blue background'
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from studio import ASSETS_DIR
from studio.errors import StudioError

RESOLUTION = 64
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: clean anti-aliased edges

# Colour table (RGB, 0-255). Names are single words of the built-in tokenizer's vocabulary.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 210, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

SHAPE_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "red", "green", "blue", "yellow")

HELD_OUT_COLORS: tuple[str, ...] = ("purple",)
HELD_OUT_SHAPES: tuple[str, ...] = ("star",)
SEEN_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
SEEN_SHAPE_COLORS: tuple[str, ...] = tuple(c for c in SHAPE_COLORS if c not in HELD_OUT_COLORS)
SEEN_BACKGROUNDS: tuple[str, ...] = tuple(b for b in BACKGROUNDS if b not in HELD_OUT_COLORS)

# Size = side of the shape's (unrotated) bounding box, in pixels of the 64x64 image.
MIN_SIZE = 22
MAX_SIZE = 44
MARGIN = 2  # pixels kept free between the shape's bounding box and the image border

STAR_INNER_RATIO = 0.45  # inner / outer radius of the five-pointed star

# The extended world (see the module docstring): RGB at least 100 apart from every colour above.
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {
    "orange": (245, 130, 20),
    "pink": (245, 130, 190),
    "cyan": (40, 200, 210),
    "brown": (120, 70, 30),
}
EXTRA_SHAPES: tuple[str, ...] = ("heart", "cross", "moon")
ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **EXTRA_COLORS}
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES
CROSS_ARM = 1 / 3  # arm width of the cross, in units of its side
MOON_INNER = (0.35, 0.42)  # the moon is a disc of radius 0.5 less a disc of this (offset, radius)


@dataclass(frozen=True)
class Scene:
    """One toy-world picture. `cx, cy` is the centre of the shape's bounding box and
    `size` its side (pixels, float); `rotation` in degrees, counter-clockwise."""

    shape: str
    color: str
    background: str
    cx: float
    cy: float
    size: float
    rotation: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _check(name: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise StudioError(f"Unknown {name} {value!r}: use one of {', '.join(allowed)}.")


def shape_polygon(shape: str, cx: float, cy: float, size: float, rotation: float = 0.0,
                  points: int = 96) -> np.ndarray:
    """Vertices (N x 2, x right / y down, pixels) of `shape`, its bounding box of side
    `size` centred on (cx, cy) before rotating by `rotation` degrees about that centre.
    A circle is returned as a `points`-gon (used by the evaluator's templates)."""
    _check("shape", shape, ALL_SHAPES)
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, points, endpoint=False)
        unit = np.stack([np.cos(t), np.sin(t)], axis=1) * 0.5
    elif shape == "square":
        unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif shape == "triangle":  # upright isosceles triangle filling its bounding box
        unit = np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif shape == "star":  # five-pointed star, a point up, then scaled to a unit bounding box
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
        unit = _fit_unit_box(np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1))
    else:
        unit = _extra_unit_polygon(shape, points)
    theta = math.radians(rotation)
    rot = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    return unit @ rot.T * size + np.array([cx, cy])


def _fit_unit_box(points: np.ndarray) -> np.ndarray:
    """`points` centred on their bounding box, the box's longer side scaled to 1."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - (lo + hi) / 2) / (hi - lo).max()


def _extra_unit_polygon(shape: str, points: int) -> np.ndarray:
    """The extended world's shapes in a unit bounding box: a heart (the classic parametric
    curve, point down), a plus-shaped cross, a moon (crescent, open to the right)."""
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, points, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return _fit_unit_box(np.stack([x, y], axis=1))
    if shape == "cross":
        a = CROSS_ARM / 2
        return np.array([[-a, -0.5], [a, -0.5], [a, -a], [0.5, -a], [0.5, a], [a, a], [a, 0.5], [-a, 0.5],
                         [-a, a], [-0.5, a], [-0.5, -a], [-a, -a]])
    offset, inner = MOON_INNER  # outer arc from one crossing of the two circles round the left to the other
    x = (offset ** 2 + 0.25 - inner ** 2) / (2 * offset)
    y = math.sqrt(0.25 - x ** 2)
    start, inner_start = math.atan2(y, x), math.atan2(y, x - offset)
    outer = np.linspace(start, 2 * np.pi - start, points // 2)
    back = np.linspace(2 * np.pi - inner_start, inner_start, points // 2)[1:-1]
    rim = np.stack([np.cos(outer), np.sin(outer)], axis=1) * 0.5
    hollow = np.stack([offset + np.cos(back) * inner, np.sin(back) * inner], axis=1)
    return _fit_unit_box(np.concatenate([rim, hollow]))


def shape_mask(shape: str, cx: float, cy: float, size: float, rotation: float = 0.0,
               resolution: int = RESOLUTION, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage of the shape per pixel, float32 in [0, 1], shape (resolution, resolution)."""
    big = resolution * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    s = supersample
    if shape == "circle":
        r = size / 2
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s - 1, (cy + r) * s - 1], fill=255)
    else:
        poly = shape_polygon(shape, cx, cy, size, rotation) * s
        draw.polygon([tuple(p) for p in poly], fill=255)
    small = canvas.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(shape: str, color: str | tuple[int, int, int], background: str | tuple[int, int, int],
           cx: float = RESOLUTION / 2, cy: float = RESOLUTION / 2, size: float = 32,
           rotation: float = 0.0, resolution: int = RESOLUTION) -> Image.Image:
    """Draw one flat shape on a plain background. Colours are names from `COLORS` or RGB
    tuples (the VAE's training also uses random RGB colours)."""
    fg = np.array(ALL_COLORS[color] if isinstance(color, str) else color, dtype=np.float32)
    bg = np.array(ALL_COLORS[background] if isinstance(background, str) else background, dtype=np.float32)
    cover = shape_mask(shape, cx, cy, size, rotation, resolution)[..., None]
    pixels = bg * (1 - cover) + fg * cover
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def render_scene(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    return render(scene.shape, scene.color, scene.background, scene.cx, scene.cy,
                  scene.size, scene.rotation, resolution)


def sample_scene(rng: np.random.Generator,
                 shapes: Sequence[str] = SEEN_SHAPES,
                 colors: Sequence[str] = SEEN_SHAPE_COLORS,
                 backgrounds: Sequence[str] = SEEN_BACKGROUNDS,
                 min_size: float = MIN_SIZE, max_size: float = MAX_SIZE,
                 max_rotation: float = 0.0) -> Scene:
    """A random scene. The defaults are the base-training distribution: seen shapes and
    colours only (never purple, never star). Shape colour and background always differ."""
    for name, values, table in (("shape", shapes, ALL_SHAPES), ("color", colors, ALL_COLORS),
                                ("background", backgrounds, ALL_COLORS)):
        if not values:
            raise StudioError(f"No {name}s to sample from: pass at least one.")
        for value in values:
            _check(name, value, table)
    shape = shapes[int(rng.integers(len(shapes)))]
    color = colors[int(rng.integers(len(colors)))]
    choices = [b for b in backgrounds if b != color]
    if not choices:
        raise StudioError(f"Every background equals the shape colour {color!r}: add another background.")
    background = choices[int(rng.integers(len(choices)))]
    size = float(rng.uniform(min_size, max_size))
    lo, hi = size / 2 + MARGIN, RESOLUTION - size / 2 - MARGIN
    cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    rotation = float(rng.uniform(-max_rotation, max_rotation)) if max_rotation else 0.0
    return Scene(shape, color, background, cx, cy, size, rotation)


def caption_for(scene: Scene, *, background: bool = True, color: bool = True,
                shape_word: str | None = None) -> str:
    """The caption of a scene: "a red circle on a blue background". Leave out the
    background or the colour, or name the shape with another word (e.g. "shape")."""
    shape = shape_word or scene.shape
    words = ["a"] + ([scene.color] if color else []) + [shape]
    if background:
        words += ["on", "a", scene.background, "background"]
    return " ".join(words)


# Caption dropout for base training (see the toy-world prototype notes): the model also
# learns the generic word "shape", prompts without background or colour, and the empty
# prompt that classifier-free guidance needs.
P_EMPTY = 0.10
P_NO_BACKGROUND = 0.25
P_SHAPE_WORD = 0.15
P_NO_COLOR = 0.10


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption with the base-training dropout: 10% empty, else 25% without background,
    15% "shape" instead of the shape's name, 10% without the colour."""
    if rng.random() < P_EMPTY:
        return ""
    no_bg = rng.random() < P_NO_BACKGROUND
    generic = rng.random() < P_SHAPE_WORD
    no_color = rng.random() < P_NO_COLOR
    return caption_for(scene, background=not no_bg, color=not no_color,
                       shape_word="shape" if generic else None)


def parse_caption(caption: str) -> dict[str, str | None]:
    """The attributes a caption asks for: {"shape", "color", "background"}, None where
    the caption does not say. "a red circle on a blue background" -> circle/red/blue;
    a colour word after "on" belongs to the background."""
    words = caption.lower().replace(",", " ").split()
    if "on" in words:
        cut = words.index("on")
        head, tail = words[:cut], words[cut + 1:]
    else:
        head, tail = words, []
    shape = next((w for w in head if w in SHAPES), None)
    color = next((w for w in head if w in COLORS), None)
    background = next((w for w in tail if w in COLORS), None)
    return {"shape": shape, "color": color, "background": background}


def seen_prompts() -> list[str]:
    """Every full prompt over seen attributes (72): colour x shape x background, the
    background never equal to the colour. Used by the evaluation."""
    return [f"a {c} {s} on a {b} background"
            for s in SEEN_SHAPES for c in SEEN_SHAPE_COLORS for b in SEEN_BACKGROUNDS if b != c]


def held_out_prompts() -> list[str]:
    """Prompts that use a held-out attribute: purple shapes, stars of seen colours, and
    purple stars, on the neutral backgrounds."""
    neutral = ("white", "black", "gray")
    prompts = [f"a purple {s} on a {b} background" for s in SEEN_SHAPES for b in neutral]
    prompts += [f"a {c} star on a {b} background" for c in SEEN_SHAPE_COLORS for b in neutral]
    prompts += [f"a purple star on a {b} background" for b in neutral]
    return prompts


# The demo dataset: twelve pictures of one new concept (a purple star, which the base model
# never saw) for DreamBooth with the trigger word "sks". The captions name the trigger,
# the class word the base model knows ("shape") and the background, never "purple" or
# "star": the adapter must put the purple star into "sks". Beside them, in `reg/`, are
# regularisation pictures of the world the base model knows, with their own captions, as
# kohya's reg folders hold: prior preservation then keeps every other prompt as it was.
DEMO_TRIGGER = "sks"
DEMO_CLASS_WORD = "shape"
DEMO_BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "yellow", "green", "blue", "red")
DEMO_IMAGES = 12
DEMO_MIN_SIZE, DEMO_MAX_SIZE = 30, 44  # the demo stars' sizes, shared by toyworld.fidelity's concept pictures
DEMO_REG_IMAGES = 24
DEMO_SEED = 1234
PROJECT_DEMO_DIR = ASSETS_DIR / "demo-dataset"


def demo_scenes(seed: int = DEMO_SEED, count: int = DEMO_IMAGES) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, shapes=("star",), colors=("purple",),
                         backgrounds=(DEMO_BACKGROUNDS[i % len(DEMO_BACKGROUNDS)],),
                         min_size=DEMO_MIN_SIZE, max_size=DEMO_MAX_SIZE)
            for i in range(count)]


def demo_caption(scene: Scene) -> str:
    return f"a {DEMO_TRIGGER} {DEMO_CLASS_WORD} on a {scene.background} background"


def _write_png(path: Path, image: Image.Image) -> None:
    import io

    from studio.fsutil import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    atomic_write_bytes(path, buffer.getvalue())


def write_reg_images(folder: str | Path, count: int = DEMO_REG_IMAGES, seed: int = DEMO_SEED) -> list[Path]:
    """Write `count` regularisation pictures (seen shapes, colours and backgrounds, full
    captions) into `folder`/reg; returns the image paths."""
    from studio.fsutil import atomic_write_text

    reg = Path(folder) / "reg"
    reg.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    paths = []
    for i in range(count):
        scene = sample_scene(rng)
        path = reg / f"prior_{i + 1:02d}.png"
        _write_png(path, render_scene(scene))
        atomic_write_text(path.with_suffix(".txt"), caption_for(scene) + "\n")
        paths.append(path)
    return paths


def write_demo_dataset(folder: str | Path, seed: int = DEMO_SEED) -> list[Path]:
    """Write the demo images (purple stars, PNG, 64x64) with same-stem .txt captions into
    `folder`, and its regularisation pictures into `folder`/reg; returns every image path.
    Same seed, same bytes."""
    from studio.fsutil import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(demo_scenes(seed)):
        path = folder / f"sks_{i + 1:02d}.png"
        _write_png(path, render_scene(scene))
        atomic_write_text(path.with_suffix(".txt"), demo_caption(scene) + "\n")
        paths.append(path)
    return paths + write_reg_images(folder, seed=seed)


def random_color_scene(rng: np.random.Generator) -> tuple[str, tuple[int, int, int], tuple[int, int, int], float, float, float, float]:
    """A scene with random RGB colours and any shape (stars included): extra data for the
    VAE, so it learns to carry colours and shapes outside the captioned world. Returns
    (shape, fg_rgb, bg_rgb, cx, cy, size, rotation)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    while True:
        fg = tuple(int(v) for v in rng.integers(0, 256, 3))
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        if np.linalg.norm(np.subtract(fg, bg)) > 80:
            break
    size = float(rng.uniform(14, 52))
    lo, hi = size / 2, RESOLUTION - size / 2
    cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    rotation = float(rng.uniform(-45, 45)) if rng.random() < 0.5 else 0.0
    return shape, fg, bg, cx, cy, size, rotation


__all__ = [
    "ALL_COLORS", "ALL_SHAPES", "BACKGROUNDS", "COLORS", "EXTRA_COLORS", "EXTRA_SHAPES", "HELD_OUT_COLORS", "HELD_OUT_SHAPES", "RESOLUTION", "SHAPES",
    "SHAPE_COLORS", "SEEN_BACKGROUNDS", "SEEN_SHAPES", "SEEN_SHAPE_COLORS", "Scene",
    "caption_for", "demo_caption", "demo_scenes", "held_out_prompts", "parse_caption",
    "random_color_scene", "render", "render_scene", "sample_scene", "seen_prompts",
    "shape_mask", "shape_polygon", "PROJECT_DEMO_DIR", "training_caption", "write_demo_dataset",
    "write_reg_images",
]


if __name__ == "__main__":  # python -m toyworld.world [FOLDER]: (re)write the demo dataset
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROJECT_DEMO_DIR
    for path in write_demo_dataset(target):
        print(path, "-", path.with_suffix(".txt").read_text().strip())
