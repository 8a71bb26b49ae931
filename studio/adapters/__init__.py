"""Adapters: files and their formats (formats/), the methods that train them (methods/), the
library, mixing and merging. `from studio.adapters import load_adapter` and the rest of
studio.adapters.api' API work from here; they load (and with them torch) on first use, so
that the config, the job queue and the UI start without torch.

This `__getattr__` is the studio's one lazy seam (tests/test_architecture.py): the config
lists the methods without torch, and everything else imports its modules where it uses
them. Inside this package, modules import from the module that defines a name (formats/,
methods/, api.py), not from here."""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    files = importlib.import_module("studio.adapters.api")
    try:
        return getattr(files, name)
    except AttributeError:
        raise AttributeError(f"module 'studio.adapters' has no attribute {name!r}") from None
