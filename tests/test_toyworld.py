"""The toy world: deterministic scenes, captions that match the pixels, held-out attributes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from toyworld import world as tw
from studio.errors import StudioError


def _scenes(seed: int, n: int = 50, **kwargs) -> list[tw.Scene]:
    rng = np.random.default_rng(seed)
    return [tw.sample_scene(rng, **kwargs) for _ in range(n)]


def test_same_seed_same_scenes_captions_and_pixels():
    a, b = _scenes(7), _scenes(7)
    assert a == b
    assert [tw.caption_for(s) for s in a] == [tw.caption_for(s) for s in b]
    assert all(np.array_equal(np.asarray(tw.render_scene(x)), np.asarray(tw.render_scene(y)))
               for x, y in zip(a[:10], b[:10]))
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    assert [tw.training_caption(s, rng1) for s in a] == [tw.training_caption(s, rng2) for s in a]
    assert _scenes(8) != a


def test_render_is_64x64_rgb_with_exact_colours():
    image = tw.render("square", "red", "blue", cx=32, cy=32, size=30)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    px = np.asarray(image)
    assert tuple(px[32, 32]) == tw.COLORS["red"]       # inside the square
    assert tuple(px[2, 2]) == tw.COLORS["blue"]        # background corner
    assert tuple(px[32, 19]) == tw.COLORS["red"] and tuple(px[32, 15]) == tw.COLORS["blue"]


def test_shapes_cover_their_expected_area():
    size = 40.0
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for shape, fraction in expected.items():
        area = tw.shape_mask(shape, 32, 32, size).sum()
        assert area == pytest.approx(fraction * size * size, rel=0.03), shape
    star = tw.shape_mask("star", 32, 32, size).sum()
    assert 0.2 * size * size < star < 0.45 * size * size


def test_scene_stays_inside_the_image_and_colours_differ():
    for s in _scenes(1, 300):
        assert tw.MIN_SIZE <= s.size <= tw.MAX_SIZE
        assert s.cx - s.size / 2 >= 0 and s.cx + s.size / 2 <= 64
        assert s.cy - s.size / 2 >= 0 and s.cy + s.size / 2 <= 64
        assert s.color != s.background
        px = np.asarray(tw.render_scene(s))
        border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
        assert (border == tw.COLORS[s.background]).all()


def test_caption_matches_the_drawing():
    for s in _scenes(2, 40):
        caption = tw.caption_for(s)
        assert caption == f"a {s.color} {s.shape} on a {s.background} background"
        assert tw.parse_caption(caption) == {"shape": s.shape, "color": s.color, "background": s.background}
        px = np.asarray(tw.render_scene(s)).astype(int)
        centre = px[int(s.cy), int(s.cx)] if s.shape != "triangle" else px[int(s.cy + s.size / 4), int(s.cx)]
        assert tuple(centre) == tw.COLORS[s.color]
    s = _scenes(2, 1)[0]
    assert tw.caption_for(s, background=False) == f"a {s.color} {s.shape}"
    assert tw.caption_for(s, shape_word="shape", color=False) == f"a shape on a {s.background} background"


def test_parse_caption_assigns_colours_to_shape_and_background():
    assert tw.parse_caption("a blue square on a red background") == {
        "shape": "square", "color": "blue", "background": "red"}
    assert tw.parse_caption("a green triangle") == {"shape": "triangle", "color": "green", "background": None}
    assert tw.parse_caption("a sks shape on a white background") == {
        "shape": None, "color": None, "background": "white"}


def test_held_out_attributes_never_in_base_training_sampler():
    assert "purple" in tw.HELD_OUT_COLORS and "star" in tw.HELD_OUT_SHAPES
    assert "purple" not in tw.SEEN_SHAPE_COLORS + tw.SEEN_BACKGROUNDS
    assert "star" not in tw.SEEN_SHAPES
    rng = np.random.default_rng(0)
    captions = []
    for s in _scenes(11, 2000):
        assert s.shape != "star" and "purple" not in (s.color, s.background)
        captions.append(tw.training_caption(s, rng))
    words = set(" ".join(captions).split())
    assert "purple" not in words and "star" not in words
    assert {"circle", "square", "triangle", "shape", "red", "white", "background"} <= words
    assert "" in captions  # empty captions for classifier-free guidance
    assert not any("purple" in p or "star" in p for p in tw.seen_prompts())


def test_training_caption_dropout_rates():
    rng = np.random.default_rng(5)
    scene = tw.Scene("circle", "red", "white", 32, 32, 30)
    caps = [tw.training_caption(scene, rng) for _ in range(4000)]
    empty = np.mean([c == "" for c in caps])
    no_bg = np.mean([c != "" and "background" not in c for c in caps])
    generic = np.mean(["shape" in c for c in caps])
    assert empty == pytest.approx(0.10, abs=0.02)
    assert no_bg == pytest.approx(0.9 * 0.25, abs=0.03)
    assert generic == pytest.approx(0.9 * 0.15, abs=0.03)


def test_held_out_attributes_can_still_be_drawn():
    image = tw.render("star", "purple", "white", 32, 32, 40)
    px = np.asarray(image)
    assert tuple(px[32, 32]) == tw.COLORS["purple"]
    scenes = _scenes(4, 20, shapes=("star",), colors=("purple",))
    assert all(s.shape == "star" and s.color == "purple" for s in scenes)


def test_sampler_rejects_unknown_attributes():
    rng = np.random.default_rng(0)
    with pytest.raises(StudioError, match="hexagon"):
        tw.sample_scene(rng, shapes=("hexagon",))
    with pytest.raises(StudioError):
        tw.sample_scene(rng, colors=("red",), backgrounds=("red",))


def test_demo_dataset_is_purple_stars_with_trigger_captions_and_seen_reg_pictures(tmp_path):
    from toyworld.evaluate import analyze

    paths = tw.write_demo_dataset(tmp_path / "a")
    again = tw.write_demo_dataset(tmp_path / "b")
    stars = [p for p in paths if p.parent.name != "reg"]
    reg = [p for p in paths if p.parent.name == "reg"]
    assert (len(stars), len(reg)) == (tw.DEMO_IMAGES, tw.DEMO_REG_IMAGES)
    for p, q in zip(paths, again):
        assert p.read_bytes() == q.read_bytes()
        assert Image.open(p).size == (64, 64) and Image.open(p).mode == "RGB"
    for p in stars:
        caption = p.with_suffix(".txt").read_text().strip()
        assert caption.startswith("a sks shape on a ") and caption.endswith(" background")
        background = tw.parse_caption(caption)["background"]
        assert background in tw.SEEN_BACKGROUNDS
        px = np.asarray(Image.open(p))
        assert tuple(px[0, 0]) == tw.COLORS[background]
        assert (px.reshape(-1, 3) == tw.COLORS["purple"]).all(axis=1).sum() > 100
    for p in reg:  # the base model's world, captioned in full: nothing held out
        wanted = tw.parse_caption(p.with_suffix(".txt").read_text())
        got = analyze(Image.open(p))
        assert (got.color, got.shape, got.background) == (wanted["color"], wanted["shape"], wanted["background"])
        assert got.color not in tw.HELD_OUT_COLORS and got.shape not in tw.HELD_OUT_SHAPES


def test_shipped_demo_dataset_matches_generator(tmp_path):
    shipped = tw.PROJECT_DEMO_DIR
    if not shipped.exists():
        pytest.skip("assets/demo-dataset not generated")
    fresh = tw.write_demo_dataset(tmp_path)
    shipped_files = sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
    assert shipped_files == sorted(str(q.relative_to(tmp_path)) for p in fresh for q in (p, p.with_suffix(".txt")))
    for p in fresh:
        for q in (p, p.with_suffix(".txt")):
            assert (shipped / q.relative_to(tmp_path)).read_bytes() == q.read_bytes()
