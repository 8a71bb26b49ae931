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
