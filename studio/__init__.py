"""LoRA Studio: datasets, LoRA training, adapter files and generation for SD1.5 / SDXL."""
from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads that spin while waiting make torch up to 80x slower whenever another
# process competes for the cores (a training job beside the UI: 40 s instead of 0.5 s per
# tiny image, measured on 2 cores). Passive waiting costs nothing measurable when idle.
# Must be set before torch loads; the CLI, the worker and the UI all import studio first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from studio.errors import StudioError

__version__ = "0.1.0"

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent


def _shipped(name: str) -> Path:
    """A data folder of the project: inside the package when installed with `pip install .`
    (pyproject.toml maps assets/ and presets/ there), beside it in a checkout."""
    installed = PACKAGE_ROOT / name
    return installed if installed.is_dir() else PROJECT_ROOT / name


ASSETS_DIR = _shipped("assets")
PRESETS_DIR = _shipped("presets")

__all__ = ["StudioError", "ASSETS_DIR", "PRESETS_DIR", "PROJECT_ROOT", "__version__"]
