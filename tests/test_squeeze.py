"""LoRA-Squeeze during training: at squeeze_at_step every module becomes the truncated SVD
of its B·A at squeeze_rank, training goes on and the loss keeps dropping, a resume across
the squeeze is exact, and the file is a plain LoRA at squeeze_rank equal to the model."""
from __future__ import annotations

import json
import time

import pytest
import torch
from pydantic import ValidationError

from studio.config import network_config
from tests.conftest import demo_config
from tests.method_checks import unet_out
from tests.test_networks import _fixed_loss

RANK, SQUEEZED, AT, STEPS = 8, 2, 10, 30


@torch.no_grad()
def _deltas(trainer) -> dict[str, torch.Tensor]:
    return {path: layer.scaling["default"] * (layer.lora_B["default"].weight.flatten(1).double()
                                              @ layer.lora_A["default"].weight.flatten(1).double())
            for _, path, layer in trainer.adapter.lora_layers()}


@pytest.fixture(scope="module")
def squeezed(tmp_path_factory):
    """A LoCon run squeezed from RANK to SQUEEZED after step AT, STEPS steps in all: the
    deltas just before and after the squeeze, fixed-draw losses, and the exported file."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    torch.manual_seed(0)
    config = demo_config(max_steps=STEPS, learning_rate=3e-3)
    config.network = network_config("locon", like=config.network, rank=RANK, alpha=4.0, squeeze_rank=SQUEEZED,
                                    squeeze_at_step=AT)
    trainer = AdapterTrainer(create_run(config, Workspace.open(tmp_path_factory.mktemp("squeeze") / "ws")),
                      show_progress=False)
    trainer.setup()
    out = {"trainer": trainer, "start": _fixed_loss(trainer)}
    for step in range(AT - 1):
        trainer.train_step(step)
    squeeze = trainer.adapter.after_step

    def spy(done):
        out["before"] = _deltas(trainer)
        replaced = squeeze(done)
        out["after"] = _deltas(trainer)
        return replaced

    trainer.adapter.after_step = spy
    trainer.train_step(AT - 1)
    trainer.adapter.after_step = squeeze
    out["at_squeeze"] = _fixed_loss(trainer)
    out["states_after_squeeze"] = len(trainer.optimizer.state)
    for step in range(AT, STEPS):
        trainer.train_step(step)
    out["end"] = _fixed_loss(trainer)
    trainer.accelerator.unwrap_model(trainer.denoiser).eval()
    out["path"] = trainer.export(time.time())
    return out


def test_options_and_their_refusals():
    from studio.config import TrainConfig
    from studio.adapters.methods.squeeze import squeeze_target
    from ui import train_view as tv

    spec = next(s for s in tv.config_fields() if s.path == ("network", "squeeze_rank"))
    assert "LoRA-Squeeze" in spec.info
    with pytest.raises(ValidationError, match="must be below rank"):
        network_config(rank=8, squeeze_rank=8)
    with pytest.raises(ValidationError, match="squeeze_rank does not work with use_dora"):
        network_config(squeeze_rank=2, use_dora=True)
    with pytest.raises(ValidationError, match="an option of lora and locon, not of lokr"):
        network_config("lokr", squeeze_rank=2)
    with pytest.raises(ValidationError, match="must end before training.max_steps"):
        TrainConfig(network={"squeeze_rank": 2, "squeeze_at_step": 150, "squeeze_anneal_steps": 50})
    with pytest.raises(ValidationError, match="unset training.ema_decay"):
        TrainConfig(network={"squeeze_rank": 2}, training={"ema_decay": 0.99})
    # one-shot, then annealed 16 -> 4 over 3 steps (rounded up): 13, 10, 7, 4
    one = network_config(rank=16, squeeze_rank=4, squeeze_at_step=10)
    assert [squeeze_target(one, d) for d in (9, 10, 11)] == [None, 4, 4]
    annealed = network_config(rank=16, squeeze_rank=4, squeeze_at_step=10, squeeze_anneal_steps=3)
    assert [squeeze_target(annealed, d) for d in range(9, 15)] == [None, 13, 10, 7, 4, 4]


@pytest.mark.slow(seconds=45)
def test_the_squeeze_is_the_truncated_svd_and_training_goes_on(squeezed):
    before, after = squeezed["before"], squeezed["after"]
    assert before.keys() == after.keys() and any("conv" in path for path in before)
    for path, delta in before.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :SQUEEZED] * s[:SQUEEZED]) @ vh[:SQUEEZED]
        assert s[SQUEEZED] > 1e-3 * s[0], path  # the squeeze dropped something: the check can fail
        assert float((after[path] - best).norm() / best.norm()) <= 1e-5, path
    trainer = squeezed["trainer"]
    layers = trainer.adapter.lora_layers()
    assert {layer.r["default"] for *_, layer in layers} == {SQUEEZED}
    assert {tuple(layer.lora_A["default"].weight.shape[:1]) for *_, layer in layers} == {(SQUEEZED,)}
    # the optimizer holds the new factors, whose state restarted at the squeeze and grew back
    current = {id(layer.lora_A["default"].weight) for *_, layer in layers} | {
        id(layer.lora_B["default"].weight) for *_, layer in layers}
    grouped = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert squeezed["states_after_squeeze"] == 0
    assert grouped == current == {id(p) for p in trainer.trainable}
    assert all(trainer.optimizer.state[p]["exp_avg"].shape == p.shape for p in trainer.trainable)
    assert squeezed["end"] < squeezed["at_squeeze"] and squeezed["end"] < squeezed["start"]


@pytest.mark.slow(seconds=20)
def test_the_file_is_a_plain_lora_at_the_squeezed_rank_equal_to_the_model(squeezed):
    from studio.adapters import attach_adapter, load_adapter
    from studio.models import load_pipeline
    from tests.test_formats import _diffusers_load, _lora_layers

    adapter = load_adapter(squeezed["path"])
    assert {m.rank for m in adapter.modules.values()} == {SQUEEZED}
    assert adapter.metadata["ss_network_module"] == "networks.lora"
    assert json.loads(adapter.metadata["ss_network_args"])["squeeze_rank"] == str(SQUEEZED)
    trainer = squeezed["trainer"]
    expected = unet_out(trainer.accelerator.unwrap_model(trainer.denoiser))
    ours = load_pipeline("builtin")
    base = unet_out(ours.unet)
    attach_adapter(ours, adapter, "sq")
    assert (expected - base).abs().max() > 1e-3
    assert (unet_out(ours.unet) - expected).abs().max() <= 1e-5
    theirs = load_pipeline("builtin")
    messages = _diffusers_load(theirs, squeezed["path"])
    problems = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not been", "mismatch"))
                and "CLIPTextModel" not in m]  # a UNet-only file: nothing for the text encoder is right
    assert not problems, problems
    assert len(_lora_layers(theirs, "d")) == len(adapter.modules)
    assert (unet_out(theirs.unet) - expected).abs().max() <= 1e-5


@pytest.mark.slow(seconds=20)
def test_generate_reproduces_the_runs_last_sample(squeezed, tmp_path):
    from tests.method_checks import assert_generate_reproduces_sample

    assert_generate_reproduces_sample(squeezed["trainer"], squeezed["path"], tmp_path, step=STEPS)


@pytest.mark.slow(seconds=30)
def test_a_resume_across_an_annealed_squeeze_is_exact(workspace):
    """Checkpoint at step 4, in the middle of the anneal (8 -> 6 -> 4 -> 2 after steps 3, 4, 5)."""
    from studio.jobs.runs import create_run, iter_events
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=8, every_n_steps=4, learning_rate=3e-3)
    config.sampling.steps = 1
    config.network.rank, config.network.squeeze_rank = RANK, SQUEEZED
    config.network.squeeze_at_step, config.network.squeeze_anneal_steps = 3, 2
    run_dir = create_run(config, workspace)
    full = AdapterTrainer(run_dir, show_progress=False)
    full.run(resume=False)
    resumed = AdapterTrainer(run_dir, show_progress=False)
    resumed.run(resume=True)
    assert [e["step"] for e in iter_events(run_dir) if e["type"] == "resume"] == [4]
    a, b = full.adapter_state(), resumed.adapter_state()
    assert a.keys() == b.keys() and {v.shape[0] for k, v in a.items() if "lora_A" in k} == {SQUEEZED}
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow(seconds=20)
def test_it_blends_with_another_adapter(squeezed, tmp_path):
    from studio.adapters import adapter_models, export_adapter, save_adapter
    from studio.generation.engine import AdapterUse, Engine
    from studio.models import load_pipeline
    from tests.test_blending import _merged_base
    from tests.test_formats import add_adapter, perturb

    other = load_pipeline("builtin")
    torch.manual_seed(1)  # the other adapter's random init
    add_adapter(other, "lora")
    perturb(adapter_models(other).values())
    lora = save_adapter(tmp_path / "lora.safetensors", export_adapter(adapter_models(other)))
    engine = Engine()
    alone = unet_out(engine.set_mix("builtin", [AdapterUse(squeezed["path"], 0.8)]).unet)
    mixed = unet_out(engine.set_mix("builtin", [AdapterUse(squeezed["path"], 0.8), AdapterUse(lora, 0.5)]).unet)
    expected = unet_out(_merged_base([(squeezed["path"], 0.8), (lora, 0.5)]).unet)
    assert (mixed - alone).abs().max() > 1e-3
    assert (mixed - expected).abs().max() <= 1e-4
