"""Gradio's start-up without its documentation upkeep: imported by `ui/__init__.py`, so that
importing the UI package first makes `import gradio` skip two pieces of documentation upkeep
that gradio (6.x) does for every component class it defines, on every import, and that
change nothing the studio runs:

- `component_meta.create_or_modify_pyi`: re-reads and `ast`-parses the class's source file,
  renders a Jinja template and compares the result with the `.pyi` stub beside it (the
  wheel ships the stubs; this is for gradio's own developers);
- `events.EventListener.set_doc`: compiles each event listener's docstring as a Jinja
  template (~200 of them) to put the component's name in it; the only placeholder these
  docstrings use is `{{ component }}`, which a string replacement fills the same way.

Measured on this machine (`python -X importtime`, `time python -c "import gradio"`): the
first is ~0.8 s, the second ~0.2 s; `import gradio` takes 2.0-2.1 s with both, 1.0-1.1 s
without (bench/RESULTS.md, "UI start"): most of why the studio's page took 4 s to answer.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


def _keep_stubs(*_args, **_kwargs) -> None:
    """Stands in for gradio's `create_or_modify_pyi`: the stubs are left as installed."""


def _name_component(listener, component: str) -> None:
    """Stands in for gradio's `EventListener.set_doc`, without compiling a template."""
    if listener.listener.__doc__:
        listener.listener.__doc__ = listener.listener.__doc__.replace("{{ component }}", component)


def _skip_stub_upkeep(module) -> None:
    if hasattr(module, "create_or_modify_pyi"):
        module.create_or_modify_pyi = _keep_stubs


def _plain_event_docs(module) -> None:
    if hasattr(getattr(module, "EventListener", None), "set_doc"):
        module.EventListener.set_doc = _name_component


_AFTER_IMPORT = {"gradio.component_meta": _skip_stub_upkeep, "gradio.events": _plain_event_docs}


class _ThenChange(importlib.abc.Loader):
    """The module's own loader, then its change; everything else is the loader's."""

    def __init__(self, loader, change):
        self.loader, self.change = loader, change

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.change(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of `_AFTER_IMPORT` as usual; once one has run, applies its change."""

    def find_spec(self, name, path, target=None):
        change = _AFTER_IMPORT.get(name)
        if change is None or name in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenChange(spec.loader, change)
        return spec


if not any(name in sys.modules for name in _AFTER_IMPORT):
    sys.meta_path.insert(0, _PatchAfterImport())
