"""Every adapter type trains through the same trainer: loss on fixed draws goes down."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.adapters.methods import METHODS
from studio.config import network_config
from tests.conftest import demo_config

NETWORKS = {
    "lora": {},
    "locon": {"type": "locon", "conv_rank": 4},
    "dora": {"use_dora": True},
    "rslora+loraplus": {"use_rslora": True, "loraplus_lr_ratio": 4.0},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "loha": {"type": "loha", "rank": 4, "alpha": 4.0},
    "lokr": {"type": "lokr", "rank": 4, "alpha": 4.0},
    "tlora": {"type": "tlora", "rank": 8, "tlora_min_rank": 4},
    "tlora-vanilla": {"type": "tlora", "rank": 8, "tlora_min_rank": 4, "tlora_ortho": False},
    "lora_fa": {"type": "lora_fa"},
    "sensitivity": {"type": "locon", "rank_allocation": "sensitivity", "train_text_encoder": True},
    "squeeze": {"type": "locon", "squeeze_rank": 2, "squeeze_at_step": 10, "squeeze_anneal_steps": 4},
}


def _fixed_loss(trainer, steps=range(5000, 5012)) -> float:
    with torch.no_grad():
        return float(np.mean([trainer.loss(k).item() for k in steps]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(NETWORKS))
def test_network_trains(kind, workspace):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=30, learning_rate=3e-3)
    config.network = network_config(like=config.network, **NETWORKS[kind])
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    before = _fixed_loss(trainer)
    for step in range(30):
        trainer.train_step(step)
    after = _fixed_loss(trainer)
    assert after < before, (kind, before, after)


@pytest.mark.slow(seconds=8)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_one_step_or_is_refused_in_one_line(method, workspace):
    """The quick preset (its down blocks at block_lr 0) with each method at its defaults, one
    step at 32 px without class pictures or samples: a file that loads, or one line naming
    the step count, before anything is made."""
    import tomllib

    from studio import PRESETS_DIR
    from studio.adapters import load_adapter
    from studio.config import DEMO_DATASET, parse_config
    from studio.errors import StudioError
    from studio.jobs.runs import create_run
    from trainers.run import train_run

    data = tomllib.loads((PRESETS_DIR / "tiny-demo-quick.toml").read_text())
    data["network"] = {"type": method}
    data["dataset"].update(path=str(DEMO_DATASET), resolution=32, num_class_images=0)
    data["training"]["max_steps"] = 1
    data["sampling"]["prompts"] = []
    try:
        config = parse_config(data, "tiny-demo-quick")
    except StudioError as error:
        assert "\n" not in str(error) and "training.max_steps" in str(error)
        return
    assert load_adapter(train_run(create_run(config, workspace), show_progress=False)).modules
