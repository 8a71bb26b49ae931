"""EMA of the adapter weights: what is exported equals the closed-form EMA of the weights
the run went through (its checkpoints), and it resumes exactly."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import demo_config

DECAY, START, STEPS = 0.8, 2, 6


def _closed_form(trajectory: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """ema_T = d^(T-s) θ_s + Σ_{k=s+1..T} (1-d) d^(T-k) θ_k."""
    return {key: DECAY ** (STEPS - START) * trajectory[START][key]
            + sum((1 - DECAY) * DECAY ** (STEPS - k) * trajectory[k][key] for k in range(START + 1, STEPS + 1))
            for key in trajectory[STEPS]}


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow(seconds=20)
def test_ema_is_the_closed_form_ema_of_the_saved_trajectory_and_resumes_exactly(workspace):
    from studio.adapters import load_adapter
    from studio.jobs.runs import checkpoint_path, create_run, iter_events
    from trainers.checkpoints import load_checkpoint
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=STEPS, every_n_steps=1, learning_rate=1e-2, ema_decay=DECAY, ema_start_step=START)
    config.checkpoints.keep_last = 10
    config.sampling.steps = 1
    run_dir = create_run(config, workspace)
    trainer = AdapterTrainer(run_dir, show_progress=False)
    adapter_path = trainer.run()
    trajectory = {k: load_checkpoint(checkpoint_path(run_dir, k))["adapter"] for k in range(1, STEPS)}
    trajectory[STEPS] = trainer.adapter_state()
    expected = _closed_form(trajectory)
    with trainer.ema_weights():
        ema = trainer.adapter_state()
    assert _max_diff(ema, expected) <= 1e-6
    assert _max_diff(trajectory[STEPS], expected) > 1e-3  # the EMA lags the weights: the check can fail
    assert _max_diff(trainer.adapter_state(), trajectory[STEPS]) == 0  # the weights are back after the block

    # The file beside the adapter holds the EMA: the export of the closed form.
    ema_file = load_adapter(adapter_path.with_name(f"{config.name}-ema.safetensors"))
    assert json.loads(ema_file.metadata["lora_studio_ema"]) == {"decay": DECAY, "start_step": START}
    assert "lora_studio_ema" not in load_adapter(adapter_path).metadata
    trainer.load_adapter_state(expected)
    closed = trainer.adapter.export(trainer.model_ref.family)
    assert ema_file.modules.keys() == closed.modules.keys()
    assert max(float((ema_file.modules[k].up - closed.modules[k].up).abs().max()) for k in closed.modules) <= 1e-6
    assert max(float((ema_file.modules[k].down - closed.modules[k].down).abs().max()) for k in closed.modules) <= 1e-6

    # Resumed before and after the EMA starts, the run ends with the same EMA.
    for step in (1, 4):
        for later in range(step + 1, STEPS):
            checkpoint_path(run_dir, later).unlink(missing_ok=True)
        resumed = AdapterTrainer(run_dir, show_progress=False)
        resumed.run(resume=True)
        assert [e["step"] for e in iter_events(run_dir) if e["type"] == "resume"][-1] == step
        with resumed.ema_weights():
            assert _max_diff(resumed.adapter_state(), expected) <= 1e-6


def test_ema_as_the_adapter_and_a_start_after_the_end_is_refused(workspace):
    from studio.adapters import load_adapter
    from studio.errors import StudioError
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=3, learning_rate=1e-2, ema_decay=0.5, ema_export="as_adapter")
    config.sampling.steps = 1
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    path = trainer.run()
    assert sorted(p.name for p in path.parent.glob("*.safetensors")) == [path.name]
    with trainer.ema_weights():
        ema = trainer.adapter.export(trainer.model_ref.family)
    live = trainer.adapter.export(trainer.model_ref.family)
    saved = load_adapter(path)
    assert max(float((saved.modules[k].up - ema.modules[k].up).abs().max()) for k in ema.modules) <= 1e-6
    assert max(float((saved.modules[k].up - live.modules[k].up).abs().max()) for k in ema.modules) > 1e-4

    config = demo_config(max_steps=3, ema_decay=0.5, ema_start_step=3)
    with pytest.raises(StudioError, match="ema_start_step is 3 but the run is 3 steps long"):
        AdapterTrainer(create_run(config, workspace), show_progress=False).run()
