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


def worker_command(run_dir: Path, config: TrainConfig) -> list[str]:
    """The command that trains `run_dir`: `python -m trainers RUN_DIR`, or, for several
    processes, the same under accelerate's own launcher (`--multi_gpu` also starts gloo
    processes on a CPU; its `--cpu` would silently start one)."""
    import sys

    worker = ["-m", "trainers", str(run_dir), "--quiet"]
    t = config.training
    if t.num_processes == 1 and not t.accelerate_config:
        return [sys.executable, *worker]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(t.num_processes)]
    if t.accelerate_config:
        launch += ["--config_file", str(t.accelerate_config)]
    else:
        launch += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", t.mixed_precision,
                   "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return launch + worker


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_config(run_dir: Path) -> TrainConfig:
    return load_config(Path(run_dir) / CONFIG_FILE)


def run_outcome(run_dir: Path) -> tuple[str, str, str | None]:
    """(state, message, adapter) from a finished worker's events."""
    from trainers.events import iter_events

    state, message, adapter = "", "", None
    for event in iter_events(run_dir):
        if event["type"] == "done":
            state, adapter = "done", event.get("adapter")
        elif event["type"] == "error":
            state, message = "failed", event.get("message", "")
        elif event["type"] == "cancelled":
            state, message = "cancelled", "cancelled; resume continues from the last checkpoint"
        elif event["type"] in ("start", "resume"):
            state, message = "", ""
    return state, message, adapter


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
