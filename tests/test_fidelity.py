"""The built-in model draws what it is told, and training teaches and keeps (issue 3).

The shipped weights reproduce the figures recorded in assets/builtin/TRAINING.md, and a
DreamBooth LoRA from the demo dataset keeps the base model's accuracy on prompts without
its trigger. Fewer seeds than `python -m bench.fidelity`.
"""
from __future__ import annotations

import json

import pytest

SEEDS = [100, 101, 102, 103]


@pytest.fixture  # one per test: the two trainings below then run on separate xdist workers
def engine_and_workspace(tmp_path_factory):
    from studio.generation.engine import Engine
    from studio.workspace import Workspace

    return Engine(), Workspace.open(tmp_path_factory.mktemp("fidelity") / "ws")


@pytest.mark.slow
def test_shipped_model_draws_seen_prompts_as_recorded():
    from toyworld import world as toyworld
    from studio.models.builtin import BUILTIN_DIR
    from toyworld.evaluate import score_prompts
    from studio.models import load_pipeline

    recorded = json.loads((BUILTIN_DIR / "evaluation.json").read_text())
    settings = recorded["evaluation"]["seen"]["settings"]
    pipe = load_pipeline("builtin")
    pipe.set_progress_bar_config(disable=True)
    figures = score_prompts(pipe, toyworld.seen_prompts(), settings["seeds"], steps=settings["steps"],
                            guidance_scale=settings["guidance_scale"])
    assert figures["n_images"] >= 100
    accuracy = figures["accuracy"]
    assert accuracy["color"] >= 0.95 and accuracy["background"] >= 0.95 and accuracy["shape"] >= 0.8, accuracy
    assert accuracy == pytest.approx(recorded["evaluation"]["seen"]["accuracy"], abs=0.02)


@pytest.mark.slow(seconds=500)
def test_demo_lora_teaches_the_purple_star_keeps_the_prior_and_weight_zero_is_the_base(engine_and_workspace):
    """The tiny-demo preset on the demo dataset: "sks" prompts draw purple stars, prompts
    without the trigger keep >= 90% of the base model's accuracy (issue 3). The preset's run
    (seed 42) drew 47 of 48 stars over seeds 100-115; another training seed drew fewer
    (bench/RESULTS.md), so a change that moves this test is worth a bench run."""
    from toyworld.fidelity import concept_figures, train
    from studio.generation.engine import AdapterUse, GenerateRequest

    engine, workspace = engine_and_workspace
    adapter = train(workspace, name="demo")
    figures = concept_figures(engine, adapter, SEEDS)
    assert figures["concept"]["color"] >= 0.9 and figures["concept"]["shape"] >= 0.9, figures
    for attr in ("color", "background", "shape"):
        assert figures["prior_with_lora"][attr] >= 0.9 * figures["prior_base"][attr], figures
    assert figures["prior_base"]["shape"] >= 0.8, figures
    request = dict(prompt="a sks shape on a white background", seed=SEEDS[0])
    base = engine.generate(GenerateRequest(**request))[0]
    zero = engine.generate(GenerateRequest(**request, adapters=[AdapterUse(adapter, 0.0)]))[0]
    one = engine.generate(GenerateRequest(**request, adapters=[AdapterUse(adapter, 1.0)]))[0]
    assert base.tobytes() == zero.tobytes()
    assert base.tobytes() != one.tobytes()


@pytest.mark.slow(seconds=670)
def test_a_colour_lora_and_a_shape_lora_together_draw_both(engine_and_workspace):
    """One LoRA teaches "zwx" = purple (on seen shapes), another "ohwx shape" = star (stars of
    seen colours, the colour unnamed); at weight 1 each, "a zwx ohwx shape" draws purple
    stars in most samples (issue 3). Three training seeds drew 88% over 24 images each
    (bench/RESULTS.md)."""
    from toyworld.fidelity import COLOR_ADAPTER, COLOR_STEPS, composition_figures, train, write_concept_dataset

    engine, workspace = engine_and_workspace
    color = train(workspace, name="color", steps=COLOR_STEPS, **COLOR_ADAPTER,
                  dataset=write_concept_dataset(workspace.root / "color-data", "color"))
    shape = train(workspace, name="shape", dataset=write_concept_dataset(workspace.root / "shape-data", "shape"))
    figures = composition_figures(engine, color, shape, SEEDS)
    assert figures["both"]["all"] > 0.5, figures
    assert figures["color_only"]["color"] >= 0.9, figures
