"""The trainer a run folder's config asks for: `AdapterTrainer` (trainers/trainer.py), or for a
mixture's gates `MixtureTrainer` (trainers/mixture.py, which builds on it). Chosen here, above
both, so that neither imports the other but the one way."""
from __future__ import annotations

from pathlib import Path

from studio.config import load_config
from studio.jobs.runs import CONFIG_FILE
from trainers.trainer import AdapterTrainer
from trainers.mixture import MixtureTrainer


def train_run(run_dir: Path, *, resume: bool = True, show_progress: bool = True) -> Path | None:
    """Train the run in `run_dir` (its config.toml), resuming from its last checkpoint.
    Returns the adapter's path (None in the processes of a data-parallel run but the main one)."""
    config = load_config(Path(run_dir) / CONFIG_FILE)
    trainer = AdapterTrainer
    if config.mixture.members:  # a mixture's gates, its members frozen
        trainer = MixtureTrainer
    return trainer(Path(run_dir), config, show_progress=show_progress).run(resume=resume)
