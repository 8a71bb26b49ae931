"""Library tab: every adapter in workspace/adapters, with details; import, export, delete."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio.errors import StudioError
from ui import helpers as h
from ui.common import Studio, dropdown_value, friendly, heavy_imports


def build(studio: Studio) -> SimpleNamespace:
    ws = studio.workspace
    with gr.Tab("5 · Library", id="library") as tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                table = gr.Dataframe(headers=h.LIBRARY_HEADERS, interactive=False, wrap=True, max_height=420,
                                     label="Adapters in workspace/adapters — click a row for details",
                                     elem_id="lib-table")
                with gr.Accordion("Import a LoRA file (.safetensors)", open=True):
                    with gr.Row(equal_height=False):
                        upload = gr.File(label="LoRA .safetensors", file_types=[".safetensors"], height=110,
                                         scale=3, elem_id="lib-upload")
                        with gr.Column(scale=2):
                            new_name = gr.Textbox(label="Name in the library", placeholder="(the file's name)",
                                                  info="Used in <lora:name:w> tags", elem_id="lib-new-name")
                            import_btn = gr.Button("Import", variant="primary", elem_id="lib-import")
                    gr.Markdown("The file is checked first: it must be a kohya / A1111 LoRA. Pickle files "
                                "(.ckpt, .pt) are never loaded.", elem_classes="small-note")
            with gr.Column(scale=2, min_width=320):
                pick = gr.Dropdown([], value=None, label="Adapter", elem_id="lib-pick")
                thumb = gr.Image(label="Preview", height=200, interactive=False, buttons=[], elem_id="lib-thumb")
                details = gr.Markdown("*No adapter picked.*", elem_id="lib-details")
                with gr.Row():
                    use_btn = gr.Button("Use in Generate →", variant="primary", interactive=False,
                                        elem_id="lib-use")
                    download = gr.DownloadButton("Export (download) .safetensors", value=None, interactive=False,
                                                 elem_id="lib-export")
                    delete_btn = gr.Button("Delete…", variant="stop", interactive=False, elem_id="lib-delete")
                with gr.Group(visible=False, elem_id="lib-confirm") as confirm:
                    confirm_text = gr.Markdown()
                    with gr.Row():
                        yes_btn = gr.Button("Yes, delete it", variant="stop", elem_id="lib-confirm-yes")
                        no_btn = gr.Button("Keep it", elem_id="lib-confirm-no")
                with gr.Accordion("All metadata", open=False):
                    meta = gr.JSON(elem_id="lib-meta")

    def thumbnail(path: Path, info: dict):
        image = h.thumbnail_from_metadata(info.get("metadata") or {})
        if image is not None:
            return image
        run_id = (info.get("metadata") or {}).get("lora_studio_run_id")
        if run_id:
            try:
                run_dir = ws.run_dir(run_id)
            except StudioError:
                return None
            if run_dir.is_dir():
                sample = h.last_sample(run_dir)
                return str(sample) if sample else None
        return None

    def listing(wanted: str | None):
        heavy_imports()
        from studio.library import list_adapters

        paths = list_adapters(ws)
        rows = []
        for path in paths:
            try:
                rows.append(h.library_row(path, studio.describe(path)))
            except StudioError as error:
                rows.append(h.library_row(path, None, str(error)))
        names = [p.stem for p in paths]
        return rows, names, dropdown_value(names, wanted)

    def detail(name: str | None):
        """thumb, details, use, download, delete, confirm (hidden), meta."""
        if not name:
            return [None, "*No adapters yet: train one, or import a .safetensors file.*",
                    gr.update(interactive=False), gr.update(value=None, interactive=False),
                    gr.update(interactive=False), gr.update(visible=False), None]
        path = ws.adapters_dir / f"{name}.safetensors"
        if not path.is_file():
            raise StudioError(f"Adapter {name!r} is gone from the library; it was deleted or renamed.")
        try:
            info = studio.describe(path)
        except StudioError as error:
            return [None, f"### {name}\n\n**This file cannot be used:** {error}",
                    gr.update(interactive=False), gr.update(value=str(path), interactive=True),
                    gr.update(interactive=True), gr.update(visible=False), None]
        return [thumbnail(path, info), h.adapter_markdown(path, info), gr.update(interactive=True),
                gr.update(value=str(path), interactive=True), gr.update(interactive=True),
                gr.update(visible=False), h.metadata_for_display(info.get("metadata") or {})]

    detail_outputs = [thumb, details, use_btn, download, delete_btn, confirm, meta]

    def refresh(wanted: str | None):
        rows, names, value = listing(wanted)
        return [rows, gr.update(choices=names, value=value), *detail(value)]

    refresh_outputs = [table, pick, *detail_outputs]

    @friendly
    def on_refresh(current):
        return refresh(current)

    @friendly
    def on_pick(name):
        return detail(name)

    @friendly
    def on_row(evt: gr.SelectData):
        row = getattr(evt, "row_value", None)
        name = row[0] if row else None
        return [gr.update(value=name), *detail(name)]

    @friendly
    def on_import(file, name):
        heavy_imports()
        from studio.library import import_adapter

        if not file:
            raise StudioError("Choose a .safetensors file to import first.")
        source = Path(file)
        target = import_adapter(ws, source, name or None)
        gr.Info(f"Imported {source.name} as {target.stem!r}.")
        return [*refresh(target.stem), None, ""]

    @friendly
    def on_delete_ask(name):
        if not name:
            raise StudioError("Pick an adapter first.")
        return gr.update(visible=True), (f"**Delete `{name}.safetensors` for good?** Runs that made it stay; "
                                         "images already made keep their settings text.")

    @friendly
    def on_delete(name):
        heavy_imports()
        from studio.library import delete_adapter

        delete_adapter(ws, name)
        gr.Info(f"Deleted {name}.")
        return refresh(None)

    pick.input(on_pick, pick, detail_outputs, show_progress="hidden")
    table.select(on_row, None, [pick, *detail_outputs], show_progress="hidden")
    import_btn.click(on_import, [upload, new_name], [*refresh_outputs, upload, new_name], api_name="import_adapter")
    delete_btn.click(on_delete_ask, pick, [confirm, confirm_text])
    no_btn.click(lambda: gr.update(visible=False), None, confirm)
    yes_btn.click(on_delete, pick, refresh_outputs)

    return SimpleNamespace(tab=tab, pick=pick, use_btn=use_btn, refresh=refresh,
                           refresh_outputs=refresh_outputs)
