"""Training runs on disk, the contract between the studio and the worker (trainers/):

    runs/<id>/config.toml     the fully resolved config (input, written by create_run)
    runs/<id>/events.jsonl    append-only progress, loss, samples, errors (EventLog)
    runs/<id>/checkpoints/    step-NNNNNN.pt resumable states
    runs/<id>/samples/        step-NNNNNN-I.png preview images
    adapters/<name>.safetensors  where a finished run's adapter goes (adapters_dir)

The CLI, the job supervisor and the UI create runs here; the worker reads and writes the
folder through these names. Nothing here imports trainers."""
from __future__ import annotations

import datetime
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from studio.config import TrainConfig, check_device_support, load_config, save_config
from studio.errors import StudioError
from studio.workspace import Workspace

CONFIG_FILE = "config.toml"
EVENTS_FILE = "events.jsonl"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})\.pt$")


def run_workspace(run_dir: Path) -> Workspace:
    """The workspace a run folder belongs to (create_run puts runs in workspace/runs)."""
    return Workspace.open(Path(run_dir).resolve().parent.parent)


def adapters_dir(run_dir: Path) -> Path:
    return run_workspace(run_dir).adapters_dir


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:06d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


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


# --------------------------------------------------------------------------------------
# events.jsonl: the one-way progress channel from a run to the CLI and the UI
# --------------------------------------------------------------------------------------


class EventLog:
    """Append-only JSON lines; each line is flushed and fsynced so a reader (or a crash)
    never sees half an event."""

    def __init__(self, run_dir: Path, *, write: bool = True):
        """`write` False: a process of a data-parallel run other than the main one, whose
        events the main process writes once for all."""
        self.path = Path(run_dir) / EVENTS_FILE
        self.write = write
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, "time": round(time.time(), 3), **fields}
        if not self.write:
            return event
        line = json.dumps(event, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        return event


def read_events(run_dir: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events from byte `offset` on, and the offset after the last complete line (for tailing)."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.exists():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end


def iter_events(run_dir: Path) -> Iterator[dict]:
    yield from read_events(run_dir)[0]
