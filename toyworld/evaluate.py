"""Read a toy-world picture back from its pixels: background colour, shape colour, shape.

Used by the tests, the benchmarks, the built-in model's training script and the UI to
check that a model draws what its prompt says. Pure numpy (no scipy, no OpenCV).

How a picture is read (64x64 RGB, other sizes are resized):

1. **Background**: the median of the two-pixel border, named by the nearest colour of
   `toyworld.COLORS`.
2. **Shape colour**: the distance of every pixel from the background colour; the pixels
   at least 3/4 as far as the farthest ones (99th percentile) are the shape's core, and
   the median of the core is named by the nearest palette colour. Using the core skips the
   blurred edge, where shape and background mix.
3. **Mask**: pixels more than half-way from the background colour to the shape colour
   (the edge of a blurred shape), largest 4-connected component.
4. **Shape**: the mask against ideal templates of every shape (same area and centroid,
   rotations searched), the best intersection-over-union wins; below `MIN_IOU` the shape
   is "unclear". Solidity (area / convex-hull area) and extent (area / bounding-box area)
   are reported too.
5. **Five points**: a generated star's points often come out uneven (one long, one
   stubby), which no single template fits, though anyone would call it a star. So the
   outline's distance from the centroid, as a function of the angle, is taken apart into
   harmonics; a five-pointed outline is the one whose 5th harmonic is the strongest and
   at least `STAR_HARMONIC` of the mean radius. Rendered circles, squares and triangles
   stay under 0.05, rendered stars over 0.1 even blurred by 2.5 px
   (tests/test_evaluate.py).

`score_prompts` generates pictures for prompts and seeds and returns per-attribute
accuracy figures.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from toyworld.world import ALL_COLORS, COLORS, EXTRA_COLORS, RESOLUTION, SHAPES, parse_caption, shape_mask, shape_polygon

PALETTE_NAMES: tuple[str, ...] = tuple(COLORS)
PALETTE = np.array([COLORS[n] for n in PALETTE_NAMES], dtype=np.float32)
# The extended world's palette and shapes (toyworld.world.EXTRA_COLORS / EXTRA_SHAPES): what
# `analyze(..., palette=EXTENDED_PALETTE, shapes=ALL_SHAPES)` reads pictures of its concepts with.
EXTENDED_PALETTE: tuple[str, ...] = PALETTE_NAMES + tuple(EXTRA_COLORS)

MIN_CONTRAST = 48.0   # RGB distance: weaker than this, there is no shape in the picture
MIN_AREA = 12         # pixels: a smaller mask is noise, not a shape
MIN_IOU = 0.72        # best template IoU below this: the shape is "unclear"
STAR_HARMONIC = 0.1   # 5th harmonic of the outline, relative to its mean radius: a star
UNCLEAR = "unclear"
NONE = "none"

# Template rotations searched per shape (degrees): one period of its symmetry, 6-degree steps.
_PERIOD = {"circle": 0, "square": 90, "triangle": 360, "star": 72, "heart": 360, "cross": 90, "moon": 360}
_ROT_STEP = 6.0


@dataclass
class Analysis:
    """What the evaluator read from one picture."""

    background: str
    color: str
    shape: str
    background_rgb: tuple[float, float, float]
    color_rgb: tuple[float, float, float] | None
    area: int
    solidity: float
    extent: float
    iou: dict[str, float] = field(default_factory=dict)
    harmonics: list[float] = field(default_factory=list)  # outline harmonics 1..8 (radial_harmonics)

    def to_dict(self) -> dict:
        return asdict(self)


def nearest_color(rgb: Sequence[float], names: Sequence[str] = PALETTE_NAMES) -> str:
    """The palette colour name nearest to `rgb` (Euclidean distance in RGB, 0-255)."""
    table = np.array([ALL_COLORS[n] for n in names], dtype=np.float32)
    d = np.linalg.norm(table - np.asarray(rgb, dtype=np.float32)[None], axis=1)
    return names[int(np.argmin(d))]


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255)
        if arr.shape[:2] != (RESOLUTION, RESOLUTION):
            return _as_array(Image.fromarray(arr.astype(np.uint8)))
        return arr.astype(np.float32)[..., :3]
    image = image.convert("RGB")
    if image.size != (RESOLUTION, RESOLUTION):
        image = image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (labels propagated as the
    minimum over neighbours until stable; pure numpy)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        nb = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                padded[1:-1, :-2], padded[1:-1, 2:]])
        nb = np.where(mask, nb, big)
        if np.array_equal(nb, labels):
            break
        labels = nb
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[int(np.argmax(counts))]


def convex_hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixels (as unit squares), monotone chain."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    pts = np.unique(corners, axis=0)  # sorted by x then y
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    if len(pts) < 3:
        return 0.0

    def half(points: np.ndarray) -> list:
        chain: list = []
        for p in points:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) <= 0:
                    chain.pop()
                else:
                    break
            chain.append((int(p[0]), int(p[1])))
        return chain

    lower, upper = half(pts), half(pts[::-1])
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _polygon_area_centroid(poly: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    cx = ((x + x1) * cross).sum() / (6 * area)
    cy = ((y + y1) * cross).sum() / (6 * area)
    return abs(float(area)), np.array([cx, cy])


def template_ious(mask: np.ndarray, shapes: Sequence[str] = SHAPES) -> dict[str, float]:
    """For each shape, the best IoU between `mask` and that shape drawn with the mask's
    area and centroid, over rotations."""
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5])  # pixel centres at +0.5
    result = {}
    for shape in shapes:
        unit_area, unit_centroid = _polygon_area_centroid(shape_polygon(shape, 0.0, 0.0, 1.0))
        size = math.sqrt(area / unit_area)
        period = _PERIOD[shape]
        angles = np.arange(0.0, period, _ROT_STEP) if period else np.array([0.0])
        best = 0.0
        for angle in angles:
            theta = math.radians(angle)
            c, s = math.cos(theta), math.sin(theta)
            offset = np.array([c * unit_centroid[0] + s * unit_centroid[1],
                               -s * unit_centroid[0] + c * unit_centroid[1]]) * size
            cx, cy = centroid - offset
            tmpl = shape_mask(shape, cx, cy, size, angle, supersample=2) >= 0.5
            inter = np.logical_and(tmpl, mask).sum()
            union = np.logical_or(tmpl, mask).sum()
            best = max(best, float(inter / union) if union else 0.0)
        result[shape] = best
    return result


def radial_harmonics(mask: np.ndarray, bins: int = 90, count: int = 8) -> np.ndarray:
    """Amplitudes of harmonics 1..`count` of the outline's radius around the centroid (the
    farthest outline pixel per angle bin), relative to the mean radius. Rotation does not
    change them; a shape with k-fold symmetry has a strong k-th harmonic."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    ey, ex = np.nonzero(mask & ~inner)
    angle_bin = ((np.arctan2(ey - cy, ex - cx) + np.pi) / (2 * np.pi) * bins).astype(int) % bins
    radius = np.full(bins, -1.0)
    np.maximum.at(radius, angle_bin, np.hypot(ex - cx, ey - cy))
    filled = np.nonzero(radius >= 0)[0]
    radius = np.interp(np.arange(bins), filled, radius[filled], period=bins)
    spectrum = np.abs(np.fft.rfft(radius / radius.mean())) * 2 / bins
    return spectrum[1:count + 1]


def _five_pointed(harmonics: np.ndarray) -> bool:
    """The 5th harmonic dominates harmonics 2..8 (the 1st only says the centroid is off)."""
    return harmonics[4] >= STAR_HARMONIC and harmonics[4] == harmonics[1:].max()


def analyze(image: Image.Image | np.ndarray, palette: Sequence[str] = PALETTE_NAMES,
            shapes: Sequence[str] = SHAPES) -> Analysis:
    """Name the background colour, the shape's colour and the shape of a toy-world picture,
    colours from `palette` and shapes from `shapes` (the base world's by default; the extended
    world's: EXTENDED_PALETTE, ALL_SHAPES). `color` and `shape` are "none" when nothing stands
    out from the background; `shape` is "unclear" when the mask fits no template well."""
    px = _as_array(image)
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3),
                             px[2:-2, :2].reshape(-1, 3), px[2:-2, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb, palette)
    dist = np.linalg.norm(px - bg_rgb[None, None], axis=2)
    far = float(np.percentile(dist, 99))
    if far < MIN_CONTRAST:
        return Analysis(background, NONE, NONE, tuple(map(float, bg_rgb)), None, 0, 0.0, 0.0)
    core = dist >= 0.75 * far
    fg_rgb = np.median(px[core], axis=0)
    color = nearest_color(fg_rgb, palette)
    contrast = float(np.linalg.norm(fg_rgb - bg_rgb))
    mask = largest_component(dist >= 0.5 * contrast)
    area = int(mask.sum())
    if area < MIN_AREA:
        return Analysis(background, color, NONE, tuple(map(float, bg_rgb)),
                        tuple(map(float, fg_rgb)), area, 0.0, 0.0)
    ys, xs = np.nonzero(mask)
    extent = area / float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    hull = convex_hull_area(mask)
    solidity = area / hull if hull else 0.0
    ious = template_ious(mask, shapes)
    harmonics = radial_harmonics(mask)
    best = max(ious, key=ious.get)
    if "star" in shapes and _five_pointed(harmonics):
        shape = "star"
    else:
        shape = best if ious[best] >= MIN_IOU else UNCLEAR
    return Analysis(background, color, shape, tuple(map(float, bg_rgb)), tuple(map(float, fg_rgb)),
                    area, float(solidity), float(extent), ious, [round(float(h), 4) for h in harmonics])


# ----------------------------------------------------------------------------- scoring

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0

GenerateFn = Callable[[Sequence[str], Sequence[int]], Sequence[Image.Image]]


def pipeline_generate_fn(pipe: Any, steps: int = DEFAULT_STEPS,
                         guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 16) -> GenerateFn:
    """A batched generate function over a diffusers pipeline: one torch.Generator per
    (prompt, seed), so a picture does not depend on the batch it was drawn in."""
    import torch

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        images: list[Image.Image] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
            out = pipe(chunk, generator=gens, num_inference_steps=steps, guidance_scale=guidance_scale,
                       height=RESOLUTION, width=RESOLUTION, output_type="pil")
            images.extend(out.images)
        return images

    return generate


def score_images(images: Sequence[Image.Image], prompts: Sequence[str],
                 seeds: Sequence[int] | None = None) -> dict:
    """Figures for already generated pictures, one per prompt (see `score_prompts`)."""
    records = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        expected = parse_caption(prompt)
        got = analyze(image)
        predicted = {"shape": got.shape, "color": got.color, "background": got.background}
        records.append({"prompt": prompt, "seed": None if seeds is None else int(seeds[i]),
                        "expected": expected, "predicted": predicted,
                        "iou": {k: round(v, 3) for k, v in got.iou.items()}})
    return summarize(records)


def summarize(records: list[dict]) -> dict:
    """Accuracy per attribute (over the records whose prompt names it), per attribute
    value, for all named attributes right at once, and confusion tables
    {attribute: {expected: {read: count}}}."""
    figures: dict[str, Any] = {"n_images": len(records), "accuracy": {}, "count": {},
                               "per_value": {}, "records": records}
    for attr in ("color", "background", "shape"):
        hits = [r["predicted"][attr] == r["expected"][attr] for r in records if r["expected"][attr]]
        figures["count"][attr] = len(hits)
        figures["accuracy"][attr] = float(np.mean(hits)) if hits else None
        per: dict[str, list[bool]] = {}
        for r in records:
            if r["expected"][attr]:
                per.setdefault(r["expected"][attr], []).append(r["predicted"][attr] == r["expected"][attr])
        figures["per_value"][attr] = {k: float(np.mean(v)) for k, v in sorted(per.items())}
    figures["confusion"] = {}
    for attr in ("color", "background", "shape"):
        table: dict[str, dict[str, int]] = {}
        for r in records:
            if r["expected"][attr]:
                row = table.setdefault(r["expected"][attr], {})
                row[r["predicted"][attr]] = row.get(r["predicted"][attr], 0) + 1
        figures["confusion"][attr] = {k: dict(sorted(v.items())) for k, v in sorted(table.items())}
    all_right = [all(r["predicted"][a] == r["expected"][a] for a in ("color", "background", "shape")
                     if r["expected"][a]) for r in records]
    figures["accuracy"]["all"] = float(np.mean(all_right)) if all_right else None
    return figures


def score_prompts(pipe_or_generate_fn: Any, prompts: Iterable[str], seeds: Iterable[int], *,
                  steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                  batch_size: int = 16) -> dict:
    """Generate every prompt with every seed and read the pictures back.

    `pipe_or_generate_fn` is a diffusers pipeline (DDIM, `steps`, `guidance_scale`) or a
    function `(prompts, seeds) -> images`. Returns {"n_images", "accuracy": {"color",
    "background", "shape", "all"}, "count", "per_value", "records"}; an attribute the
    prompt does not name is not scored. Also "confusion" (see `summarize`) and "settings".
    """
    prompts, seeds = list(prompts), list(seeds)
    pairs = [(p, s) for p in prompts for s in seeds]
    all_prompts = [p for p, _ in pairs]
    all_seeds = [s for _, s in pairs]
    if hasattr(pipe_or_generate_fn, "unet"):
        generate = pipeline_generate_fn(pipe_or_generate_fn, steps, guidance_scale, batch_size)
    else:
        generate = pipe_or_generate_fn
    images = list(generate(all_prompts, all_seeds))
    figures = score_images(images, all_prompts, all_seeds)
    figures["settings"] = {"steps": steps, "guidance_scale": guidance_scale,
                           "seeds": seeds, "n_prompts": len(prompts)}
    return figures


def format_figures(figures: dict) -> str:
    """One line: 'color 98.6% background 100.0% shape 84.7% all 83.3% (n=144)'."""
    acc = figures["accuracy"]
    parts = [f"{k} {100 * acc[k]:.1f}%" for k in ("color", "background", "shape", "all")
             if acc.get(k) is not None]
    return " ".join(parts) + f" (n={figures['n_images']})"


__all__ = ["EXTENDED_PALETTE", "Analysis", "analyze", "convex_hull_area", "format_figures", "largest_component",
           "nearest_color", "pipeline_generate_fn", "score_images", "score_prompts",
           "summarize", "template_ious"]
