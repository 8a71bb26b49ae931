"""How long a training run takes on this machine, from measured speed: the events of the
newest run of the same model and network here, else a few steps of the config trained and
timed (`measure_speed`, about ten seconds on the built-in model).

    python -m studio.jobs.speed presets/tiny-demo.toml [--workspace DIR]
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from studio.config import TrainConfig, load_config
from studio.datasets import load_items
from studio.errors import StudioError
from studio.jobs import list_jobs
from studio.jobs.runs import check_training, create_run, dataset_folder, iter_events, run_config
from studio.models.hub import is_model_name, local_path
from studio.workspace import Workspace

MEASURED_STEPS = 5
WARMUP_STEPS = 2


@dataclass(frozen=True)
class Speed:
    steps_per_s: float            # optimizer steps per second
    pixels_per_step: int          # image pixels one step trains (batch, accumulation and class images counted)
    source: str                   # where the figure comes from, for the person reading it
    setup_s: float | None = None  # loading the model and caching the dataset
    sample_image_s: float | None = None  # one sample picture at `sample_steps` steps
    sample_steps: int = 0


def pixels_per_step(config: TrainConfig, *, with_class_images: bool) -> int:
    t = config.training
    class_batch = (config.dataset.class_batch_size or t.batch_size) if with_class_images else 0
    return config.dataset.resolution ** 2 * (t.batch_size + class_batch) * t.gradient_accumulation_steps


def _prior_preservation(config: TrainConfig) -> bool:
    return bool(config.dataset.class_prompt and config.dataset.num_class_images)


def speed_from_runs(workspace: Workspace, config: TrainConfig, *, newest: int = 10) -> Speed | None:
    """The speed of the newest of the last `newest` runs here that trained the same base
    model with the same kind of network and logged progress."""
    for job in list_jobs(workspace)[:newest]:
        run_dir = job.run_dir(workspace)
        try:
            ran = run_config(run_dir)
        except StudioError:
            continue
        if ran.base_model != config.base_model or ran.network.type != config.network.type:
            continue
        speeds = [e["it_s"] for e in iter_events(run_dir) if e.get("type") == "progress" and e.get("it_s")]
        if speeds:
            return Speed(speeds[-1], pixels_per_step(ran, with_class_images=_prior_preservation(ran)),
                         f"run {job.id} on this machine")
    return None


def measure_speed(config: TrainConfig, workspace: Workspace, *, steps: int = MEASURED_STEPS,
                  warmup: int = WARMUP_STEPS) -> Speed:
    """Train `steps` steps of `config` (after `warmup` untimed ones) in a throwaway run folder,
    in a worker process (`python -m trainers.speed`), and time them and one round of sample
    pictures. Nothing is written to the workspace:
    class images it lacks are not generated (the steps are timed without them)."""
    import subprocess
    import sys
    import tempfile

    folder = dataset_folder(config, workspace)
    trial = config.model_copy(deep=True)
    trial.dataset.path, trial.dataset.name = str(folder), None
    if is_model_name(config.base_model):  # the trial runs in a workspace of its own: give it the files
        trial.base_model = str(local_path(config.base_model, workspace, use="base model"))
    trial.training.max_steps, trial.training.max_epochs = warmup + steps, None
    trial.checkpoints.every_n_steps = trial.sampling.every_n_steps = 0
    with_class = False
    if _prior_preservation(config):
        present = sum(item.is_regularisation for item in load_items(folder))
        trial.dataset.num_class_images = min(present, config.dataset.num_class_images)
        with_class = present > 0
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        run_dir = create_run(trial, Workspace.open(Path(tmp) / "ws"))
        done = subprocess.run([sys.executable, "-m", "trainers.speed", str(run_dir), "--steps", str(steps),
                               "--warmup", str(warmup)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env={**os.environ, "LORA_STUDIO_LOG_LEVEL": "WARNING"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise StudioError(f"Measuring the training speed failed: {last.removeprefix('error: ')}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    steps_per_s, setup_s, sample_image_s = measured["steps_per_s"], measured["setup_s"], measured["sample_image_s"]
    return Speed(steps_per_s, pixels_per_step(trial, with_class_images=with_class),
                 f"{steps} steps measured on this machine", setup_s=setup_s, sample_image_s=sample_image_s,
                 sample_steps=trial.sampling.steps)


@dataclass(frozen=True)
class Estimate:
    setup_s: float | None
    training_s: float
    samples_s: float | None
    class_images_s: float | None
    sample_pictures: int

    @property
    def total_s(self) -> float:
        return sum(part or 0.0 for part in (self.setup_s, self.training_s, self.samples_s, self.class_images_s))


def estimate(config: TrainConfig, speed: Speed, *, missing_class_images: int = 0) -> Estimate:
    """The time `config` takes at `speed`: steps scale with the pixels a step trains; sample
    pictures (during training and at the end) and class images to generate scale with their
    inference steps."""
    steps_per_s = speed.steps_per_s * speed.pixels_per_step / pixels_per_step(
        config, with_class_images=_prior_preservation(config))
    s = config.sampling
    rounds = ((config.training.max_steps - 1) // s.every_n_steps if s.every_n_steps else 0) + 1
    pictures = len(s.prompts) * rounds
    per_picture = None
    if speed.sample_image_s and speed.sample_steps:
        per_picture = speed.sample_image_s * s.steps / speed.sample_steps
    return Estimate(setup_s=speed.setup_s, training_s=config.training.max_steps / steps_per_s,
                    samples_s=per_picture * pictures if per_picture is not None else None,
                    class_images_s=per_picture * missing_class_images if per_picture is not None else None,
                    sample_pictures=pictures)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m studio.jobs.speed", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--workspace", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    config = load_config(args.config)
    workspace = Workspace.open(args.workspace)
    check = check_training(config, workspace)
    check.raise_problems()
    speed = measure_speed(config, workspace)
    plan = estimate(config, speed, missing_class_images=check.missing_class_images)
    print(f"{config.name}: {speed.steps_per_s:.2f} steps/s ({speed.source}); about {plan.total_s / 60:.1f} min "
          f"for {config.training.max_steps} steps: set-up {plan.setup_s or 0:.0f} s, training "
          f"{plan.training_s:.0f} s, {plan.sample_pictures} sample pictures {plan.samples_s or 0:.0f} s, "
          f"class images {plan.class_images_s or 0:.0f} s")
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except StudioError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
