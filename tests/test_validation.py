"""Validation loss on held-out pictures: they never train, the loss is measured on the same
draws every time, and it reaches events.jsonl and TensorBoard."""
from __future__ import annotations

import json

import pytest

from tests.conftest import demo_config


def test_validation_indices_are_a_seeded_share():
    from trainers.data import validation_indices

    assert validation_indices(12, 0.0, 1) == []
    assert len(validation_indices(12, 0.25, 1)) == 3 and len(validation_indices(12, 0.01, 1)) == 1
    assert validation_indices(12, 0.25, 1) == validation_indices(12, 0.25, 1) != validation_indices(12, 0.25, 2)


@pytest.mark.slow(seconds=15)
def test_held_out_pictures_give_a_validation_loss_in_events_and_tensorboard(workspace):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from studio.jobs.runs import TENSORBOARD_DIR, create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=8, every_n_steps=4, learning_rate=1e-2, validate_every_n_steps=4)
    config.dataset.validation_split = 0.25
    config.sampling.steps = 1
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    held_out = {ex.path for ex in trainer.validation}
    assert len(held_out) == 3 and len(trainer.instance) == 9 and not held_out & {ex.path for ex in trainer.instance}
    trained_on = {trainer.instance[i].path for k in range(3 * trainer.instance_order.batches_per_epoch)
                  for i in trainer.instance_order.batch(k)}
    assert not trained_on & held_out
    first = trainer.validation_loss()
    assert trainer.validation_loss() == first  # the same draws every time: only the weights change it
    unet = trainer.accelerator.unwrap_model(trainer.denoiser)
    assert unet.training  # the mode is given back

    trainer.run(resume=False)
    events = [json.loads(line) for line in (trainer.run_dir / "events.jsonl").read_text().splitlines()]
    validation = [(e["step"], e["loss"]) for e in events if e["type"] == "validation"]
    assert [step for step, _ in validation] == [4, 8]
    assert validation[-1][1] == pytest.approx(trainer.validation_loss()) and abs(validation[-1][1] - first) > 1e-6
    tb = EventAccumulator(str(trainer.run_dir / TENSORBOARD_DIR))
    tb.Reload()
    assert [(s.step, s.value) for s in tb.Scalars("validation_loss")] == [(s, pytest.approx(v)) for s, v in validation]

    # Resumed from step 4, the run ends with the same validation loss.
    AdapterTrainer(trainer.run_dir, show_progress=False).run(resume=True)
    events = [json.loads(line) for line in (trainer.run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "resume"] == [4]
    assert [e["loss"] for e in events if e["type"] == "validation"][-1] == validation[-1][1]


def test_a_split_that_holds_out_everything_is_refused(tmp_path, workspace):
    import shutil

    from studio import ASSETS_DIR
    from studio.errors import StudioError
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    folder = tmp_path / "one"
    folder.mkdir()
    for name in ("sks_01.png", "sks_01.txt"):
        shutil.copy(ASSETS_DIR / "demo-dataset" / name, folder / name)
    config = demo_config(max_steps=2)
    config.dataset.path, config.dataset.validation_split = str(folder), 0.5
    with pytest.raises(StudioError, match="holds out every one of the 1 training pictures"):
        AdapterTrainer(create_run(config, workspace), show_progress=False).run()
