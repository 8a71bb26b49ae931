"""Generate tab, mixtures: suggestions fused into a mixture draw the weighted mix, the gate
table and heat map show each member per block, and edited gates reach the pictures."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from studio.errors import StudioError
from tests.test_ui_mixing import _lora_file
from ui import generate_view as gv

FAST = dict(prompt="a sks star on a white background", steps=2, size="64 × 64", cfg=5.0, seed=3)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from studio.workspace import Workspace
    from ui.common import Studio

    workspace = Workspace.open(tmp_path_factory.mktemp("ui-mix") / "ws")
    _lora_file(workspace.adapters_dir / "star.safetensors", rank=4, seed=1, trigger="sks")
    _lora_file(workspace.adapters_dir / "circle.safetensors", rank=8, seed=2, trigger="zwx")
    return Studio(workspace)


def _pixels(studio, rows) -> np.ndarray:
    gallery, _ = gv.generate_images(studio, gv.GenerateSettings(**FAST), rows)
    with Image.open(gallery[0][0]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.slow(seconds=15)
def test_fused_suggestions_draw_the_mix_and_edited_gates_reach_the_picture(studio):
    suggested = [["star", 0.9, "trigger word 'sks' in the prompt"], ["circle", 0.6, "text similarity 0.7"]]
    name = gv.fuse_suggestions(studio, suggested, "")
    assert name == "mix-star-circle" and name in gv.mixture_names(studio.workspace)
    headers, gates = gv.mixture_gates(studio, name)
    assert headers == gv.gate_headers() and headers[1] == "BASE" and len(headers) == 1 + 26
    assert [row[0] for row in gates] == ["star", "circle"] and len(gates[0]) == 1 + 26
    assert {row[1] for row in gates[:1]} == {0.9} and set(gates[1][1:]) == {0.6}
    assert gv.gate_heatmap(gates).size == (26 * 12, 2 * 12)
    blend = _pixels(studio, [["star", 0.9], ["circle", 0.6]])
    assert np.abs(_pixels(studio, [[name, 1.0]]) - blend).max() <= 1

    gates[1] = [gates[1][0], *[0.0] * 26]  # the circle adapter off everywhere
    assert "Saved" in gv.save_mixture_gates(studio, name, gates)
    assert np.abs(_pixels(studio, [[name, 1.0]]) - _pixels(studio, [["star", 0.9]])).max() <= 1
    assert np.abs(_pixels(studio, [[name, 1.0]]) - blend).max() > 1


def test_bad_fuses_and_gate_edits_say_what_to_do(studio):
    with pytest.raises(StudioError, match="two or more"):
        gv.fuse_suggestions(studio, [["star", 1.0, ""]], "")
    gv.fuse_suggestions(studio, [["star", 1.0, ""], ["circle", 1.0, ""]], "pair")
    with pytest.raises(StudioError, match="already has 'pair'"):
        gv.fuse_suggestions(studio, [["star", 1.0, ""], ["circle", 1.0, ""]], "pair")
    _, rows = gv.mixture_gates(studio, "pair")
    with pytest.raises(StudioError, match="has 1 rows; pair has 2 members"):
        gv.save_mixture_gates(studio, "pair", rows[:1])
    rows[0][5] = "lots"
    with pytest.raises(StudioError, match="not a number"):
        gv.save_mixture_gates(studio, "pair", rows)
