"""Where the data shipped with the studio lies: inside the package when installed with
`pip install .` (pyproject.toml maps assets/ and presets/ there), beside it in a checkout."""
from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent


def _shipped(name: str) -> Path:
    """A data folder of the project: inside the package when installed, beside it in a checkout."""
    installed = PACKAGE_ROOT / name
    return installed if installed.is_dir() else PROJECT_ROOT / name


ASSETS_DIR = _shipped("assets")
PRESETS_DIR = _shipped("presets")
