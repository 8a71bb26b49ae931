"""Epochs as an alternative to max_steps, and a checkpoint at the end of every N-th epoch."""
from __future__ import annotations

import json

import pytest

from tests.conftest import demo_config


def test_epoch_arithmetic():
    from studio.config import TrainingConfig, planned_steps, steps_for_epochs
    from studio.errors import StudioError
    from trainers.data import epochs_done

    assert steps_for_epochs(3, 12, 1) == 36
    assert steps_for_epochs(3, 12, 5) == 8          # 36 micro-batches in steps of 5: the last step ends the third
    assert steps_for_epochs(1, 7, 2) == 4
    assert [epochs_done(s, 12, 5) for s in (2, 3, 4, 5, 7, 8)] == [0, 1, 1, 2, 2, 3]
    assert [epochs_done(s, 6, 1) for s in (5, 6, 11, 12)] == [0, 1, 1, 2]
    with pytest.raises(StudioError, match="max_epochs = 100000 makes 1200000 steps"):
        steps_for_epochs(100_000, 12, 1)
    # what the Train tab and `check` say before the run: 13 pictures (repeats counted), 2 processes x batch 3
    training = TrainingConfig(max_steps=50, max_epochs=4, batch_size=3, num_processes=2, gradient_accumulation_steps=2)
    assert planned_steps(training, 13) == 6        # ceil(13 / 6) = 3 batches an epoch, 12 micro-batches, 2 a step
    assert planned_steps(TrainingConfig(max_steps=50), 13) == 50


@pytest.mark.slow(seconds=15)
@pytest.mark.parametrize("batch_size, accumulation, steps, checkpoints", [
    (2, 1, 18, [6, 12]),      # 12 pictures, batch 2: 6 steps an epoch
    (1, 5, 8, [3, 5]),        # 12 micro-batches an epoch, 5 a step: epochs end in steps 3, 5 and 8
])
def test_a_run_of_epochs_ends_at_its_step_with_a_checkpoint_per_epoch(batch_size, accumulation, steps, checkpoints,
                                                                      workspace):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=1000, batch_size=batch_size, gradient_accumulation_steps=accumulation)
    config.training.max_epochs = 3
    config.checkpoints.every_n_epochs = 1
    config.checkpoints.keep_last = 10
    config.sampling.steps = 1
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.run()
    assert len(trainer.instance) == 12 and trainer.instance_order.batches_per_epoch == 12 // batch_size
    events = [json.loads(line) for line in (trainer.run_dir / "events.jsonl").read_text().splitlines()]
    start = [e for e in events if e["type"] not in ("phase", "cache")][0]  # set-up's reports come first
    assert start["type"] == "start" and start["max_steps"] == steps
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == checkpoints
    assert events[-1]["type"] == "done" and events[-1]["step"] == steps
