"""Generate and Library tab handlers for mixes, on the built-in model with small random
adapters: per-row text-encoder weight, block weights and T-LoRA mask; mix grid; suggest
and accept; bake, fuse and resize into the workspace; clear messages for bad input."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import StudioError
from ui import generate_view as gv
from ui import library_view as lv

FAST = dict(steps=2, size="64 × 64", cfg=5.0, seed=3)
PROMPT = "a sks star on a white background"
TARGETS = {"unet": ("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_out.0"),
           "text_encoder": ("self_attn.q_proj", "self_attn.v_proj")}
ZERO_BLOCKS = ",".join(["0"] * 26)  # BASE, IN00-IN11, M00, OUT00-OUT11: every block of any SD UNet


def _builtin_layers():
    from studio.adapters import reference_models

    label, models = reference_models("sd15")[0]
    assert label == "builtin"
    return models


def _lora_file(path, *, rank: int, seed: int, trigger: str):
    """A random LoRA for the built-in model's attention (UNet and text encoder)."""
    from studio.adapters import AdapterFile, LoraModule, save_adapter
    from studio.adapters.formats.naming import path_to_name

    models = _builtin_layers()
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for attr, targets in TARGETS.items():
        for module_path, layer in models[attr].named_modules():
            if isinstance(layer, torch.nn.Linear) and module_path.endswith(targets):
                name = path_to_name("sd15", attr, module_path, models["unet"].config)
                modules[name] = LoraModule(torch.randn(rank, layer.in_features, generator=generator) * 0.3,
                                           torch.randn(layer.out_features, rank, generator=generator) * 0.3,
                                           float(rank))
    metadata = {"ss_output_name": path.stem, "modelspec.trigger_phrase": trigger}
    return save_adapter(path, AdapterFile(modules, metadata, "sd15"))


def _tlora_file(path, *, seed: int):
    """A random rank-4 T-LoRA (min rank 1) on the built-in UNet's self-attention queries."""
    from studio.adapters.methods.tlora_layers import (
        TLoRAAdapter,
        TLoRALayer,
        TLoRASchedule,
        save_tlora,
    )

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for module_path, layer in _builtin_layers()["unet"].named_modules():
        if isinstance(layer, torch.nn.Linear) and module_path.endswith("attn1.to_q"):
            tlora = TLoRALayer(layer.in_features, layer.out_features, 4, ortho=False, generator=generator)
            with torch.no_grad():
                tlora.p.normal_(0, 0.5, generator=generator)  # vanilla T-LoRA starts with P = 0
            layers[module_path] = tlora
    return save_tlora(path, TLoRAAdapter(TLoRASchedule(4, 1), 4.0, layers), {"ss_output_name": path.stem})


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from studio.workspace import Workspace
    from ui.common import Studio

    workspace = Workspace.open(tmp_path_factory.mktemp("mixing") / "ws")
    _lora_file(workspace.adapters_dir / "star.safetensors", rank=4, seed=1, trigger="sks")
    _lora_file(workspace.adapters_dir / "circle.safetensors", rank=8, seed=2, trigger="zwx")
    _tlora_file(workspace.adapters_dir / "timed.safetensors", seed=3)
    return Studio(workspace)


@pytest.fixture(scope="module")
def app_events(studio):
    """The page's own event functions (friendly-wrapped) by name, on the same workspace."""
    from ui.app import build_app

    app = build_app(studio.workspace)
    return {block_fn.fn.__name__: block_fn.fn for block_fn in app.fns.values() if block_fn.fn is not None}


def _settings(**changes) -> gv.GenerateSettings:
    return gv.GenerateSettings(**{"prompt": PROMPT, **FAST, **changes})


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _generate(studio, rows=(), **changes) -> np.ndarray:
    gallery, _ = gv.generate_images(studio, _settings(**changes), list(rows))
    assert len(gallery) == 1
    return _pixels(gallery[0][0])


def _warning_of(event, *args) -> str:
    """Call a page event; it must show one warning and leave every output as it was."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = event(*args)
    assert result == {"__type__": "update"}
    messages = [str(w.message) for w in caught]
    assert messages, "no warning shown"
    return "\n".join(messages)


# ------------------------------------------------------------------ Generate: the adapter rows
def test_row_fields_reach_adapter_use(studio):
    resolve = lambda name: studio.workspace.adapters_dir / f"{name}.safetensors"  # noqa: E731
    uses = gv.row_uses([("star", 0.8, 0.25, " OUTD ", True), ("", 1.0), ("circle", 0, 0.5, "", False),
                       ("timed", 0, None), ("star", 0, "")], resolve, keep_rows=[4])
    assert list(uses) == [0, 2, 4]  # weight 0 with no text-encoder weight is off, unless a grid axis sets it
    assert (uses[0].weight, uses[0].te_weight, uses[0].block_weights, uses[0].tlora_masked) == (0.8, 0.25, "OUTD", True)
    assert uses[0].text_encoder_weight == 0.25
    assert (uses[2].weight, uses[2].text_encoder_weight, uses[2].block_weights) == (0, 0.5, None)
    assert uses[2].tlora_masked is False
    assert uses[4].te_weight is None and uses[4].text_encoder_weight == 0


def test_block_weights_from_the_row_reach_the_engine(studio):
    base = _generate(studio)
    all_zero = _generate(studio, [("star", 1.0, None, ZERO_BLOCKS)])
    assert np.array_equal(all_zero, base)  # bit for bit
    every_block = _generate(studio, [("star", 1.0, None, "ALL")])
    plain = _generate(studio, [("star", 1.0)])
    assert np.abs(every_block - base).mean() > 1
    assert np.array_equal(every_block, plain)
    only_text_encoder = _generate(studio, [("star", 0.0, 1.0)])
    assert np.abs(only_text_encoder - base).mean() > 0 and not np.array_equal(only_text_encoder, plain)


def test_timestep_mask_shows_for_tlora_files_and_reaches_the_engine(studio):
    assert gv.is_tlora_adapter(studio.workspace, "timed")
    assert not gv.is_tlora_adapter(studio.workspace, "star")
    assert not gv.is_tlora_adapter(studio.workspace, "no-such-adapter")
    masked = _generate(studio, [("timed", 1.0, None, "", True)])
    all_ranks = _generate(studio, [("timed", 1.0, None, "", False)])
    assert np.abs(masked - all_ranks).mean() > 0


# ------------------------------------------------------------------ Generate: mix grid
def test_grid_saves_a_labelled_sheet_and_the_single_images(studio):
    sheet_path, cells, columns, note = gv.mix_grid(studio, _settings(seed=5), [("", 1.0), ("star", 0.0)],
                                                  "adapter1", "0, 1", "seed", "5, 6")
    assert len(cells) == 4 and columns == 2 and all(Image.open(path).size == (64, 64) for path, _ in cells)
    _assert_readable_sheet(sheet_path, [path for path, _ in cells], columns=2, rows=2,
                           column_labels=["star: 0", "star: 1"])
    assert [label for _, label in cells] == ["star: 0 · seed 5", "star: 1 · seed 5", "star: 0 · seed 6",
                                            "star: 1 · seed 6"]
    outputs = studio.outputs_dir
    assert sheet_path.startswith(str(outputs)) and cells[3][0].endswith("-1-1.png")
    assert "single image" in note
    # the weight axis drives row 2's adapter: weight 0 is the base image of the same seed
    assert np.array_equal(_pixels(cells[0][0]), _generate(studio, seed=5))
    assert np.abs(_pixels(cells[1][0]) - _pixels(cells[0][0])).mean() > 1


def test_grid_over_prompts_without_a_y_axis(studio):
    sheet_path, cells, _, _ = gv.mix_grid(studio, _settings(), [("star", 0.7)], "prompt",
                                         "a red star | a blue circle", gv.GRID_NO_AXIS)
    assert [label for _, label in cells] == ["a red star", "a blue circle"]
    _assert_readable_sheet(sheet_path, [path for path, _ in cells], columns=2, rows=1,
                           column_labels=["a red star", "a blue circle"])


def _assert_readable_sheet(sheet_path, cell_paths, *, columns, rows, column_labels):
    """Every column label fits above its own column (no label runs into the next one) and
    every cell is its single image enlarged pixel for pixel (nearest neighbour)."""
    from PIL import ImageDraw

    from studio.generation.grid import LABEL_PAD, label_font

    font = label_font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    with Image.open(sheet_path) as opened:
        sheet = opened.convert("RGB")
    cell_w = cell_h = None
    for index, path in enumerate(cell_paths):
        with Image.open(path) as single:
            single = single.convert("RGB")
        if cell_w is None:
            scale = (sheet.width - (sheet.width % columns if rows == 1 else 0)) // columns // single.width
            cell_w, cell_h = single.width * scale, single.height * scale
            left, top = sheet.width - columns * cell_w, sheet.height - rows * cell_h
            assert all(measure.textlength(label, font=font) + 2 * LABEL_PAD <= cell_w for label in column_labels)
        j, i = divmod(index, columns)
        box = (left + i * cell_w, top + j * cell_h, left + (i + 1) * cell_w, top + (j + 1) * cell_h)
        enlarged = single.resize((cell_w, cell_h), Image.Resampling.NEAREST)
        assert np.array_equal(np.asarray(sheet.crop(box)), np.asarray(enlarged)), (path, box)


@pytest.mark.parametrize("axes,expected", [
    (("adapter2", "0, 1", "", ""), "row 3 has no adapter"),
    (("adapter0", "", "", ""), "X values '': write numbers separated by commas"),
    (("adapter0", "0, big", "", ""), "X values '0, big': write numbers"),
    (("adapter0", "0, 1", "seed", "1.5"), "Y values '1.5': write whole numbers"),
    (("seed", "1, 2", "seed", "3"), "The X and Y axes are the same"),
    (("prompt", " | ", "", ""), "prompts separated by |"),
])
def test_grid_bad_axes_are_clear_errors(studio, axes, expected):
    with pytest.raises(StudioError, match=re.escape(expected)):
        gv.mix_grid(studio, _settings(), [("star", 1.0)], *axes)


# ------------------------------------------------------------------ Generate: suggest and accept
def test_suggest_then_accept_fills_the_rows(studio, app_events):
    found = gv.suggest_adapters(studio, "a sks star", "builtin")
    star = next(row for row in found if row[0] == "star")
    assert "trigger word 'sks'" in star[2] and 0.6 <= star[1] <= 1.0
    assert "star" not in [row[0] for row in gv.suggest_adapters(studio, "a sks star <lora:star:0.5>", "builtin")]

    # accepting puts exactly the suggested mix in the rows: what was there before is cleared
    names, weights, left_out = gv.accept_suggestions([star, ["circle", 0.9, "why"]], 4)
    assert names == ["star", "circle", "", ""] and weights == [star[1], 0.9, 1.0, 1.0] and left_out == []
    _, _, left_out = gv.accept_suggestions([[n, 0.7, "why"] for n in "abcde"], 4)
    assert left_out == ["e"]

    # the page's Accept button: four name updates, four weights, the suggestion box hidden
    updates = app_events["on_accept"]([star])
    assert [u["value"] for u in updates[:4]] == ["star", "", "", ""]
    assert "star" in updates[0]["choices"]
    assert updates[4:8] == [star[1], 1.0, 1.0, 1.0] and updates[8]["visible"] is False
    assert "press 'Suggest adapters" in _warning_of(app_events["on_accept"], [])


def test_suggest_proposes_one_of_two_copies_and_says_so(tmp_path):
    import shutil

    from studio.adapters import load_adapter, save_adapter
    from studio.workspace import Workspace
    from ui.common import Studio

    workspace = Workspace.open(tmp_path / "ws")
    star = _lora_file(workspace.adapters_dir / "star.safetensors", rank=4, seed=1, trigger="sks")
    shutil.copy(star, workspace.adapters_dir / "star-copy.safetensors")
    # the same weights rounded to fp16: still a copy
    save_adapter(workspace.adapters_dir / "star-half.safetensors", load_adapter(star), dtype=torch.float16)
    _lora_file(workspace.adapters_dir / "other-star.safetensors", rank=4, seed=9, trigger="sks")  # its own weights
    found = gv.suggest_adapters(Studio(workspace), "a sks star", "builtin")
    names = [row[0] for row in found]
    copies = {"star", "star-copy", "star-half"}
    assert len(copies & set(names)) == 1 and "other-star" in names, found
    kept = next(row for row in found if row[0] in copies)
    assert all(f"{name} makes the same change" in kept[2] for name in copies - {kept[0]}), kept[2]


def test_suggest_keeps_two_adapters_that_share_their_start_but_learned_different_things(tmp_path):
    """Two runs from one seed share their random down-projections (most of the stored
    numbers) and differ in what they learned (the up-projections): different changes to
    the model, both proposed, neither called a copy of the other."""
    from studio.adapters import AdapterFile, LoraModule, load_adapter, save_adapter
    from studio.workspace import Workspace
    from ui.common import Studio

    workspace = Workspace.open(tmp_path / "ws")
    start = load_adapter(_lora_file(tmp_path / "start.safetensors", rank=4, seed=1, trigger="sks"))
    generator = torch.Generator().manual_seed(5)
    runs = {}
    for name in ("star", "cat"):  # up-projections start at 0 and stay small in a short run
        runs[name] = AdapterFile({key: LoraModule(m.down, torch.randn(m.up.shape, generator=generator) * 0.01, m.alpha)
                                  for key, m in start.modules.items()},
                                 {"ss_output_name": name, "modelspec.trigger_phrase": "sks"}, "sd15")
        save_adapter(workspace.adapters_dir / f"{name}.safetensors", runs[name])
    stored = lambda a: torch.cat([t.flatten() for m in a.modules.values() for t in (m.down, m.up)])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(stored(runs["star"]), stored(runs["cat"]), dim=0) > 0.99
    found = gv.suggest_adapters(Studio(workspace), "a sks star", "builtin")
    assert sorted(row[0] for row in found) == ["cat", "star"], found
    assert not any("same change" in row[2] for row in found), found


def test_suggest_ignores_the_mix_the_engine_ran_last(studio):
    before = gv.suggest_adapters(studio, "a zwx circle", "builtin")
    assert before
    _generate(studio, [("star", 1.0, 2.0), ("circle", 1.0, -1.5)])  # text-encoder deltas now merged or live
    assert gv.suggest_adapters(studio, "a zwx circle", "builtin") == before


# ------------------------------------------------------------------ Library: bake, fuse, resize
def test_bake_writes_a_library_adapter_with_merged_from(studio):
    from studio.adapters import load_adapter

    name, note = lv.bake_mix(studio, [("star", 0.8), ("", 1.0), ("circle", -0.5), (None, None)], "star-circle",
                            None, "fp16")
    path = studio.workspace.adapters_dir / f"{name}.safetensors"
    assert name == "star-circle" and path.is_file()
    baked = load_adapter(path)
    assert baked.metadata["modelspec.merged_from"] == "star:0.8, circle:-0.5"
    assert baked.ranks == [12] and "exact" in note  # every module is in both: 4 + 8 ranks

    name, note = lv.bake_mix(studio, [("star", 1.0), ("circle", 1.0)], "star-circle-r2.safetensors", 2, "fp32")
    assert name == "star-circle-r2" and load_adapter(studio.workspace.adapters_dir / f"{name}.safetensors").ranks == [2]
    assert "energy kept per module" in note
    with pytest.raises(StudioError, match="already exists"):
        lv.bake_mix(studio, [("star", 1.0)], "star-circle", None, "fp16")


def test_resize_gives_the_asked_rank_and_the_energy_report(studio):
    from studio.adapters import load_adapter

    name, note, energy = lv.resize_adapter(studio, "circle", "rank", 3, "", "fp32")
    assert name == "circle-r3"
    resized = load_adapter(studio.workspace.adapters_dir / "circle-r3.safetensors")
    assert resized.ranks == [3] and len(energy) == len(resized.modules)
    kept = [row[1] for row in energy]
    assert kept == sorted(kept) and 0 < kept[0] < 1 and "rank 3" in note

    name, _, energy = lv.resize_adapter(studio, "circle", "sv_fro", 0.999, "circle-fro", "fp16")
    assert name == "circle-fro" and all(row[1] >= 0.999**2 - 1e-4 for row in energy)
    name, _, energy = lv.resize_adapter(studio, "star", "rank", 4, "", "fp32")
    assert name == "star-r4" and min(row[1] for row in energy) == pytest.approx(1.0, abs=1e-6)  # full rank: lossless


def test_fuse_writes_a_checkpoint_in_the_models_folder(studio):
    from studio.safetensors_file import read_safetensors_header
    from ui.train_tab import model_choices

    note = lv.fuse_mix(studio, "builtin", [("star", 0.8), ("circle", 0.3)], "star-fused")
    path = studio.workspace.models_dir / "star-fused.safetensors"
    assert path.is_file() and "models/star-fused.safetensors" in note
    assert str(path) in model_choices(studio)
    tensors, _ = read_safetensors_header(path)
    assert any(key.startswith("model.diffusion_model.") for key in tensors)
    with pytest.raises(StudioError, match="already exists"):
        lv.fuse_mix(studio, "builtin", [("star", 1.0)], "star-fused")


# ------------------------------------------------------------------ bad input: a message, no traceback
@pytest.mark.parametrize("blocks,expected", [
    ("FOO", "Block weights 'FOO': give a preset"),
    ("1,0,1", "Block weights have 3 values; sd15 takes 17"),
])
def test_bad_block_weights_show_a_clear_message(studio, app_events, blocks, expected):
    rows = [("star", 1.0, None, blocks, True)] + [("", 1.0, None, "", True)] * 3
    values = [PROMPT, "", "builtin", "ddim", "64 × 64", 2, 5.0, 1, 1, *(v for row in rows for v in row)]
    assert expected in _warning_of(app_events["on_generate"], *values)


def test_a_text_encoder_weight_that_is_no_number_is_named(studio):
    with pytest.raises(StudioError, match="Adapter 2 · Text-encoder weight: 'half' is not a number"):
        gv.generate_images(studio, _settings(), [("", 1.0), ("star", 1.0, "half")])


def test_bad_library_input_shows_a_clear_message(app_events):
    mix = ["star", 1.0, "", 1.0, "", 1.0, "", 1.0]
    bake, resize, fuse = app_events["on_bake"], app_events["on_resize"], app_events["on_fuse"]
    assert ("Rank must be a whole number of at least 1 (got 0); leave it empty for an exact bake"
            in _warning_of(bake, "zero", 0, "fp16", *mix))
    assert "Pick at least one adapter" in _warning_of(bake, "empty", None, "fp16", "", 1.0, "", 1.0, "", 1.0, "", 1.0)
    assert "No adapter named 'gone'" in _warning_of(bake, "x", None, "fp16", "gone", 1.0, *mix[2:])
    assert "Rank 'four' is not a number" in _warning_of(bake, "four", "four", "fp16", *mix)
    assert "Give the new adapter a name" in _warning_of(bake, " ", None, "fp16", *mix)
    assert "Invalid adapter name '../up'" in _warning_of(bake, "../up", None, "fp16", *mix)
    assert "Rank must be a whole number of at least 1 (got 0)" in _warning_of(resize, "star", "rank", 0, "", "fp16")
    assert "sv-fro must be in (0, 1]" in _warning_of(resize, "star", "sv_fro", 3, "", "fp16")
    assert "Give the value X for sv-ratio" in _warning_of(resize, "star", "sv_ratio", None, "", "fp16")
    assert "No adapter named 'gone'" in _warning_of(resize, "gone", "rank", 2, "", "fp16")
    assert "Pick the adapter to resize" in _warning_of(resize, None, "rank", 2, "", "fp16")
    assert "not found" in _warning_of(fuse, "/nonexistent/model", "fused", *mix)
