"""Sensitivity-LoRA rank allocation: ranks follow the measured sensitivity (a module made
insensitive by construction gets the smallest), respect the budget, are the same for the
same seed, and the file carries them per module where diffusers and our engine read them."""
from __future__ import annotations

import json
import time

import pytest
import torch
from pydantic import ValidationError

from tests.conftest import demo_config
from tests.method_checks import unet_out

STEPS = 10
BUDGET = 160


def _deafened(pipe, deaf: str):
    with torch.no_grad():
        pipe.unet.get_submodule(f"{deaf}.to_out.0").weight.zero_()
    return pipe


def _allocation_run(workspace_root, *, deaf: str | None):
    """An AdapterTrainer set up with sensitivity allocation; with `deaf`, the base UNet's attention
    block whose output projection is zeroed (its to_q / to_k / to_v then cannot move the loss)."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers import trainer as trainer_module
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=STEPS, learning_rate=3e-3)
    config.network.rank_allocation = "sensitivity"
    config.network.rank_budget = BUDGET
    load = trainer_module.load_pipeline

    def deafened(*args, **kwargs):
        return _deafened(load(*args, **kwargs), deaf)

    trainer = AdapterTrainer(create_run(config, Workspace.open(workspace_root)), show_progress=False)
    with pytest.MonkeyPatch.context() as mp:
        if deaf:
            mp.setattr(trainer_module, "load_pipeline", deafened)
        trainer.setup()
    return trainer


def _allocation(trainer) -> dict:
    from studio.jobs.runs import iter_events

    return next(e for e in iter_events(trainer.run_dir) if e["type"] == "adapter_prepared")


@pytest.fixture(scope="module")
def allocated(tmp_path_factory):
    from studio.models import load_pipeline

    deaf = next(path[: -len(".to_out.0")] for path, _ in load_pipeline("builtin").unet.named_modules()
                if path.endswith("attn1.to_out.0"))
    torch.manual_seed(0)
    trainer = _allocation_run(tmp_path_factory.mktemp("alloc") / "ws", deaf=deaf)
    for step in range(STEPS):
        trainer.train_step(step)
    trainer.accelerator.unwrap_model(trainer.denoiser).eval()
    return {"trainer": trainer, "deaf": deaf, "event": _allocation(trainer), "path": trainer.export(time.time())}


def test_options_and_their_refusals():
    from studio.config import TrainConfig, network_config
    from ui import train_view as tv

    spec = next(s for s in tv.config_fields() if s.path == ("network", "rank_allocation"))
    assert "sensitivity" in spec.choices and "Sensitivity-LoRA" in spec.info
    network_config("locon", rank_allocation="sensitivity", rank_budget=64)
    for network in ({"type": "loha"}, {"type": "lora_fa"}):
        with pytest.raises(ValidationError, match=f"an option of lora and locon, not of {network['type']}"):
            network_config(rank_allocation="sensitivity", **network)
    with pytest.raises(ValidationError, match="4-bit base"):
        TrainConfig(network={"rank_allocation": "sensitivity"}, training={"base_weights": "nf4"})


def test_allocate_ranks_is_proportional_capped_and_within_the_budget():
    from studio.adapters.methods.sensitivity import allocate_ranks
    from studio.errors import StudioError

    ranks = allocate_ranks({"a": 6.0, "b": 3.0, "c": 1.0, "d": 0.0}, 20, {m: 64 for m in "abcd"})
    assert ranks == {"a": 11, "b": 6, "c": 2, "d": 1}  # 20 x (.6, .3, .1, 0), floored, min 1, remainders
    capped = allocate_ranks({"a": 100.0, "b": 1.0, "c": 1.0}, 30, {"a": 4, "b": 64, "c": 64})
    assert capped == {"a": 4, "b": 13, "c": 13}  # what a cannot hold goes to the others
    assert sum(allocate_ranks({"a": 1.0, "b": 1.0}, 300, {"a": 8, "b": 8}).values()) == 16  # all full
    with pytest.raises(StudioError, match="rank_budget is 2 but 3 modules"):
        allocate_ranks({"a": 1.0, "b": 1.0, "c": 1.0}, 2, {m: 8 for m in "abc"})


@pytest.mark.slow(seconds=40)
def test_ranks_follow_the_measured_sensitivity(allocated):
    event, deaf = allocated["event"], allocated["deaf"]
    ranks, sensitivity = event["ranks"], event["sensitivity"]
    assert event["method"] == "sensitivity" and event["budget"] == BUDGET
    assert sum(ranks.values()) == event["total"] <= BUDGET
    insensitive = {f"unet.{deaf}.{name}" for name in ("to_q", "to_k", "to_v")}
    assert all(sensitivity[m] == 0 for m in insensitive)
    assert all(ranks[m] == 1 == min(ranks.values()) for m in insensitive)
    assert sensitivity[f"unet.{deaf}.to_out.0"] > 0
    assert len(set(ranks.values())) > 2  # not a uniform rank
    unet = allocated["trainer"].accelerator.unwrap_model(allocated["trainer"].denoiser)
    for a in ranks:
        for b in ranks:
            if sensitivity[a] > sensitivity[b]:
                cap = min(unet.get_submodule(a[len("unet."):]).base_layer.weight.shape)
                assert ranks[a] >= ranks[b] or ranks[a] == cap, (a, b)
    # the layers were injected at the allocated ranks
    assert {f"unet.{path}": layer.r["default"] for _, path, layer in allocated["trainer"].adapter.lora_layers()} == ranks


@pytest.mark.slow(seconds=15)
def test_the_allocation_is_a_function_of_the_seed(allocated, tmp_path):
    again = _allocation_run(tmp_path / "ws", deaf=allocated["deaf"])
    assert _allocation(again)["ranks"] == allocated["event"]["ranks"]


@pytest.mark.slow(seconds=20)
def test_the_file_has_per_module_ranks_that_diffusers_reads(allocated):
    from studio.adapters import attach_adapter, load_adapter
    from studio.models import load_pipeline
    from tests.test_formats import _diffusers_load, _lora_layers

    path, trainer = allocated["path"], allocated["trainer"]
    adapter = load_adapter(path)
    assert sorted(m.rank for m in adapter.modules.values()) == sorted(allocated["event"]["ranks"].values())
    args = json.loads(adapter.metadata["ss_network_args"])
    assert args["rank_allocation"] == "sensitivity" and args["rank_budget"] == str(BUDGET)

    expected = unet_out(trainer.accelerator.unwrap_model(trainer.denoiser))
    theirs = _deafened(load_pipeline("builtin"), allocated["deaf"])  # the base it was trained on
    base = unet_out(theirs.unet)
    messages = _diffusers_load(theirs, path)
    problems = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not been", "mismatch"))
                and "CLIPTextModel" not in m]  # a UNet-only file: nothing for the text encoder is right
    assert not problems, problems
    assert len(_lora_layers(theirs, "d")) == len(adapter.modules)
    assert (expected - base).abs().max() > 1e-3
    assert (unet_out(theirs.unet) - expected).abs().max() <= 1e-5
    ours = _deafened(load_pipeline("builtin"), allocated["deaf"])
    attach_adapter(ours, adapter, "s")
    assert (unet_out(ours.unet) - expected).abs().max() <= 1e-5
