"""Gradio web UI: presentation only, over the functions in studio/.

Importing this package first makes `import gradio` skip gradio's type-stub upkeep: for
every component class it defines, gradio (6.x, `component_meta.ComponentMeta`) re-reads and
`ast`-parses the class's source file, renders a Jinja template and compares the result with
the `.pyi` file beside it, a step meant for gradio's own developers that changes nothing at
run time (the wheel ships the stubs). Measured on this machine: `import gradio` 2.4 s with
it, 1.6 s without (`python -X importtime`); it is most of why the studio's page took 4 s.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_COMPONENT_META = "gradio.component_meta"


def _keep_stubs(*_args, **_kwargs) -> None:
    """Stands in for gradio's `create_or_modify_pyi`: the stubs are left as installed."""


class _SkipStubUpkeep(importlib.abc.MetaPathFinder):
    """Finds gradio.component_meta as usual; once it has run, swaps in `_keep_stubs`."""

    def find_spec(self, name, path, target=None):
        if name != _COMPONENT_META:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            if hasattr(module, "create_or_modify_pyi"):
                module.create_or_modify_pyi = _keep_stubs

        spec.loader.exec_module = exec_module
        return spec


if _COMPONENT_META not in sys.modules:
    sys.meta_path.insert(0, _SkipStubUpkeep())
