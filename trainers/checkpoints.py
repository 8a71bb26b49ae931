"""Resumable checkpoints: one file per step, written atomically, old ones pruned.

The file holds tensors, numbers and lists only and is read with `weights_only=True`, so
a checkpoint cannot run code when loaded.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import torch

from studio.errors import StudioError
from studio.fsutil import atomic_write_bytes
from studio.jobs.run_folder import checkpoint_path, latest_checkpoint, list_checkpoints

__all__ = ["latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)

def save_checkpoint(run_dir: Path, step: int, state: dict, *, keep_last: int) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = checkpoint_path(run_dir, step)
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
