"""Adapters: files and their formats (formats/), the methods that train them (methods/), the
library, mixing and merging. `from studio.adapters import load_adapter` and the rest of
studio.adapters.api' API work from here; they load (and with them torch) on first use, so
that the config, the job queue and the UI start without torch."""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    files = importlib.import_module("studio.adapters.api")
    try:
        return getattr(files, name)
    except AttributeError:
        raise AttributeError(f"module 'studio.adapters' has no attribute {name!r}") from None
