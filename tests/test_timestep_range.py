"""training.min_timestep / max_timestep (sd-scripts' --min_timestep / --max_timestep): the
UNet sees only timesteps in [min_timestep, max_timestep)."""
from __future__ import annotations

import pytest

from tests.conftest import demo_config


def _timesteps_seen(config, workspace, steps: int = 4) -> list[int]:
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    seen: list[int] = []
    hook = trainer.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.extend(int(t) for t in (args[1] if len(args) > 1 else kwargs["timestep"])),
        with_kwargs=True)
    for step in range(steps):
        trainer.train_step(step)
    hook.remove()
    return seen


@pytest.mark.slow(seconds=6)
@pytest.mark.parametrize("low, high", [(900, 1000), (0, 50), (400, 402)])
def test_training_draws_timesteps_only_from_the_range(low, high, workspace):
    config = demo_config(min_timestep=low, max_timestep=high, batch_size=4)
    seen = _timesteps_seen(config, workspace)
    assert len(seen) == 16
    assert all(low <= t < high for t in seen), seen
    assert len(set(seen)) > 1  # drawn, not pinned to one end


def test_an_empty_range_is_refused():
    from studio.config import parse_config
    from studio.errors import StudioError

    with pytest.raises(StudioError, match=r"min_timestep \(500\) must be below max_timestep \(500\)"):
        parse_config({"training": {"min_timestep": 500, "max_timestep": 500}})
    with pytest.raises(StudioError, match="training.max_timestep"):
        parse_config({"training": {"max_timestep": 1001}})
