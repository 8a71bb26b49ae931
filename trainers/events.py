"""events.jsonl: the one-way progress channel from a training run to the CLI and the UI."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

EVENTS_FILE = "events.jsonl"


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
