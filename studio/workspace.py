"""The workspace: one folder holding datasets, runs, adapters, models and the job DB."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError

DEFAULT_WORKSPACE = "workspace"
WORKSPACE_ENV = "LORA_STUDIO_WORKSPACE"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")


def check_name(name: str, what: str = "name") -> str:
    """A name that becomes one folder or file stem inside the workspace: no separators,
    no `..`, no leading dot, at most 100 characters."""
    cleaned = name.strip()
    if not _NAME_RE.match(cleaned) or ".." in cleaned:
        raise StudioError(
            f"Invalid {what} {name!r}: use 1-100 letters, digits, '.', '_', '-' or spaces, "
            "starting with a letter or digit."
        )
    return cleaned


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, *, create: bool = True) -> "Workspace":
        """Open a workspace: `path`, else $LORA_STUDIO_WORKSPACE, else ./workspace; its
        folders are created unless `create` is False (to check input before writing)."""
        chosen = Path(path or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE).expanduser().resolve()
        if chosen.exists() and not chosen.is_dir():
            raise StudioError(f"Workspace {chosen} is a file; pass a folder with --workspace.")
        ws = cls(chosen)
        for folder in (ws.datasets_dir, ws.runs_dir, ws.adapters_dir, ws.models_dir) if create else ():
            folder.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def captioners_dir(self) -> Path:
        """Captioning models pulled by name (studio.models.hub); made by the first such pull."""
        return self.root / "captioners"

    @property
    def cache_dir(self) -> Path:
        """Latents and text conditioning the trainer keeps for the next run on the same
        pictures and model (trainers/cache.py); made by the first run that caches."""
        return self.root / "cache"

    @property
    def db_path(self) -> Path:
        return self.root / "studio.db"

    def dataset_dir(self, name: str) -> Path:
        return self.datasets_dir / check_name(name, "dataset name")

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / check_name(run_id, "run id")

    def contains(self, path: str | os.PathLike) -> bool:
        """True when `path` resolves (symlinks followed) inside this workspace."""
        return Path(path).resolve().is_relative_to(self.root)
