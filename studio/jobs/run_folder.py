"""The run folder, the contract between the studio and the worker (trainers/):

    runs/<id>/config.toml     the fully resolved config (input, written by create_run)
    runs/<id>/events.jsonl    append-only progress, loss, validation loss, samples, errors (EventLog)
    runs/<id>/checkpoints/    step-NNNNNN.pt resumable states
    runs/<id>/samples/        step-NNNNNN-I.png preview images
    runs/<id>/tensorboard/    TensorBoard event files: loss, validation loss, lr, sample images
                              (`tensorboard --logdir workspace/runs` shows every run)
    adapters/<name>.safetensors  where a finished run's adapter goes (adapters_dir)

The worker reads and writes the folder through these names; the studio makes runs with
studio.jobs.runs (which re-exports these names) and reads them here. Nothing here imports
trainers, nor what making a run needs (datasets, models, mixtures)."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from studio.config import DEMO_DATASET, TrainConfig, load_config
from studio.errors import StudioError
from studio.workspace import Workspace

CONFIG_FILE = "config.toml"
EVENTS_FILE = "events.jsonl"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
EMBEDDINGS_DIR = "embeddings"  # pivotal tuning's embedding as a file of its own: <trigger>.safetensors
TENSORBOARD_DIR = "tensorboard"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})\.pt$")


def run_workspace(run_dir: Path) -> Workspace:
    """The workspace a run folder belongs to (create_run puts runs in workspace/runs)."""
    return Workspace(Path(run_dir).resolve().parent.parent)


def adapters_dir(run_dir: Path) -> Path:
    """Where the run's finished adapter goes (made when needed)."""
    folder = run_workspace(run_dir).adapters_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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


def dataset_folder(config: TrainConfig, workspace: Workspace) -> Path:
    """The folder a config trains on: its workspace dataset, its path, or the demo."""
    if config.dataset.path:
        return Path(config.dataset.path)
    if config.dataset.name:
        return workspace.dataset_dir(config.dataset.name)
    return DEMO_DATASET


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
