"""dataset.class_batch_size: the class (prior) pictures a step carries beside the training
pictures; the prior loss is their mean whatever their number."""
from __future__ import annotations

import pytest

from tests.conftest import demo_config


def _trainer(workspace, **dataset):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(batch_size=3)
    config.dataset.num_class_images = 24  # the demo dataset's reg/ pictures
    for key, value in dataset.items():
        setattr(config.dataset, key, value)
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    return trainer


def _unet_batches(trainer, steps: int = 2) -> list[int]:
    sizes: list[int] = []
    hook = trainer.denoiser.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    for step in range(steps):
        trainer.train_step(step)
    hook.remove()
    return sizes


@pytest.mark.slow(seconds=6)
@pytest.mark.parametrize("class_batch, seen", [(None, 6), (1, 4), (5, 8)])
def test_a_step_carries_class_batch_size_class_pictures(class_batch, seen, workspace):
    trainer = _trainer(workspace, class_batch_size=class_batch)
    assert _unet_batches(trainer) == [seen, seen]  # instance and class pictures in one pass


@pytest.mark.slow(seconds=6)
def test_the_prior_loss_is_the_mean_of_the_class_pictures(workspace):
    import torch

    trainer = _trainer(workspace, class_batch_size=2, prior_loss_weight=0.25)
    per_sample = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    trainer.per_sample_loss = lambda *args, **kwargs: per_sample
    assert float(trainer.loss(0)) == pytest.approx(2.0 + 0.25 * 15.0)
