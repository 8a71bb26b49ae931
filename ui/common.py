"""What every tab shares: the workspace context, the error wrapper, small UI utilities."""
from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import gradio as gr

from studio.errors import StudioError
from studio.generation.engine import Engine
from studio.models import quiet_libraries
from studio.workspace import Workspace

log = logging.getLogger("ui")

#: The title of a message saying why something was not done (the page is left as it was).
PROBLEM_TITLE = "Cannot do that"

_heavy_lock = threading.Lock()
_heavy_done = False


def heavy_imports() -> None:
    """Import torch, diffusers and the studio modules built on them, once, under a lock.

    The start-up warm-up thread and the first handler that needs them would otherwise import
    them at the same time, and transformers' / diffusers' lazy modules are not safe to import
    from two threads at once (one of them gets an ImportError)."""
    global _heavy_done
    if _heavy_done:
        return
    with _heavy_lock:
        if _heavy_done:
            return
        started = time.time()
        import studio.adapters.library  # noqa: F401  (torch, safetensors)

        quiet_libraries()
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

        _heavy_done = True
        log.info("torch and diffusers imported in %.1f s", time.time() - started)


class Studio:
    """Per-app context: the workspace, the one generation Engine (pipelines cached), and
    a cache of adapter descriptions keyed by file identity."""

    def __init__(self, workspace: Workspace, *, allow_pickle: bool = False):
        self.workspace = workspace
        self.allow_pickle = allow_pickle
        self._engine = None
        self._engine_lock = threading.Lock()
        self._describe_cache: dict[tuple, dict] = {}

    @property
    def outputs_dir(self) -> Path:
        return self.workspace.root / "outputs"

    def engine(self):
        """The shared Engine; torch and diffusers are imported on first use, not at start-up."""
        heavy_imports()
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(allow_pickle=self.allow_pickle, workspace=self.workspace)
            return self._engine

    def describe(self, path: Path) -> dict:
        heavy_imports()
        from studio.adapters.library import describe_adapter

        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._describe_cache:
            self._describe_cache[key] = describe_adapter(path)
        return self._describe_cache[key]

    def adapter_names(self) -> list[str]:
        heavy_imports()
        from studio.adapters.library import list_adapters

        return [p.stem for p in list_adapters(self.workspace)]


def friendly(fn: Callable) -> Callable:
    """Wrap an event handler so that a StudioError shows as a clear message (toast) and the
    page's components are left as they were; anything else is logged with its traceback on
    the server and shown as one line. No traceback reaches the page; the server keeps serving.

    (Raising gr.Error instead would also mark every output component with an "Error" badge.)"""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudioError as error:
            gr.Warning(str(error), title=PROBLEM_TITLE, duration=12)
        except gr.Error as error:
            gr.Warning(error.message, title=error.title, duration=12)
        except Exception as error:  # never a traceback in the page
            log.exception("unexpected error in %s", fn.__name__)
            gr.Warning(f"{type(error).__name__}: {error}. The details are in the server's log.",
                       title="Unexpected error", duration=None)
        return gr.skip()  # leave every output as it was

    return wrapper


def unchecked(component):
    """`component` (a Number or Slider) with its value passed to the handler as it was sent.
    Gradio's own range and type check would refuse it first, one field at a time, in words
    that do not name the field, and log a traceback; the handlers check every field and
    name them all at once. `minimum` / `maximum` still guide the browser. (An instance
    attribute, not a subclass: Gradio writes a .pyi stub beside any module that subclasses
    a component.)"""
    component.preprocess = lambda payload: payload
    return component


def dropdown_value(choices: list[str], wanted: str | None) -> str | None:
    """`wanted` when it is a choice, else the first choice (or None)."""
    if wanted in choices:
        return wanted
    return choices[0] if choices else None
