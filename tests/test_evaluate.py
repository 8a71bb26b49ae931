"""The evaluator reads toy-world pictures back: right on clean renders, robust to blur and noise."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from toyworld import evaluate as ev
from toyworld import world as tw


def _all_scenes(seed: int, n: int, rotate: bool = False) -> list[tw.Scene]:
    rng = np.random.default_rng(seed)
    return [tw.sample_scene(rng, shapes=tw.SHAPES, colors=tw.SHAPE_COLORS, backgrounds=tw.BACKGROUNDS,
                            max_rotation=30.0 if rotate else 0.0) for _ in range(n)]


def _accuracy(scenes, images) -> dict[str, float]:
    reads = [ev.analyze(im) for im in images]
    return {attr: float(np.mean([getattr(r, attr) == getattr(s, attr) for r, s in zip(reads, scenes)]))
            for attr in ("color", "background", "shape")}


def test_clean_renders_read_exactly_including_held_out():
    scenes = _all_scenes(0, 60, rotate=True)
    assert {"purple", "red"} <= {s.color for s in scenes} and "star" in {s.shape for s in scenes}
    assert _accuracy(scenes, [tw.render_scene(s) for s in scenes]) == {"color": 1.0, "background": 1.0, "shape": 1.0}


@pytest.mark.parametrize("shape", tw.SHAPES)
@pytest.mark.parametrize("color,background", [("purple", "white"), ("yellow", "white"), ("blue", "black"),
                                              ("red", "gray"), ("green", "yellow")])
def test_every_shape_and_held_out_colour(shape, color, background):
    got = ev.analyze(tw.render(shape, color, background, 30, 34, 32))
    assert (got.shape, got.color, got.background) == (shape, color, background)


def test_robust_to_blur_and_noise():
    scenes = _all_scenes(1, 60)
    rng = np.random.default_rng(0)
    images = []
    for s in scenes:
        blurred = np.asarray(tw.render_scene(s).filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
        noisy = np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(noisy))
    acc = _accuracy(scenes, images)
    assert acc["color"] == 1.0 and acc["background"] == 1.0
    assert acc["shape"] >= 0.95


def test_shape_features():
    square = ev.analyze(tw.render("square", "red", "white", 32, 32, 30))
    triangle = ev.analyze(tw.render("triangle", "red", "white", 32, 32, 30))
    star = ev.analyze(tw.render("star", "red", "white", 32, 32, 40))
    circle = ev.analyze(tw.render("circle", "red", "white", 32, 32, 30))
    assert square.extent > 0.95 and square.solidity > 0.95
    assert 0.4 < triangle.extent < 0.6 and triangle.solidity > 0.9
    assert star.solidity < 0.75
    assert 0.72 < circle.extent < 0.85 and circle.solidity > 0.95
    assert circle.area == pytest.approx(np.pi * 15 ** 2, rel=0.05)


def _uneven_star(outer_radii, rotation: float) -> Image.Image:
    """A five-pointed star whose points have different lengths, as generated stars often do."""
    angles = np.radians(rotation) - np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.array([r for outer in outer_radii for r in (outer, 0.5)]) * 20
    canvas = Image.new("RGB", (64, 64), tw.COLORS["white"])
    ImageDraw.Draw(canvas).polygon([(32 + r * np.cos(a), 32 + r * np.sin(a)) for r, a in zip(radii, angles)],
                                   fill=tw.COLORS["purple"])
    return canvas.filter(ImageFilter.GaussianBlur(1))


def test_an_uneven_star_is_a_star_and_no_seen_shape_has_five_points():
    uneven = [_uneven_star(radii, rotation) for radii, rotation in (
        ((1.0, 0.7, 0.9, 0.6, 0.8), 0), ((0.7, 1.0, 0.75, 1.0, 0.65), 17), ((1.0, 1.0, 0.6, 0.9, 0.7), 40))]
    assert [ev.analyze(image).shape for image in uneven] == ["star"] * 3
    rng = np.random.default_rng(3)
    for blur in (0, 2.5):
        for shape in tw.SHAPES:
            for i in range(6):
                image = tw.render(shape, "green", "black", *rng.uniform(26, 38, 2), rng.uniform(22, 44),
                                  rng.uniform(0, 90) if shape == "star" else 0)
                got = ev.analyze(image.filter(ImageFilter.GaussianBlur(blur)) if blur else image)
                assert got.shape == shape
                fifth = got.harmonics[4]
                assert fifth > 0.1 if shape == "star" else fifth < 0.05


def test_plain_picture_has_no_shape_and_a_blob_is_unclear():
    plain = Image.new("RGB", (64, 64), tw.COLORS["gray"])
    got = ev.analyze(plain)
    assert (got.background, got.color, got.shape) == ("gray", ev.NONE, ev.NONE)
    # two separate discs: the largest component is a half-moon-like crop, no clean template
    px = np.full((64, 64, 3), tw.COLORS["white"], dtype=np.uint8)
    yy, xx = np.mgrid[:64, :64]
    ring = ((yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2) & ((yy - 32) ** 2 + (xx - 32) ** 2 > 12 ** 2)
    px[ring] = tw.COLORS["blue"]
    got = ev.analyze(Image.fromarray(px))
    assert got.color == "blue" and got.shape == ev.UNCLEAR


def test_accepts_other_sizes_and_arrays():
    image = tw.render("triangle", "green", "black", 32, 32, 36)
    big = image.resize((256, 256), Image.Resampling.NEAREST)
    assert ev.analyze(big).shape == "triangle"
    assert ev.analyze(np.asarray(image)).shape == "triangle"


def test_largest_component_and_hull():
    mask = np.zeros((10, 10), bool)
    mask[1:4, 1:4] = True
    mask[6:9, 5:10] = True
    comp = ev.largest_component(mask)
    assert comp.sum() == 15 and comp[7, 7] and not comp[2, 2]
    assert ev.convex_hull_area(comp) == pytest.approx(15.0)
    tri = np.tril(np.ones((8, 8), bool))
    assert ev.convex_hull_area(tri) == pytest.approx(64 - 24.5)  # pixels as unit squares


def test_score_prompts_with_a_generate_function():
    """A 'model' that draws exactly what the prompt says scores 100%; one that always
    draws a red circle on white gets the attributes it happens to match."""
    def perfect(prompts, seeds):
        out = []
        for p, s in zip(prompts, seeds):
            want = tw.parse_caption(p)
            out.append(tw.render(want["shape"], want["color"], want["background"] or "white",
                                 28 + s, 30, 30))
        return out

    prompts = ["a red circle on a blue background", "a purple star on a white background",
               "a yellow square on a black background", "a green triangle"]
    figures = ev.score_prompts(perfect, prompts, seeds=[0, 3])
    assert figures["n_images"] == 8
    assert figures["accuracy"] == {"color": 1.0, "background": 1.0, "shape": 1.0, "all": 1.0}
    assert figures["count"]["background"] == 6  # "a green triangle" names no background
    assert figures["records"][0]["seed"] == 0 and figures["records"][1]["seed"] == 3

    def always_red_circle(prompts, seeds):
        return [tw.render("circle", "red", "white", 32, 32, 30) for _ in prompts]

    figures = ev.score_prompts(always_red_circle, prompts, seeds=[0])
    assert figures["accuracy"]["color"] == 0.25 and figures["accuracy"]["shape"] == 0.25
    assert figures["accuracy"]["background"] == pytest.approx(1 / 3)
    assert figures["per_value"]["shape"] == {"circle": 1.0, "square": 0.0, "star": 0.0, "triangle": 0.0}
    assert "color 25.0%" in ev.format_figures(figures)


def test_nearest_color():
    assert ev.nearest_color((250, 0, 0)) == "red"
    assert ev.nearest_color((120, 30, 170)) == "purple"
    assert ev.nearest_color((130, 125, 135)) == "gray"
