"""The built-in model draws what it is told, and training teaches and keeps (issue 3).

The shipped weights reproduce the figures recorded in assets/builtin/TRAINING.md, and the
quick DreamBooth recipe teaches its concept and leaves prompts without its trigger as the
base model drew them. Fewer seeds and one recipe: `python -m bench.fidelity` measures the
full preset and two adapters composed (11 min of CPU here, out of the suite since
2026-12-07), `python -m bench.time_to_concept` the quick recipe over training seeds.
"""
from __future__ import annotations

import json

import pytest

SEEDS = list(range(100, 108))
# The recipe's seed 42 draws 22 stars of 24 (91.7%; training seed 7: 79%, bench/RESULTS.md,
# "Time to concept"): a regression falls well below; the 90% target is the bench's.
MIN_STARS = 0.8
MIN_PRIOR_SAME = 0.85  # pairs read the same: 29-30 of 32 here (two pictures of margin for another CPU's floats)
MIN_PRIOR_OUTLINE = 0.9  # the recipe: 0.94 of the base's fit (seeds 100-107; bench.time_to_concept)


@pytest.fixture
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


@pytest.mark.slow(seconds=300)
def test_the_quick_recipe_teaches_the_purple_star_and_leaves_other_prompts_pictures_alone(engine_and_workspace):
    """tiny-demo-quick (the Train tab's first preset) on the demo dataset: "sks" prompts draw
    purple stars, and prompts without the trigger draw what the base model drew for the same
    seed: the same colour, shape and background, and outlines that fit their shape's template
    about as well as the base's (toyworld.fidelity.paired_prior: the star leaking into every
    outline, circles drawn as lumpy pentagons, still read "circle" but fit less). Weight 0 is
    the base model. The full preset (2400 steps) and two adapters composed are measured by `python -m bench.fidelity`,
    the recipe over three training seeds by `python -m bench.time_to_concept`."""
    from toyworld.fidelity import concept_figures, train
    from studio.generation.engine import AdapterUse, GenerateRequest

    engine, workspace = engine_and_workspace
    adapter = train(workspace, name="demo", preset="tiny-demo-quick")
    figures = concept_figures(engine, adapter, SEEDS)
    assert figures["concept"]["color"] >= 0.9 and figures["concept"]["shape"] >= MIN_STARS, figures
    assert figures["prior_base"]["shape"] >= 0.8, figures
    for attr in ("color", "background", "shape"):
        assert figures["prior_with_lora"][attr] >= 0.9 * figures["prior_base"][attr], figures
    assert figures["prior_paired"]["same"] >= MIN_PRIOR_SAME, figures
    assert figures["prior_paired"]["outline"] >= MIN_PRIOR_OUTLINE, figures
    request = dict(prompt="a sks shape on a white background", seed=SEEDS[0])
    base = engine.generate(GenerateRequest(**request))[0]
    zero = engine.generate(GenerateRequest(**request, adapters=[AdapterUse(adapter, 0.0)]))[0]
    one = engine.generate(GenerateRequest(**request, adapters=[AdapterUse(adapter, 1.0)]))[0]
    assert base.tobytes() == zero.tobytes()
    assert base.tobytes() != one.tobytes()
