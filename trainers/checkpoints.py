"""Resumable checkpoints: one file per step, written atomically, old ones pruned.

The file holds tensors, numbers and lists only and is read with `weights_only=True`, so
a checkpoint cannot run code when loaded.
"""
from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import torch

from studio.errors import StudioError
from studio.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{6,})\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, state: dict, *, keep_last: int) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = checkpoint_dir(run_dir) / f"step-{step:06d}.pt"
    atomic_write_bytes(path, buffer.getvalue())
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    log.info("checkpoint %s", path)
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file: say which and what to do
        raise StudioError(f"Checkpoint {path} cannot be read ({error}); delete it to resume from the one before.") from None
