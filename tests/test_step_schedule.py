"""Adapter weights scheduled over the denoising steps (start / stop steps, a curve): a
schedule of 1 everywhere is no schedule, and stopping after step k is the adapter for the
first k steps only."""
from __future__ import annotations

import numpy as np
import pytest

from studio.errors import StudioError
from studio.generation.engine import AdapterUse, Engine, GenerateRequest, lora_tag, parse_prompt_loras

STEPS = 8


@pytest.fixture(scope="module")
def demo_adapter(trained_demo):
    return trained_demo["adapter"]


def _pixels(images) -> np.ndarray:
    return np.asarray(images[0], dtype=np.float64)


def _request(*adapters) -> GenerateRequest:
    return GenerateRequest("a sks star on a white background", steps=STEPS, seed=5, adapters=list(adapters))


def test_weight_at_follows_start_stop_and_the_curve():
    use = AdapterUse(path=None, weight=0.8, start=2, stop=6, curve=(1.0, 0.0))
    weights = [use.weight_at(step, 9) for step in range(9)]
    assert weights[:2] == [0.0, 0.0] and weights[6:] == [0.0, 0.0, 0.0]
    assert weights[2:6] == pytest.approx([0.8 * (1 - s / 8) for s in range(2, 6)])
    assert AdapterUse(path=None, weight=0.5).weight_at(3, 9) == 0.5


def test_a_schedule_of_one_everywhere_is_no_schedule(demo_adapter):
    engine = Engine()
    plain = _pixels(engine.generate(_request(AdapterUse(demo_adapter, 1.0))))
    ones = _pixels(engine.generate(_request(AdapterUse(demo_adapter, 1.0, curve=(1.0, 1.0), start=0, stop=STEPS))))
    assert np.array_equal(plain, ones)


@pytest.mark.slow(seconds=5)
def test_stopping_after_step_k_is_the_adapter_for_the_first_k_steps_only(demo_adapter):
    engine = Engine()
    k = 3
    scheduled = _pixels(engine.generate(_request(AdapterUse(demo_adapter, 1.0, stop=k))))

    # by hand: the adapter for steps 0..k-1, then the base model, switched in the pipeline's callback
    import torch

    pipe = engine.set_mix("builtin", [AdapterUse(demo_adapter, 1.0)])

    def switch(_pipe, step, _timestep, _kwargs):
        if step + 1 == k:
            engine.set_mix("builtin", [])
        return {}

    from studio.generation.engine import _scheduler
    from studio.models.families import family_of_pipeline

    pipe.scheduler = _scheduler(pipe, family_of_pipeline(pipe), "ddim")
    with torch.inference_mode():
        by_hand = pipe("a sks star on a white background", num_inference_steps=STEPS, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(5), callback_on_step_end=switch).images[0]
    assert np.array_equal(scheduled, np.asarray(by_hand, dtype=np.float64))
    full = _pixels(engine.generate(_request(AdapterUse(demo_adapter, 1.0))))
    base = _pixels(engine.generate(_request()))
    assert np.abs(scheduled - full).max() > 0 and np.abs(scheduled - base).max() > 0


def test_tags_carry_the_schedule_and_round_trip(tmp_path):
    path = tmp_path / "a.safetensors"
    prompt, uses = parse_prompt_loras("a star <lora:a:0.7:start=2:stop=10:curve=1,0.5>", lambda name: path)
    assert prompt == "a star" and uses == [AdapterUse(path, 0.7, start=2, stop=10, curve=(1.0, 0.5))]
    assert parse_prompt_loras(lora_tag("a", uses[0]), lambda name: path)[1] == uses
    for bad, why in (("<lora:a:1:start=x>", "not a step number"), ("<lora:a:1:start=5:stop=5>", "leave no step"),
                     ("<lora:a:1:curve=1,nan>", "not a finite number"), ("<lora:a:1:curve=>", "not numbers")):
        with pytest.raises(StudioError, match=why):
            parse_prompt_loras(bad, lambda name: path)
