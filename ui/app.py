"""The LoRA Studio web app (Gradio). Presentation only: every tab calls studio/ functions.

`launch()` serves the page; only once the first page has loaded does it start the job
supervisor and (in the background) import torch and diffusers, so the page answers quickly.
"""
from __future__ import annotations

import logging
import os
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls at run time

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from studio.config import DEMO_DATASET  # noqa: E402
from studio.datasets import import_dataset, list_datasets  # noqa: E402
from studio.errors import StudioError  # noqa: E402
from studio.exposure import MAX_UPLOAD_ENV, max_upload_bytes  # noqa: E402
from studio.jobs import ensure_supervisor  # noqa: E402
from studio.limits import check_settings as check_caps  # noqa: E402
from studio.workspace import Workspace  # noqa: E402
from ui import datasets_tab, generate_tab, library_tab, runs_tab, train_tab  # noqa: E402
from ui.common import Studio, friendly, heavy_imports  # noqa: E402

log = logging.getLogger("ui")

DEMO_NAME = "demo"
# The handlers scripts may call through Gradio's HTTP API, by these names (README). Every other
# handler is the page's own plumbing and is kept out of the API description, which the page
# also carries: with them, 1.0 MB of it (17 hint handlers x ~100 inputs), 0.1 s per page load.
PUBLIC_API = frozenset({"generate", "grid", "suggest", "import_dataset", "caption_dataset", "import_adapter",
                        "bake", "fuse", "resize", "check_settings"})
WARMUP_DELAY_S = 3.0   # after the first page load
WARMUP_IDLE_S = 30.0   # or this long after start when no page is opened

CSS = """
.gradio-container {max-width: 1500px !important; margin: auto}
#studio-header {display: flex; align-items: baseline; gap: 14px; flex-wrap: wrap; margin: 4px 0 2px}
#studio-header h1 {font-size: 1.6rem; margin: 0}
#studio-header .where {color: var(--body-text-color-subdued); font-size: .9rem}
#studio-header code {font-size: .85rem}
.tab-intro, .tab-intro * {color: var(--body-text-color-subdued) !important}
.hint-box {border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg);
           padding: 10px 14px !important; background: var(--background-fill-secondary)}
.small-note, .small-note * {color: var(--body-text-color-subdued) !important; font-size: .85rem !important}
.group-title {padding: 6px 10px 0 !important}
.mono textarea {font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace !important;
                font-size: 12px !important; line-height: 1.35 !important}
.run-status {border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg); padding: 10px 14px;
             background: var(--background-fill-secondary)}
.run-status.empty {color: var(--body-text-color-subdued)}
.run-title {display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin-bottom: 4px}
.run-name {font-weight: 600; font-size: 1.05rem}
.run-status .badge {border-radius: 999px; padding: 1px 10px; font-size: .85rem; background: var(--neutral-200);
                    color: var(--neutral-800)}
.state-running .badge, .state-cancelling .badge {background: #dbeafe; color: #1e40af}
.state-done .badge {background: #dcfce7; color: #166534}
.state-failed .badge {background: #fee2e2; color: #991b1b}
.state-cancelled .badge, .state-queued .badge {background: #fef3c7; color: #92400e}
.run-facts {font-size: .95rem; margin-bottom: 6px}
.run-status .bar {height: 8px; border-radius: 4px; background: var(--neutral-200); overflow: hidden}
.run-status .bar > div {height: 100%; background: var(--color-accent); transition: width .6s}
.run-message {margin-top: 6px; font-size: .9rem}
#lib-thumb img, #ds-chosen img {width: 100%; height: 100%; object-fit: contain}
.state-failed .run-message {color: #b91c1c}
img.pixel-exact {image-rendering: pixelated}
#gen-results, #gen-results .grid-wrap, #gen-grid-cells, #gen-grid-cells .grid-wrap {height: auto !important;
    max-height: none !important; overflow: visible !important}
#train-class-note {padding-bottom: 8px !important}
#ds-stats table {font-size: .85rem}
#ds-stats td, #ds-stats th {padding: 4px 6px}
#ds-stats td, #ds-stats th, #runs-table td, #runs-table th, #lib-table td, #lib-table th, #gen-suggestions-table td,
#gen-suggestions-table th {word-break: normal !important; overflow-wrap: normal !important}
.captions-below .thumbnail-item {aspect-ratio: auto; display: flex; flex-direction: column}
.captions-below .thumbnail-item > img {aspect-ratio: 1; height: auto; min-height: 0}
.captions-below .caption-label {position: static; max-width: none; white-space: normal; overflow-wrap: anywhere;
    border: 0; border-top: 1px solid var(--border-color-primary); border-radius: 0; line-height: 1.3}
#gen-info pre, #gen-info code {white-space: pre-wrap !important; overflow-wrap: anywhere}
.secondary-wrap > input[role="combobox"] {padding-right: 44px !important; text-overflow: ellipsis}
"""

#: The widest picture drawn pixel for pixel.
PIXEL_EXACT_MAX_PX = 256
#: Small pictures (the built-in model draws 64 px) are enlarged pixel for pixel, not smoothed
#: into a blur; large ones keep the browser's smooth scaling when shrunk to fit.
PIXEL_EXACT_JS = """() => {
  const mark = (img) => { if (img.naturalWidth && img.naturalWidth <= %d) img.classList.add('pixel-exact'); };
  document.addEventListener('load', (event) => { if (event.target.tagName === 'IMG') mark(event.target); }, true);
  document.querySelectorAll('img').forEach(mark);
}""" % PIXEL_EXACT_MAX_PX


def _theme():
    # System fonts: the default theme would fetch Google Fonts, and the studio runs offline.
    return gr.themes.Soft(primary_hue="orange", secondary_hue="slate", neutral_hue="slate",
                          font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def prepare_workspace(workspace: Workspace) -> None:
    """First start: put the demo dataset in the workspace (as 'demo') so Train works at once."""
    if list_datasets(workspace) or not DEMO_DATASET.is_dir():
        return
    try:
        import_dataset(DEMO_DATASET, DEMO_NAME, workspace)
    except StudioError as error:  # a missing or damaged demo must not stop the studio
        log.warning("could not copy the demo dataset: %s", error)


def build_app(workspace: Workspace | str | os.PathLike | None = None, *, allow_pickle: bool = False) -> gr.Blocks:
    """The whole page. Imports nothing heavy: torch/diffusers load on first use."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
    prepare_workspace(ws)
    studio = Studio(ws, allow_pickle=allow_pickle)

    with gr.Blocks(title="LoRA Studio", delete_cache=(3600, 24 * 3600)) as app:
        gr.HTML(f"<div id='studio-header'><h1>LoRA Studio</h1><span class='where'>Make LoRA adapters for "
                f"Stable Diffusion · workspace <code>{_escape(str(ws.root))}</code></span></div>")
        with gr.Tabs(selected="datasets") as tabs:
            data = datasets_tab.build(studio)
            train = train_tab.build(studio)
            runs = runs_tab.build(studio)
            gen = generate_tab.build(studio, lambda: train_tab.model_options(studio), train_tab.model_info(studio))
            lib = library_tab.build(studio, lambda: train_tab.model_options(studio))

        timer_off = lambda: gr.Timer(active=False)  # noqa: E731
        # Tab switches refresh what the tab shows; the Runs tab's live timer runs only while it is open.
        data.tab.select(timer_off, None, runs.timer, show_progress="hidden")
        train.tab.select(friendly(lambda d, m: (*train.refresh_choices(d, m), gr.Timer(active=False))),
                         [train.dataset, train.base_model], [train.dataset, train.base_model, runs.timer],
                         show_progress="hidden")
        runs.tab.select(runs.show, [runs.pick, runs.view], runs.outputs, show_progress="hidden").then(
            lambda: gr.Timer(active=True), None, runs.timer, show_progress="hidden")
        gen.tab.select(friendly(lambda *names: [*gen.refresh_adapters(*names), gr.Timer(active=False)]),
                       gen.names, [*gen.names, gen.model, runs.timer], show_progress="hidden")
        lib.tab.select(friendly(lambda name: [*lib.refresh(name), gr.Timer(active=False)]),
                       lib.pick, [*lib.refresh_outputs, runs.timer], show_progress="hidden")

        @friendly
        def launch_run(*values):
            queued = train.launch(*values)
            if queued is None:  # it cannot train: its problems are shown, the page stays as it was
                return gr.skip()
            toml_text, note, job_id = queued
            return (toml_text, note, gr.update(choices=[job_id], value=job_id), gr.Tabs(selected="runs"),
                    gr.Timer(active=True))

        train.launch_btn.click(
            launch_run, train.hint_inputs, [*train.outputs, runs.pick, tabs, runs.timer]
        ).success(runs.show, [runs.pick, runs.view], runs.outputs, show_progress="hidden")

        @friendly
        def open_in_generate(adapter_name, *current):
            return [*gen.open_adapter(adapter_name, *current), gr.Tabs(selected="generate"),
                    gr.Timer(active=False)]

        opened = [*gen.names, gen.model, gen.prompt, tabs, runs.timer]
        runs.open_btn.click(friendly(lambda r, *cur: open_in_generate(runs.adapter_of(r), *cur)),
                            [runs.pick, *gen.names], opened)
        lib.use_btn.click(friendly(lambda name, *cur: open_in_generate(_require(name), *cur)),
                          [lib.pick, *gen.names], opened)

        app.load(data.refresh, data.pick, [data.pick, *data.view_outputs], show_progress="hidden")
        # a page reloaded while a run is queued or training shows that run's settings
        app.load(train.restore, None, train.restore_outputs, show_progress="hidden")
        # The first hint quotes a speed already known; measuring one (a training subprocess)
        # waits until the page has loaded, as the heavy imports do, not to compete with it,
        # and is for the settings the page has then (a person may have changed them).
        app.load(train.on_first_load, None, [train.hint, train.class_note], show_progress="hidden").then(
            _first_page.set, None, None, show_progress="hidden", queue=False).then(
            train.on_page_loaded, None, None, show_progress="hidden").then(
            train.on_change, train.hint_inputs, train.hint_outputs, show_progress="hidden")
        for handler in app.fns.values():  # before the Blocks closes: its config is written then
            if handler.api_name not in PUBLIC_API:
                handler.api_visibility = "private"
    return app


def _require(name: str | None) -> str:
    if not name:
        raise StudioError("Pick an adapter first.")
    return name


def _escape(text: str) -> str:
    import html

    return html.escape(text)


class UploadOverLimit:
    """ASGI middleware: Gradio refuses an upload over the limit (413) while the sender is still
    sending it, and the connection closes under the sender, who sees a broken connection
    instead of the reason. This reads the rest of a refused request (discarding it), then
    answers 413 with the limit and how to change it."""

    def __init__(self, app, limit_bytes: int):
        self.app = app
        self.text = (f"The file is over the upload limit of {limit_bytes / 1024**2:g} MiB. Import it from a "
                     f"folder on this computer instead (the Datasets tab's folder box), or restart the studio "
                     f"with {MAX_UPLOAD_ENV} set higher.").encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body_done = False
        refused = False

        def note(message) -> None:
            nonlocal body_done
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done = True

        async def tracked_receive():
            message = await receive()
            note(message)
            return message

        async def worded_send(message):
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] == 413:
                refused = True
                while not body_done:
                    note(await receive())
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(self.text)).encode())]})
                await send({"type": "http.response.body", "body": self.text})
            elif not refused:  # Gradio's own 413 body is replaced by ours
                await send(message)

        await self.app(scope, tracked_receive, worded_send)


_first_page = threading.Event()


def _warm_up(workspace: Workspace) -> None:
    """Once the first page has loaded (or after a while when nobody opens it), start the job
    supervisor and import the heavy libraries in the background, so neither competes with
    the page for the CPU. Queuing a run starts the supervisor at once (`studio.jobs.enqueue`);
    this start is for runs queued before the studio started."""
    _first_page.wait(timeout=WARMUP_IDLE_S)
    time.sleep(WARMUP_DELAY_S)
    ensure_supervisor(workspace)
    try:
        heavy_imports()
    except Exception:  # only a speed-up; the first real use reports any problem
        log.debug("warm-up import failed", exc_info=True)


def launch(workspace: Workspace | str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 7860,
           *, auth: tuple[str, str] | None = None, share: bool = False, allow_pickle: bool = False,
           block: bool = True) -> gr.Blocks:
    """Serve the studio at http://host:port/ (files only from the workspace); start the job
    supervisor once the first page has loaded; block until interrupted unless `block` is
    False. `auth` (checked by studio.exposure before a public bind) makes every page and API
    call ask for a login."""
    upload_limit = max_upload_bytes()  # a bad $LORA_STUDIO_MAX_UPLOAD_MB stops here, before anything starts
    check_caps()  # and so does a bad cap setting (studio.limits)
    ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
    # Workspace files (dataset images, samples, outputs, adapters) are served where they are,
    # not copied into Gradio's cache; nothing outside the workspace is served.
    gr.set_static_paths([ws.root])
    app = build_app(ws, allow_pickle=allow_pickle)  # its queue runs one event of each handler at a time (Gradio's default)
    try:
        app.launch(server_name=host, server_port=port, allowed_paths=[str(ws.root)], prevent_thread_lock=True,
                   show_error=False, theme=_theme(), css=CSS, js=PIXEL_EXACT_JS, footer_links=["gradio", "settings"],
                   auth=auth, share=share, max_file_size=upload_limit,
                   app_kwargs={"middleware": [Middleware(UploadOverLimit, limit_bytes=upload_limit)]})
    except OSError as error:
        raise StudioError(f"Cannot serve on {host}:{port} ({error}); is another studio running there? "
                          "Pass another --port.") from None
    threading.Thread(target=_warm_up, args=(ws,), name="warm-up", daemon=True).start()
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return app
