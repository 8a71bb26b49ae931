"""The studio's version (pyproject.toml's `version`)."""
from __future__ import annotations

__version__ = "0.1.0"
