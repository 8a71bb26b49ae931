"""Prodigy and Adafactor train the demo adapter, and a run resumed from a checkpoint ends
where the uninterrupted run ends (the optimizer's state is saved and restored)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import demo_config

OPTIMIZERS = {
    # Prodigy's learning rate multiplies its estimated step size d.
    "prodigy": {"learning_rate": 1.0, "optimizer": "prodigy"},
    "adafactor": {"optimizer": "adafactor", "learning_rate": 3e-3},
}


def _fixed_loss(trainer, steps=range(5000, 5012)) -> float:
    with torch.no_grad():
        return float(np.mean([trainer.loss(k).item() for k in steps]))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_lowers_the_demo_loss(name, workspace):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    trainer = AdapterTrainer(create_run(demo_config(max_steps=30, **OPTIMIZERS[name]), workspace), show_progress=False)
    trainer.setup()
    assert type(trainer.optimizer.optimizer).__name__.lower() == name
    before = _fixed_loss(trainer)
    for step in range(30):
        trainer.train_step(step)
    after = _fixed_loss(trainer)
    assert after < before, (name, before, after)


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_with_optimizer_state_is_exact(name, workspace):
    from studio.jobs.runs import checkpoint_path, create_run, iter_events
    from trainers.checkpoints import load_checkpoint
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=6, every_n_steps=3, **OPTIMIZERS[name])
    config.sampling.steps = 1
    run_dir = create_run(config, workspace)
    full = AdapterTrainer(run_dir, show_progress=False)
    full.run(resume=False)
    resumed = AdapterTrainer(run_dir, show_progress=False)
    resumed.run(resume=True)  # from step-000003.pt
    assert [e["step"] for e in iter_events(run_dir) if e["type"] == "resume"] == [3]
    at_3 = load_checkpoint(checkpoint_path(run_dir, 3))["adapter"]
    a, b = full.adapter_state(), resumed.adapter_state()
    assert a.keys() == b.keys() == at_3.keys()
    moved = _max_diff(a, at_3)  # Prodigy's first steps are small: d starts at 1e-6 and grows
    assert moved > 0 and _max_diff(a, b) <= 1e-3 * moved
    # The same three steps from the same checkpoint with a fresh optimizer (Prodigy's d and
    # Adafactor's second moments lost) end elsewhere: the check above can fail.
    fresh = AdapterTrainer(run_dir, show_progress=False)
    fresh.setup()
    fresh.load_adapter_state(at_3)
    for step in range(3, 6):
        fresh.train_step(step)
    assert _max_diff(a, fresh.adapter_state()) > 0.1 * moved


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_prodigy_with_an_adamw_learning_rate_is_refused_in_one_line():
    from studio.config import parse_config
    from studio.errors import StudioError

    with pytest.raises(StudioError) as error:
        parse_config({"training": {"optimizer": "prodigy", "learning_rate": 1e-3}})
    message = str(error.value)
    assert "\n" not in message and "training" in message and "learning_rate = 0.001" in message
    assert "set it to 1.0" in message
    assert parse_config({"training": {"optimizer": "prodigy", "learning_rate": 1.0}}).training.optimizer == "prodigy"


@pytest.mark.parametrize("network, training, named", [
    ({"loraplus_lr_ratio": 16.0}, {}, "network.loraplus_lr_ratio = 16"),
    ({"rank_allocation": "ard"}, {}, "network.ard_lr_ratio = 10"),  # ARD's scales learn at their own rate
    ({"train_text_encoder": True}, {"text_encoder_lr": 0.5}, "training.text_encoder_lr = 0.5"),
    ({}, {"block_lr_mid": 0.5}, "training.block_lr_mid = 0.5"),
])
def test_prodigy_refuses_parameter_groups_at_different_rates(network, training, named):
    from studio.config import parse_config
    from studio.errors import StudioError

    with pytest.raises(StudioError, match="one learning rate") as error:
        parse_config({"network": network, "training": {"optimizer": "prodigy", "learning_rate": 1.0, **training}})
    assert named in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow(seconds=5)
def test_prodigy_with_a_block_turned_off_trains_the_others(workspace):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=3, block_lr_up=0.0, **OPTIMIZERS["prodigy"])
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    start = trainer.adapter_state()
    for step in range(3):
        trainer.train_step(step)
    end = trainer.adapter_state()
    moved = {key: float((end[key] - start[key]).abs().max()) for key in start}
    assert all(v == 0 for k, v in moved.items() if ".up_blocks." in f".{k}")
    assert any(v > 0 for k, v in moved.items() if ".down_blocks." in f".{k}")
