"""LoRA Studio: datasets, LoRA training, adapter files and generation for SD1.5 / SDXL."""
from __future__ import annotations

from studio import openmp  # noqa: F401  first: OpenMP's wait policy, before anything loads torch
from studio.errors import StudioError
from studio.shipped import ASSETS_DIR, PRESETS_DIR, PROJECT_ROOT
from studio.version import __version__

__all__ = ["StudioError", "ASSETS_DIR", "PRESETS_DIR", "PROJECT_ROOT", "__version__"]
