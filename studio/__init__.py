"""LoRA Studio: datasets, LoRA training, adapter files and generation for SD1.5 / SDXL."""
from __future__ import annotations

from pathlib import Path

from studio.errors import StudioError

__version__ = "0.1.0"

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent
ASSETS_DIR = PROJECT_ROOT / "assets"
PRESETS_DIR = PROJECT_ROOT / "presets"

__all__ = ["StudioError", "ASSETS_DIR", "PRESETS_DIR", "PROJECT_ROOT", "__version__"]
