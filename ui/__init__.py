"""Gradio web UI: presentation only, over the functions in studio/. One module per tab
(<tab>_tab.py builds components and wires events; <tab>_view.py what the page shows);
app.py builds the page.

Importing this package first installs gradio_startup's import hook, which makes `import
gradio` skip its per-import documentation upkeep (1.2 s of the studio's start; see there)."""
from __future__ import annotations

from ui import gradio_startup  # noqa: F401  before anything imports gradio
