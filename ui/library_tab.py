"""Library tab: every adapter in workspace/adapters, with details; import, export, delete;
bake a mix into one LoRA, fuse it into a checkpoint, resize (squeeze) an adapter's rank."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio.errors import StudioError
from studio.jobs.runs import preview_sample
from ui import library_view as lv
from ui.common import Studio, dropdown_value, friendly, heavy_imports

MIX_ROWS = 4


def build(studio: Studio, model_choices) -> SimpleNamespace:
    ws = studio.workspace
    with gr.Tab("5 · Library", id="library") as tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                table = gr.Dataframe(headers=lv.LIBRARY_HEADERS, interactive=False, wrap=True, max_height=420,
                                     label="Adapters in workspace/adapters — click a row for details",
                                     elem_id="lib-table")
                with gr.Accordion("Import a LoRA file (.safetensors)", open=True):
                    with gr.Row(equal_height=False):
                        # no file_types filter: the import says what is wrong with any other file
                        upload = gr.File(label="LoRA .safetensors", height=110, scale=3, elem_id="lib-upload")
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
                    use_btn = gr.Button("Use in Generate\u00a0→", variant="primary", interactive=False,
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
        with gr.Accordion("Mix into one file — bake a LoRA or fuse a checkpoint", open=False, elem_id="lib-mix"):
            gr.Markdown("A mix is several adapters with weights, as in Generate. **Bake** writes it as one LoRA "
                        "file in the library (loads anywhere a LoRA does); **Fuse** merges it into the base model "
                        "as a full single-file checkpoint in `models/`.", elem_classes="small-note")
            mix_rows = []
            with gr.Row(equal_height=True):
                for i in range(MIX_ROWS):
                    with gr.Column(min_width=220):
                        mix_name = gr.Dropdown([], value=None, label=f"Adapter {i + 1}", allow_custom_value=True,
                                               info="From the library; leave empty to skip",
                                               elem_id=f"lib-mix-adapter-{i + 1}")
                        mix_weight = gr.Number(1.0, label="Weight", info="Negative weights subtract",
                                               elem_id=f"lib-mix-weight-{i + 1}")
                    mix_rows.append((mix_name, mix_weight))
            with gr.Row(equal_height=False):
                with gr.Column():
                    gr.Markdown("**Bake → LoRA**", elem_classes="group-title")
                    bake_name = gr.Textbox(label="New adapter name", placeholder="e.g. star-mix",
                                           info="Saved as adapters/<name>.safetensors", elem_id="lib-bake-name")
                    with gr.Row():
                        bake_rank = gr.Textbox("", label="Rank", placeholder="exact",
                                               info="Empty = exact (the ranks add up); N = best rank-N fit by SVD",
                                               elem_id="lib-bake-rank")
                        bake_precision = gr.Dropdown(lv.PRECISION_CHOICES, value="fp16", label="Precision",
                                                     info="Tensor type in the file; fp16 is what A1111 / "
                                                          "CivitAI expect", elem_id="lib-bake-precision")
                    bake_btn = gr.Button("Bake", variant="primary", elem_id="lib-bake")
                with gr.Column():
                    gr.Markdown("**Fuse → checkpoint**", elem_classes="group-title")
                    fuse_model = gr.Dropdown(model_choices(), value="builtin", allow_custom_value=True,
                                             label="Base model", info="'builtin' or a model path; the mix must "
                                                                      "be for its family", elem_id="lib-fuse-model")
                    fuse_name = gr.Textbox(label="Checkpoint name", placeholder="e.g. star-fused",
                                           info="Saved as models/<name>.safetensors (SD 1.5 / SDXL single-file "
                                                "layout)", elem_id="lib-fuse-name")
                    fuse_btn = gr.Button("Fuse", variant="primary", elem_id="lib-fuse")
            mix_info = gr.Markdown(elem_id="lib-mix-info")
        with gr.Accordion("Resize (squeeze) an adapter's rank", open=False, elem_id="lib-resize"):
            with gr.Row(equal_height=True):
                resize_source = gr.Dropdown([], value=None, label="Adapter", allow_custom_value=True,
                                            info="The library adapter to squeeze (it is kept as it is)",
                                            elem_id="lib-resize-source")
                resize_rule = gr.Dropdown(lv.RESIZE_RULES, value="rank", label="Rule",
                                          info="A fixed rank, or a rank per module from its singular values",
                                          elem_id="lib-resize-rule")
                resize_value = gr.Number(8, label="N or X",
                                         info="Rank N (a whole number ≥ 1); sv-ratio X ≥ 1; sv-fro and "
                                              "sv-cumulative X in (0, 1]", elem_id="lib-resize-value")
                resize_name = gr.Textbox(label="New adapter name", placeholder="(<adapter>-<rule><value>)",
                                         info="Saved in the library; empty = the name shown", elem_id="lib-resize-name")
                resize_precision = gr.Dropdown(lv.PRECISION_CHOICES, value="fp16", label="Precision",
                                               info="Tensor type in the file", elem_id="lib-resize-precision")
            resize_btn = gr.Button("Resize", variant="primary", elem_id="lib-resize-go")
            resize_info = gr.Markdown(elem_id="lib-resize-info")
            energy = gr.Dataframe(headers=lv.ENERGY_HEADERS, interactive=False, max_height=300,
                                  label="Energy kept per module (share of Σσ² kept; 1 = lossless)",
                                  elem_id="lib-resize-energy")

    def thumbnail(path: Path, info: dict):
        image = lv.thumbnail_from_metadata(info.get("metadata") or {})
        if image is not None:
            return image
        run_id = (info.get("metadata") or {}).get("lora_studio_run_id")
        if run_id:
            try:
                run_dir = ws.run_dir(run_id)
            except StudioError:
                return None
            if run_dir.is_dir():
                sample = preview_sample(run_dir)
                return str(sample) if sample else None
        return None

    def listing(wanted: str | None):
        heavy_imports()
        from studio.adapters.library import list_adapters

        paths = list_adapters(ws)
        rows = []
        for path in paths:
            try:
                rows.append(lv.library_row(path, studio.describe(path)))
            except StudioError as error:
                rows.append(lv.library_row(path, None, str(error)))
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
        return [thumbnail(path, info), lv.adapter_markdown(path, info), gr.update(interactive=True),
                gr.update(value=str(path), interactive=True), gr.update(interactive=True),
                gr.update(visible=False), lv.metadata_for_display(info.get("metadata") or {})]

    detail_outputs = [thumb, details, use_btn, download, delete_btn, confirm, meta]

    mix_names = [row[0] for row in mix_rows]

    def refresh(wanted: str | None):
        """The table, the picked adapter's details, and fresh choices wherever an adapter or a
        base model is picked (what is picked stays)."""
        rows, names, value = listing(wanted)
        return [rows, gr.update(choices=names, value=value), *detail(value),
                *(gr.update(choices=names) for _ in (*mix_names, resize_source)), gr.update(choices=model_choices())]

    refresh_outputs = [table, pick, *detail_outputs, *mix_names, resize_source, fuse_model]

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
        from studio.adapters.library import import_adapter

        if not file:
            raise StudioError("Choose a .safetensors file to import first.")
        source = Path(file)
        try:
            target = import_adapter(ws, source, name or None)
        except StudioError as error:  # name the file as uploaded, not the server's temporary copy
            raise StudioError(str(error).replace(str(source), source.name)) from None
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
        from studio.adapters.library import delete_adapter

        delete_adapter(ws, name)
        gr.Info(f"Deleted {name}.")
        return refresh(None)

    def mix_of(values) -> list[tuple]:
        return [tuple(values[i:i + 2]) for i in range(0, len(values), 2)]

    @friendly
    def on_bake(name, rank, precision, *mix_values):
        heavy_imports()
        baked, text = lv.bake_mix(studio, mix_of(mix_values), name, rank, precision)
        gr.Info(f"Baked {baked!r} into the library.")
        return [*refresh(baked), text]

    @friendly
    def on_fuse(model, name, *mix_values):
        heavy_imports()
        text = lv.fuse_mix(studio, model, mix_of(mix_values), name)
        gr.Info("Fused the mix into a checkpoint.")
        return text, gr.update(choices=model_choices())

    @friendly
    def on_resize(source, rule, value, name, precision):
        heavy_imports()
        resized, text, rows = lv.resize_adapter(studio, source, rule, value, name, precision)
        gr.Info(f"Saved {resized!r} in the library.")
        return [*refresh(resized), text, rows]

    flat_mix = [component for row in mix_rows for component in row]
    bake_btn.click(on_bake, [bake_name, bake_rank, bake_precision, *flat_mix], [*refresh_outputs, mix_info],
                   api_name="bake")
    fuse_btn.click(on_fuse, [fuse_model, fuse_name, *flat_mix], [mix_info, fuse_model], api_name="fuse")
    resize_btn.click(on_resize, [resize_source, resize_rule, resize_value, resize_name, resize_precision],
                     [*refresh_outputs, resize_info, energy], api_name="resize")
    pick.input(on_pick, pick, detail_outputs, show_progress="hidden")
    table.select(on_row, None, [pick, *detail_outputs], show_progress="hidden")
    import_btn.click(on_import, [upload, new_name], [*refresh_outputs, upload, new_name], api_name="import_adapter")
    delete_btn.click(on_delete_ask, pick, [confirm, confirm_text])
    no_btn.click(lambda: gr.update(visible=False), None, confirm)
    yes_btn.click(on_delete, pick, refresh_outputs)

    return SimpleNamespace(tab=tab, pick=pick, use_btn=use_btn, refresh=refresh,
                           refresh_outputs=refresh_outputs)
