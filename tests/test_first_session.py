"""Issue 32's first session with one's own pictures and model, without a browser: the
base-model dropdowns list workspace/models (point 5), CPU figures without CUDA (6), a
one-point loss chart (8), a reload shows the active run (10), the toy captioner says what
it knows (11). tests/test_browser_own_data.py walks the same path in Chromium."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import demo_config
from ui import datasets_view as dv
from ui import runs_view as rv
from ui import train_view as tv


@pytest.fixture(scope="module")
def own_model_app(tmp_path_factory):
    """The app of a workspace with a checkpoint and a diffusers folder of one's own in
    models/ (names only: listing reads no weights), and two runs queued, the older running."""
    from studio.config import dump_config
    from studio.jobs import queue as jobs
    from studio.jobs.runs import CONFIG_FILE
    from studio.workspace import Workspace
    from ui.app import build_app

    ws = Workspace.open(tmp_path_factory.mktemp("first") / "ws")
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    (ws.models_dir / "my-sd15.safetensors").write_bytes(b"")
    (ws.models_dir / "my-folder").mkdir()
    (ws.models_dir / "my-folder" / "model_index.json").write_text("{}")
    running = demo_config(max_steps=30)
    running.name = "cats"
    queued = demo_config(max_steps=4)
    queued.name, queued.dataset.trigger_word = "cats-b", "ocat"
    first = jobs.enqueue(ws, running, start_supervisor=False)
    jobs._update(ws, first.id, state="running", started=1.0)
    second = jobs.enqueue(ws, queued, start_supervisor=False)
    # as queued on the checkpoint (the empty file here would fail the check enqueue makes)
    queued.base_model = str(ws.models_dir / "my-sd15.safetensors")
    (ws.run_dir(second.id) / CONFIG_FILE).write_text(dump_config(queued))
    app = build_app(ws)
    fns = {f.fn.__name__: f for f in app.fns.values() if f.fn is not None}
    blocks = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    return SimpleNamespace(ws=ws, fns=fns, blocks=blocks, running=first.id, queued=second.id)


def test_both_base_model_dropdowns_list_the_models_folder_by_short_names_and_say_where_files_go(own_model_app):
    ws, blocks = own_model_app.ws, own_model_app.blocks
    checkpoint, folder = str(ws.models_dir / "my-sd15.safetensors"), str(ws.models_dir / "my-folder")
    for elem_id in ("train-base-model", "gen-model"):
        dropdown = blocks[elem_id]
        offered = dict((value, label) for label, value in dropdown.choices)
        assert offered[checkpoint] == "models/my-sd15.safetensors (checkpoint)", elem_id
        assert offered[folder] == "models/my-folder (diffusers folder)", elem_id
        assert offered["builtin"] == "builtin"
        assert str(ws.models_dir) in dropdown.info, elem_id  # where a checkpoint goes to be listed


def test_without_cuda_the_hint_speaks_of_the_cpu_and_ram():
    def hint(gpu: bool) -> str:
        return tv.resource_hint(family="sd15", builtin=False, steps=200, batch_size=1, resolution=64, gpu=gpu)

    cpu, gpu = hint(False), hint(True)
    assert "**RAM:**" in cpu and "VRAM" not in cpu and "GPU (" not in cpu and "24 GB GPU" not in cpu
    assert "not measured on this machine yet" in cpu and "no GPU here" in cpu
    assert "**VRAM:**" in gpu and "24 GB GPU" in gpu
    for text in (cpu, gpu):  # 64 px for a 512 px model is said on either
        assert "64 px is far below SD 1.5's native 512 px" in text
    assert "far below" not in tv.resource_hint(family="sd15", builtin=False, steps=200, batch_size=1,
                                               resolution=512, gpu=False)


def test_a_cuda_less_process_is_seen_as_one(monkeypatch):
    import sys

    from studio.jobs import speed

    fake_torch = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert speed.cuda_available() is False
    fake_torch.cuda.is_available = lambda: True
    assert speed.cuda_available() is True


def test_a_one_point_loss_chart_draws_its_point_and_two_points_draw_a_line():
    import json

    import gradio as gr

    plot = gr.LinePlot(None, x="step", y="loss", color="series")
    one = plot.postprocess(rv.loss_chart([[10, 0.5]]))  # what the browser gets
    assert one["mark"] == "point" and [row[0] for row in one["data"]] == [10, 10]  # raw and smoothed
    assert json.loads(json.dumps(one)) == one
    two = plot.postprocess(rv.loss_chart([[10, 0.5], [20, 0.4]]))
    assert two.mark == "line" and len(two.data) == 4
    # before a loss: never None (Gradio would remove the chart's container), and both series
    # named, so the lines the later data brings are coloured
    empty = plot.postprocess(rv.loss_chart([]))
    assert empty.mark == "line" and empty.data == [[None, None, "loss"], [None, None, "smoothed"]]
    assert empty.datatypes == {"step": "quantitative", "loss": "quantitative", "series": "nominal"}
    # the title differs while one step is logged: Gradio then redraws the chart (dots to lines)
    assert rv.loss_title([[10, 0.5]]) != rv.loss_title([[10, 0.5], [20, 0.4]]) == rv.loss_title([])


def test_a_reloaded_page_shows_the_running_run_and_the_last_started_form(own_model_app):
    from studio.jobs import list_jobs

    app = own_model_app
    assert rv.shown_run(list_jobs(app.ws), None) == app.running  # not the newer queued one
    assert rv.shown_run(list_jobs(app.ws), app.queued) == app.queued  # a run picked stays
    restore = app.fns["restore_form"]
    restored = dict(zip((c.elem_id for c in restore.outputs), restore.fn()))
    assert restored["train-name"] == "cats-b" and restored["train-dataset-trigger-word"] == "ocat"
    assert restored["train-training-max-steps"] == 4
    assert restored["train-base-model"]["value"] == str(app.ws.models_dir / "my-sd15.safetensors")
    assert restored["train-prior-on"] is False


def test_the_toy_captioner_is_labelled_and_says_what_it_knows(tmp_path):
    from PIL import Image

    from studio.datasets.captioning import TOY_CAPTIONER_NOTE, caption_dataset

    label, value = dv.captioner_choices(["Salesforce/blip-image-captioning-base"])[0]
    assert value == "builtin" and "toy shapes only" in label
    assert "photo" in dv.CAPTIONER_INFO and "BLIP" in dv.CAPTIONER_INFO
    folder = tmp_path / "cats"
    folder.mkdir()
    Image.new("RGB", (64, 64), "#e80").save(folder / "cat.png")
    report = caption_dataset(folder, "builtin")
    assert report.written == ["cat.png"] and TOY_CAPTIONER_NOTE in report.summary()
    assert "photos" in TOY_CAPTIONER_NOTE
