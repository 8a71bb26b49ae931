"""TensorBoard event files in the run folder, read back with TensorBoard's own reader."""
from __future__ import annotations

import json

import pytest

from tests.conftest import demo_config


def _accumulator(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from studio.jobs.runs import TENSORBOARD_DIR

    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow(seconds=15)
def test_event_accumulator_reads_the_runs_loss_lr_and_samples(workspace):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=10, every_n_steps=5, log_every_n_steps=5, lr_scheduler="linear")
    config.sampling.every_n_steps, config.sampling.steps = 5, 1
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.run()
    progress = [json.loads(line) for line in (trainer.run_dir / "events.jsonl").read_text().splitlines()
                if json.loads(line)["type"] == "progress"]
    tb = _accumulator(trainer.run_dir)
    assert [(s.step, s.value) for s in tb.Scalars("loss")] == [(e["step"], pytest.approx(e["loss"])) for e in progress]
    assert [(s.step, s.value) for s in tb.Scalars("lr")] == [(e["step"], pytest.approx(e["lr"])) for e in progress]
    assert [s.step for s in tb.Scalars("lr")] == [5, 10] and tb.Scalars("lr")[1].value < tb.Scalars("lr")[0].value
    assert [(i.step, i.width, i.height) for i in tb.Images("samples/0")] == [(5, 64, 64), (10, 64, 64)]

    # A resumed run logs the steps after its checkpoint again; TensorBoard shows them once.
    AdapterTrainer(trainer.run_dir, show_progress=False).run(resume=True)
    again = _accumulator(trainer.run_dir)
    assert [(s.step, s.value) for s in again.Scalars("loss")] == [(s.step, s.value) for s in tb.Scalars("loss")]


def test_tensorboard_off_writes_no_event_files(workspace):
    from studio.jobs.runs import TENSORBOARD_DIR, create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=2, tensorboard=False)
    config.sampling.steps = 1
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.run()
    assert not (trainer.run_dir / TENSORBOARD_DIR).exists()
