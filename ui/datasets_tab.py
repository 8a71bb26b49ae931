"""Datasets tab: import images, see and edit captions, bulk caption edits, auto-captioning, tags, bad files."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio import datasets as ds
from studio.datasets.captioning import DEFAULT_THRESHOLD
from studio.errors import StudioError
from ui import datasets_view as dv
from ui import models_view as mv
from ui.common import Studio, dropdown_value, friendly

#: Datasets up to this size are checked for bad files as soon as they are opened.
AUTO_CHECK_IMAGES = 300

_IMPORT_MODES = [
    ("Add files, keep existing ones", "add"),
    ("Add files, replace ones with the same name", "overwrite"),
    ("Only into a new, empty dataset", "new"),
]


def build(studio: Studio) -> SimpleNamespace:
    ws = studio.workspace
    names = ds.list_datasets(ws)
    initial = dropdown_value(names, "demo")

    with gr.Tab("1 · Datasets", id="datasets") as tab:
        gr.Markdown("Collect the images to learn from. Each image may have a same-name `.txt` caption "
                    "(comma-separated tags). Folders named `N_something` repeat their images N times; "
                    "a `reg/` folder holds class (regularisation) images.", elem_classes="tab-intro")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                with gr.Row():
                    pick = gr.Dropdown(names, value=initial, label="Dataset", scale=4,
                                       info="Folders in workspace/datasets", elem_id="ds-pick")
                    refresh = gr.Button("↻", scale=0, min_width=44, size="sm", elem_id="ds-refresh")
                stats = gr.Markdown(elem_id="ds-stats")
                with gr.Accordion("+ New dataset / add images", open=not names):
                    new_name = gr.Textbox(label="Dataset name", placeholder="e.g. my-character", elem_id="ds-new-name",
                                          info="A new name creates a dataset; an existing one adds to it.")
                    # no file_types filter: the page would drop other files without a word; the
                    # import report names each file it skips and why
                    upload = gr.File(label="Images, .txt captions or a .zip", file_count="multiple", height=140,
                                     elem_id="ds-upload")
                    folder = gr.Textbox(label="…or a folder on this computer", placeholder="/path/to/images",
                                        info="Copied into the workspace; the original is only read.",
                                        elem_id="ds-folder")
                    mode = gr.Radio(_IMPORT_MODES, value="add", label="When the dataset already exists")
                    import_btn = gr.Button("Import", variant="primary", elem_id="ds-import")
                    import_note = gr.Markdown(elem_id="ds-import-note")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images — click one to edit its caption", columns=6, height=320,
                                     object_fit="contain", allow_preview=False, interactive=False, fit_columns=False,
                                     elem_id="ds-gallery", elem_classes="captions-below")
                with gr.Row(equal_height=False):
                    chosen_image = gr.Image(label="Selected image", height=170, width=170, interactive=False,
                                            scale=1, min_width=170, buttons=[], elem_id="ds-chosen")
                    with gr.Column(scale=4):
                        chosen_name = gr.Markdown("*Click an image above to edit its caption.*",
                                                  elem_id="ds-chosen-name")
                        caption = gr.Textbox(label="Caption", lines=3, interactive=True, elem_id="ds-caption",
                                             info="Comma-separated tags. Training reads the first line.")
                        save_caption = gr.Button("Save caption", variant="primary", elem_id="ds-save-caption")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                gr.Markdown("#### Edit every caption at once")
                include_reg = gr.Checkbox(False, label="Also edit class / regularisation images' captions")
                with gr.Row():
                    trigger = gr.Textbox(label="Trigger word", scale=3, elem_id="ds-trigger",
                                         info="Put first in every caption (moved there if it is elsewhere).")
                    trigger_btn = gr.Button("Add trigger word", scale=1, elem_id="ds-add-trigger")
                with gr.Row():
                    tag = gr.Textbox(label="Tag", scale=3, elem_id="ds-tag",
                                     info="Removed wherever it is an exact tag (click one in the table).")
                    remove_btn = gr.Button("Remove tag", scale=1)
                with gr.Row():
                    find = gr.Textbox(label="Find", scale=2)
                    replace = gr.Textbox(label="Replace with", scale=2)
                    regex = gr.Checkbox(False, label="Regular expression", scale=1)
                    replace_btn = gr.Button("Replace", scale=1)
                with gr.Row():
                    affix = gr.Textbox(label="Text", scale=3, info="Added as a separate tag.")
                    prefix_btn = gr.Button("Add at start", scale=1)
                    suffix_btn = gr.Button("Add at end", scale=1)
                with gr.Accordion("Auto-caption with a model", open=False):
                    with gr.Row():
                        cap_model = gr.Dropdown(dv.captioner_choices(mv.choices(ws, "captioner")), value="builtin",
                                                allow_custom_value=True, label="Captioning model", scale=3,
                                                elem_id="ds-cap-model", info=dv.CAPTIONER_INFO)
                        cap_threshold = gr.Slider(0.05, 0.95, value=DEFAULT_THRESHOLD, step=0.05, scale=2,
                                                  min_width=240, label="Tag threshold", elem_id="ds-cap-threshold",
                                                  info="WD14 taggers: keep tags at least this probable.")
                    cap_mode = gr.Radio(dv.CAPTION_MODES, value="fill", label="Which captions", elem_id="ds-cap-mode")
                    with gr.Row():
                        cap_trigger = gr.Textbox(label="Trigger word (optional)", scale=3, elem_id="ds-cap-trigger",
                                                 info="Put first in every caption written.")
                        cap_btn = gr.Button("Caption", variant="primary", scale=1, elem_id="ds-caption-run")
                    cap_note = gr.Markdown(elem_id="ds-cap-note")
            with gr.Column(scale=2):
                tags = gr.Dataframe(headers=["Tag", "Images"], datatype=["str", "number"], interactive=False,
                                    label="Tag frequency", max_height=330, elem_id="ds-tags")
        with gr.Accordion("Problems — bad-file report", open=True):
            issues_note = gr.Markdown(elem_id="ds-issues-note")
            issues = gr.Dataframe(headers=dv.ISSUE_HEADERS, interactive=False, wrap=True, max_height=300,
                                  column_widths=["90px", "20%", "15%", "50%"], elem_id="ds-issues")
            check_btn = gr.Button("Check all files again", size="sm")
        state = gr.State({"name": None, "paths": [], "selected": None})

    # ------------------------------------------------------------------ handlers
    def folder_of(name: str | None) -> Path:
        if not name:
            raise StudioError("Pick a dataset first (or create one with + New dataset).")
        path = ws.dataset_dir(name)
        if not path.is_dir():
            raise StudioError(f"Dataset {name!r} is gone from {ws.datasets_dir}; press ↻ to refresh.")
        return path

    def check_outputs(path: Path):
        report = ds.check_dataset(path)
        note = report.summary(examples=0).splitlines()[0]
        return report, note, dv.issue_rows(report)

    def views(name: str | None, *, check: bool | None = None):
        """gallery, stats, tags, issues note, issues table, state, selection reset (3), the
        trigger-word boxes (2)."""
        empty_sel = [None, "*Click an image above to edit its caption.*", ""]
        if not name:
            placeholder = gr.update(placeholder=dv.trigger_placeholder(""))
            return [[], "No dataset yet: add images with + New dataset.", [], "", [],
                    {"name": None, "paths": [], "selected": None}, *empty_sel, placeholder, placeholder]
        path = folder_of(name)
        items = ds.load_items(path)
        gallery_items = dv.gallery_items(items, path)
        stats_value = ds.dataset_stats(path)
        if check is None:
            check = stats_value.image_count + stats_value.reg_image_count <= AUTO_CHECK_IMAGES
        report, note, rows = (check_outputs(path) if check
                              else (None, "Large dataset: press *Check all files again* to look for bad files.", []))
        freq = ds.tag_frequency(path)
        new_state = {"name": name, "paths": [p for p, _ in gallery_items], "selected": None}
        placeholder = gr.update(placeholder=dv.trigger_placeholder(ds.infer_trigger_word(path)))
        return [gallery_items, dv.stats_markdown(stats_value, report), [[t, n] for t, n in freq.items()],
                note, rows, new_state, *empty_sel, placeholder, placeholder]

    view_outputs = [gallery, stats, tags, issues_note, issues, state, chosen_image, chosen_name, caption, trigger,
                    cap_trigger]

    @friendly
    def on_pick(name):
        return views(name)

    @friendly
    def on_refresh(current):
        names = ds.list_datasets(ws)
        value = dropdown_value(names, current)
        return [gr.update(choices=names, value=value), *views(value)]

    @friendly
    def on_import(name, files, folder_text, import_mode):
        name = (name or "").strip()
        if not name:
            raise StudioError("Give the dataset a name first (letters, digits, '-', '_').")
        sources = [Path(f) for f in (files or [])]
        if folder_text and folder_text.strip():
            sources.append(Path(folder_text.strip()).expanduser())
        if not sources:
            raise StudioError("Nothing to import: drop image files or a .zip above, or give a folder path.")
        report = ds.import_dataset(sources, name, ws, mode=import_mode)
        summary = report.summary()
        if report.skipped:
            gr.Warning(f"Skipped {len(report.skipped)} file(s); see the note under Import.")
        gr.Info(summary.splitlines()[0])
        names = ds.list_datasets(ws)
        value = report.name if report.name in names else dropdown_value(names, None)
        return [gr.update(choices=names, value=value), *views(value, check=True), None, "", dv.import_note(report)]

    @friendly
    def on_select(current: dict, evt: gr.SelectData):
        paths = current.get("paths") or []
        if evt.index is None or not (0 <= evt.index < len(paths)):
            return gr.skip(), gr.skip(), gr.skip(), current
        path = Path(paths[evt.index])
        folder_path = folder_of(current["name"])
        text = ds.read_caption(path)
        rel = path.relative_to(folder_path).as_posix()
        return (str(path), f"**{rel}** — {'edit the caption and save' if text else 'no caption yet'}", text,
                {**current, "selected": evt.index})

    @friendly
    def on_save_caption(current: dict, text: str):
        index = current.get("selected")
        if index is None:
            raise StudioError("Click an image in the gallery first, then edit its caption.")
        path = Path(current["paths"][index])
        ds.write_caption(path, text or "")
        gr.Info(f"Saved the caption of {path.name}.")
        folder_path = folder_of(current["name"])
        result = views(current["name"], check=False)
        # keep the selection and the issues table as they were
        result[5] = {**result[5], "selected": index}
        result[3], result[4] = gr.skip(), gr.skip()
        result[6] = str(path)
        result[7] = f"**{path.relative_to(folder_path).as_posix()}** — saved"
        result[8] = ds.read_caption(path)
        return result

    def bulk(action):
        @friendly
        def run(current: dict, *args):
            name = current.get("name")
            changed = action(folder_of(name), *args)
            gr.Info(f"Changed {changed} caption file(s)." if changed else "No caption needed a change.")
            result = views(name, check=False)
            result[3], result[4] = gr.skip(), gr.skip()  # the bad-file report does not change
            return result
        return run

    def do_trigger(path, word, reg):
        return ds.add_trigger_word(path, word, include_regularisation=reg)

    def do_remove(path, word, reg):
        return ds.remove_tag(path, word, include_regularisation=reg)

    def do_replace(path, find_text, replace_text, use_regex, reg):
        return ds.find_replace(path, find_text, replace_text or "", regex=use_regex, include_regularisation=reg)

    def do_prefix(path, text, reg):
        return ds.add_prefix(path, text, include_regularisation=reg)

    def do_suffix(path, text, reg):
        return ds.add_suffix(path, text, include_regularisation=reg)

    @friendly
    def on_caption(current: dict, model, cap_mode_value, threshold, reg, word, progress=gr.Progress()):
        name = current.get("name")
        note = dv.auto_caption(folder_of(name), model, cap_mode_value, threshold, reg, word, progress, workspace=ws)
        gr.Info(note.splitlines()[1])
        return [*views(name), note]  # checked again: missing captions may be there now

    @friendly
    def on_tag_pick(evt: gr.SelectData):
        row = evt.row_value if getattr(evt, "row_value", None) else None
        return row[0] if row else gr.skip()

    @friendly
    def on_check(current: dict):
        _, note, rows = check_outputs(folder_of(current.get("name")))
        return note, rows

    pick.input(on_pick, pick, view_outputs)
    refresh.click(on_refresh, pick, [pick, *view_outputs])
    import_btn.click(on_import, [new_name, upload, folder, mode], [pick, *view_outputs, upload, folder, import_note],
                     api_name="import_dataset")
    # Picking an image or a tag reads one small file: answered directly, not through the queue
    # (a click's caption shows in 70 ms instead of 130 ms here).
    gallery.select(on_select, state, [chosen_image, chosen_name, caption, state], show_progress="hidden",
                   queue=False)
    save_caption.click(on_save_caption, [state, caption], view_outputs)
    caption.submit(on_save_caption, [state, caption], view_outputs)
    trigger_btn.click(bulk(do_trigger), [state, trigger, include_reg], view_outputs)
    remove_btn.click(bulk(do_remove), [state, tag, include_reg], view_outputs)
    replace_btn.click(bulk(do_replace), [state, find, replace, regex, include_reg], view_outputs)
    prefix_btn.click(bulk(do_prefix), [state, affix, include_reg], view_outputs)
    suffix_btn.click(bulk(do_suffix), [state, affix, include_reg], view_outputs)
    cap_btn.click(on_caption, [state, cap_model, cap_mode, cap_threshold, include_reg, cap_trigger],
                  [*view_outputs, cap_note], api_name="caption_dataset")
    tags.select(on_tag_pick, None, tag, show_progress="hidden", queue=False)
    check_btn.click(on_check, state, [issues_note, issues])

    return SimpleNamespace(tab=tab, pick=pick, refresh=on_refresh, view_outputs=view_outputs)
