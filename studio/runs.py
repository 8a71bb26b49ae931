"""Training runs on disk: runs/<id>/config.toml (input), events.jsonl, checkpoints/,
samples/ (output). The CLI, the job supervisor and the UI all create runs here."""
from __future__ import annotations

import datetime
from pathlib import Path

from studio.config import TrainConfig, check_device_support, load_config, save_config
from studio.errors import StudioError
from studio.workspace import Workspace

CONFIG_FILE = "config.toml"


def new_run_id(config: TrainConfig, workspace: Workspace) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id, n = f"{config.name}-{stamp}", 1
    while workspace.run_dir(run_id).exists():
        n += 1
        run_id = f"{config.name}-{stamp}-{n}"
    return run_id


def dataset_folder(config: TrainConfig, workspace: Workspace) -> Path:
    """The folder a config trains on: `dataset.path`, the workspace dataset `dataset.name`,
    else the demo dataset. Raises a StudioError when it is not a folder."""
    from studio.config import DEMO_DATASET

    ds = config.dataset
    folder = Path(ds.path) if ds.path else workspace.dataset_dir(ds.name) if ds.name else DEMO_DATASET
    if not folder.is_dir():
        where = f"Dataset {ds.name!r} is not in {workspace.datasets_dir}" if ds.name and not ds.path \
            else f"Dataset folder {folder} does not exist"
        raise StudioError(f"{where}; import one with `lora-studio dataset import` (or the Datasets tab), or "
                          "check the name.")
    return folder


def check_ready(config: TrainConfig, workspace: Workspace) -> int:
    """Refuse what cannot start, before a run folder is made: options this machine cannot
    run, a dataset that is missing or has no training images, a base model not found.
    Returns the dataset's images per epoch (repeats counted)."""
    from studio.datasets import dataset_stats
    from studio.models import resolve_model

    check_device_support(config)
    folder = dataset_folder(config, workspace)
    stats = dataset_stats(folder)
    if stats.image_count == 0:
        raise StudioError(f"Dataset {config.dataset.name or folder} has no training images; add some (the Datasets "
                          "tab or `lora-studio dataset import`), or check it with `lora-studio dataset check`.")
    resolve_model(config.base_model)
    return stats.steps_per_epoch


def create_run(config: TrainConfig, workspace: Workspace) -> Path:
    """A new run folder holding the fully resolved config; a config this machine cannot
    run (CUDA-only options without CUDA) is refused first."""
    check_device_support(config)
    run_dir = workspace.run_dir(new_run_id(config, workspace))
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / CONFIG_FILE)
    return run_dir


def run_config(run_dir: Path) -> TrainConfig:
    return load_config(Path(run_dir) / CONFIG_FILE)


def is_finished(run_dir: Path) -> bool:
    from trainers.events import iter_events

    return any(e.get("type") == "done" for e in iter_events(run_dir))


def latest_unfinished_run(config: TrainConfig, workspace: Workspace) -> Path | None:
    """The newest run of the same adapter name that has not finished (for `train --resume`)."""
    candidates = []
    for run_dir in workspace.runs_dir.iterdir() if workspace.runs_dir.is_dir() else []:
        if not (run_dir / CONFIG_FILE).is_file() or is_finished(run_dir):
            continue
        try:
            if run_config(run_dir).name == config.name:
                candidates.append(run_dir)
        except StudioError:
            continue
    return max(candidates, key=lambda p: (p / CONFIG_FILE).stat().st_mtime, default=None)
