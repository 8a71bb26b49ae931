"""UI helpers without a browser: what the page shows from events, configs and adapter rows."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from studio.config import TrainConfig, parse_config
from studio.errors import StudioError
from ui import datasets_view as dv
from ui import format as fmt
from ui import generate_view as gv
from ui import library_view as lv
from ui import runs_view as rv
from ui import train_view as tv

ROOT = Path(__file__).resolve().parents[1]


def _fresh_process(code: str) -> dict:
    """Run `code` in a new Python process (nothing imported yet); its last line, as JSON."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow(seconds=10)
def test_building_the_app_imports_no_torch_and_copies_the_demo_dataset(tmp_path):
    code = (
        "import sys, json\n"
        "from ui.app import build_app\n"
        f"app = build_app({str(tmp_path / 'ws')!r})\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'diffusers': 'diffusers' in sys.modules,"
        " 'blocks': type(app).__name__}))\n"
    )
    result = _fresh_process(code)
    assert result == {"torch": False, "diffusers": False, "blocks": "Blocks"}
    if (ROOT / "assets" / "demo-dataset").is_dir():
        assert any((tmp_path / "ws" / "datasets" / "demo").glob("*.png"))


@pytest.mark.slow(seconds=10)
def test_the_first_pages_train_hint_measures_nothing(tmp_path):
    """The page's load event quotes the speed as known (none on a new workspace): measuring
    one (a training subprocess, torch imported) waits until the page has loaded."""
    code = (
        "import sys, json, threading\n"
        "from ui.app import build_app\n"
        f"app = build_app({str(tmp_path / 'ws')!r})\n"
        "fns = app.fns.values() if isinstance(app.fns, dict) else app.fns\n"
        "first = next(f for f in fns if f.name == 'on_first_load')\n"
        "hint = first.fn()[0]\n"
        "print(json.dumps({'hint': hint, 'torch': 'torch' in sys.modules,"
        " 'measuring': any(t.name == 'measure-speed' for t in threading.enumerate())}))\n"
    )
    result = _fresh_process(code)
    assert "speed is not measured yet" in result["hint"]
    assert not result["torch"] and not result["measuring"]


@pytest.mark.slow(seconds=20)
def test_importing_ui_first_skips_gradios_doc_upkeep_and_changes_nothing_else():
    """gradio re-parses each component's source to refresh its type stubs and compiles each
    event's docstring as a template on every import (1.2 s of the studio's start); importing
    `ui` first turns both off. Every event listener's docstring comes out the same, and
    gradio's components still build a page."""
    code = (
        "import ast, sys, json, jinja2\n"
        "parsed_by, templates = [], []\n"
        "original_parse, original_from_string = ast.parse, jinja2.Environment.from_string\n"
        "def counting_parse(*args, **kwargs):\n"
        "    parsed_by.append(sys._getframe(1).f_globals.get('__name__'))\n"
        "    return original_parse(*args, **kwargs)\n"
        "def counting_from_string(*args, **kwargs):\n"
        "    templates.append(1)\n"
        "    return original_from_string(*args, **kwargs)\n"
        "ast.parse, jinja2.Environment.from_string = counting_parse, counting_from_string\n"
        "{first}import gradio as gr\n"
        "from gradio.components.base import Component\n"
        "docs = {{}}\n"
        "def walk(cls):\n"
        "    for sub in cls.__subclasses__():\n"
        "        for event in getattr(sub, 'EVENTS', []):\n"
        "            name = getattr(event, 'event_name', event)\n"
        "            key = f'{{sub.__module__}}.{{sub.__name__}}.{{name}}'\n"
        "            docs[key] = (getattr(sub, name).__doc__ or '').rstrip()\n"
        "        walk(sub)\n"
        "walk(Component)\n"
        "with gr.Blocks() as demo:\n"
        "    box = gr.Textbox('x')\n"
        "    gr.Button().click(lambda v: v, box, box)\n"
        "print(json.dumps({{'stub_parses': parsed_by.count('gradio.component_meta'), 'templates': len(templates),"
        " 'docs': docs, 'components': len(demo.config['components'])}}))\n"
    )
    results = {}
    for name, first in (("ui first", "import ui\n"), ("gradio alone", "")):
        results[name] = _fresh_process(code.format(first=first))
    ours, theirs = results["ui first"], results["gradio alone"]
    assert ours["stub_parses"] == 0 and theirs["stub_parses"] > 50  # one or more per component class
    assert ours["templates"] == 0 and theirs["templates"] > 100  # one per event of each component class
    assert len(ours["docs"]) > 200 and ours["docs"] == theirs["docs"]
    assert any("{{" not in doc and "Textbox" in doc for key, doc in ours["docs"].items() if ".Textbox." in key)
    assert ours["components"] == theirs["components"] >= 2


@pytest.mark.slow(seconds=10)
def test_the_http_api_offers_exactly_the_handlers_the_readme_names(tmp_path):
    """Scripts get the stable names the README lists; the page's own handlers (hints,
    refreshes, tab switches) stay out of the API description the page carries."""
    import re

    readme = (ROOT / "README.md").read_text()
    sentence = readme[readme.index("under stable names:"):]
    documented = set(re.findall(r"`(/[a-z_]+)`", sentence[:sentence.index(".\n")]))
    code = (
        "import json\n"
        "from ui.app import build_app\n"
        f"app = build_app({str(tmp_path / 'ws')!r})\n"
        "info = app.get_api_info()\n"
        "print(json.dumps({'named': sorted(info['named_endpoints']), 'size': len(json.dumps(info)),"
        " 'handlers': len(app.fns)}))\n"
    )
    result = _fresh_process(code)
    assert len(documented) == 10 and set(result["named"]) == documented
    assert result["handlers"] > 5 * len(documented)  # the page has many more handlers than that
    assert result["size"] < 200_000  # it was 1.0 MB with every hint handler's ~100 inputs


# ------------------------------------------------------------------ runs: events -> view
def _progress(step, loss, **extra):
    return {"type": "progress", "time": 1.0, "step": step, "max_steps": 30, "loss": loss, "lr": 1e-3,
            "it_s": 2.0, "eta_s": (30 - step) / 2, **extra}


def test_loss_series_has_raw_and_smoothed_lines():
    rows = rv.loss_series([[5, 1.0], [10, 0.5], [15, 0.75]])
    raw = [r for r in rows if r["series"] == "loss"]
    smooth = [r for r in rows if r["series"] == "smoothed"]
    assert [r["step"] for r in raw] == [5, 10, 15] and [r["loss"] for r in raw] == [1.0, 0.5, 0.75]
    assert smooth[0]["loss"] == pytest.approx(1.0)  # debiased: starts at the first value
    assert 0.5 < smooth[1]["loss"] < 1.0
    assert rv.loss_series([]) == []


def test_loss_series_thins_long_runs_but_keeps_the_newest_point():
    points = [[i, 1.0 / i] for i in range(1, 10_001)]
    rows = rv.loss_series(points, max_points=100)
    raw = [r for r in rows if r["series"] == "loss"]
    assert len(raw) <= 102
    assert raw[-1]["step"] == 10_000


def test_events_fold_into_the_view_incrementally(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    events = run_dir / "events.jsonl"
    view = rv.new_view("run")
    lines = [{"type": "start", "time": 1.0, "max_steps": 30, "images": 6}, _progress(5, 1.0), _progress(10, 0.8)]
    events.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"type": "progr')  # a half-written line
    assert rv.tail_events(view, run_dir)
    assert view["points"] == [[5, 1.0], [10, 0.8]] and view["max_steps"] == 30
    assert not rv.tail_events(view, run_dir)  # nothing new: nothing changes
    with open(events, "a") as handle:  # the writer finishes the line and goes on
        handle.write('ess", "time": 2.0, "step": 15, "max_steps": 30, "loss": 0.7}\n')
        handle.write(json.dumps({"type": "sample", "time": 3.0, "step": 15, "paths": ["a.png", "b.png"],
                                 "prompts": ["p1", "p2"]}) + "\n")
    assert rv.tail_events(view, run_dir)
    assert view["points"][-1] == [15, 0.7]
    assert view["samples"] == [["a.png", "step 15: p1"], ["b.png", "step 15: p2"]]
    assert "1 sample" not in view["lines"][-1] and "2 sample image(s)" in view["lines"][-1]


def test_resume_drops_points_that_are_trained_again_and_done_names_the_adapter():
    view = rv.new_view("run")
    rv.apply_events(view, [_progress(5, 1.0), _progress(10, 0.9), _progress(15, 0.8),
                          {"type": "error", "time": 1, "message": "boom"}])
    assert view["error"] == "boom"
    rv.apply_events(view, [{"type": "resume", "time": 2, "step": 10, "checkpoint": "step-10"}, _progress(15, 0.7),
                          {"type": "done", "time": 3, "step": 30, "adapter": "/ws/adapters/x.safetensors"}])
    assert view["points"] == [[5, 1.0], [10, 0.9], [15, 0.7]]
    assert view["error"] is None and view["adapter"] == "/ws/adapters/x.safetensors"
    assert view["lines"][-1].split()[1] == "done"


def test_status_html_shows_progress_and_escapes_text():
    job = SimpleNamespace(id="<b>run</b>", state="running", started=1.0, finished=None, message="")
    view = rv.new_view("x")
    rv.apply_events(view, [_progress(10, 0.5)])
    text = rv.status_html(job, view)
    assert "&lt;b&gt;run&lt;/b&gt;" in text and "<b>run</b>" not in text
    assert "10 / 30" in text and "2.00 it/s" in text and "ETA" in text and "width:33.3%" in text
    rv.apply_events(view, [{"type": "cancelled", "time": 2, "step": 12}])  # resumed: a new worker starts
    restarting = rv.status_html(job, view)
    assert "starting" in restarting and "it/s" not in restarting and "10 / 30" in restarting
    queued = SimpleNamespace(id="r", state="queued", started=None, finished=None, message="")
    assert "2 ahead" in rv.status_html(queued, rv.new_view("r"), queue_position=2)
    assert "Pick a run" in rv.status_html(None, {})


def test_job_rows_and_durations():
    job = SimpleNamespace(id="a-1", name="a", state="failed", created=0.0, started=10.0, finished=75.0,
                          message="x" * 200)
    row = rv.job_rows([job])[0]
    assert row[:3] == ["a-1", "failed", "1 min 05 s"] and len(row[3]) <= rv.JOB_NOTE_CHARS
    assert fmt.format_duration(None) == "—" and fmt.format_duration(7200) == "2 h 00 min"


def test_run_log_shows_the_newest_lines_first():
    text = rv.run_log(["10:00 start", "10:01 progress step 10", "10:02 done"], "loading\ntraining\n")
    lines = text.splitlines()
    assert lines[:3] == ["10:02 done", "10:01 progress step 10", "10:00 start"]
    assert lines[-2:] == ["training", "loading"] and "worker.log, newest first" in text
    assert rv.run_log(["a"], "") == "a"


def test_tail_text_keeps_the_last_lines_and_folds_progress_bars(tmp_path):
    path = tmp_path / "worker.log"
    path.write_text("".join(f"line {i}\n" for i in range(100)) + "10%\r50%\r100%\n")
    text = rv.tail_text(path, max_lines=3)
    assert text.splitlines() == ["line 98", "line 99", "100%"]
    assert rv.tail_text(tmp_path / "missing.log") == ""


# ------------------------------------------------------------------ generate: rows -> adapters
def test_adapter_rows_become_adapter_uses():
    resolve = lambda name: Path(f"/ws/adapters/{name}.safetensors")  # noqa: E731
    uses = gv.row_uses([("a", 1.0), ("", 0.5), (None, 1.0), ("b", -0.5), ("c", 0), ("d", None)], resolve)
    assert [(row, u.path.stem, u.weight) for row, u in uses.items()] == [(0, "a", 1.0), (3, "b", -0.5), (5, "d", 1.0)]


def test_an_adapter_used_twice_is_a_clear_error():
    from studio.generation.engine import AdapterUse

    rows = [AdapterUse(Path("/ws/adapters/a.safetensors"), 1.0)]
    tags = [AdapterUse(Path("/ws/adapters/a.safetensors"), 0.5)]
    with pytest.raises(StudioError, match="used twice"):
        gv.merge_uses(rows, tags)
    other = [AdapterUse(Path("/ws/adapters/b.safetensors"), 0.5)]
    assert len(gv.merge_uses(rows, other)) == 2


def test_generate_and_train_offer_builtin_flux_with_its_samplers_and_blocks(tmp_path):
    """The base-model fields list both built-in models; picking one offers its family's
    samplers and LBW presets (FLUX.1: Euler, DOUBLE / SINGLE over D/S blocks); a model that
    cannot be resolved yet changes nothing; no sampler picked is the family's default."""
    from studio.workspace import Workspace
    from ui import train_tab

    studio = SimpleNamespace(workspace=Workspace.open(tmp_path / "ws"))
    assert train_tab.model_choices(studio)[:2] == ["builtin", "builtin-flux"]
    flux, sd = gv.model_family(studio, "builtin-flux"), gv.model_family(studio, "builtin")
    assert (flux.name, sd.name) == ("flux", "sd15")
    assert gv.sampler_choices(flux) == [("Euler", "euler")] and gv.sampler_choices(sd)[0] == ("DDIM", "ddim")
    flux_blocks, flux_help = gv.block_weight_choices(flux)
    sd_blocks, sd_help = gv.block_weight_choices(sd)
    assert {"DOUBLE", "SINGLE"} <= set(flux_blocks) and "DOUBLE" not in sd_blocks and flux_blocks[0] == ""
    assert "FLUX.1: BASE, D00" in flux_help and "SD 1.5" in sd_help
    assert gv.model_family(studio, "someone/not-pulled-yet") is None
    request, _ = gv.mix_request(studio, gv.GenerateSettings("a star", model="builtin-flux"), [])
    assert request.scheduler is None


def test_parse_size():
    assert gv.parse_size(gv.SIZE_DEFAULT) == (None, None)
    assert gv.parse_size("512 × 768") == (512, 768)
    assert gv.parse_size("640x480") == (640, 480)
    with pytest.raises(StudioError, match="WIDTH x HEIGHT"):
        gv.parse_size("big")


# ------------------------------------------------------------------ train: config <-> form
def test_config_fields_cover_every_setting_with_help_text():
    specs = tv.config_fields()
    keys = {s.key for s in specs}
    assert {"training.max_steps", "network.rank", "dataset.trigger_word", "sampling.prompts", "seed"} <= keys
    by_key = {s.key: s for s in specs}
    assert by_key["training.max_steps"].kind == "int" and by_key["training.max_steps"].minimum == 1
    assert by_key["training.lr_scheduler"].kind == "choice" and "cosine" in by_key["training.lr_scheduler"].choices
    assert by_key["training.text_encoder_lr"].optional and "empty" in by_key["training.text_encoder_lr"].info
    assert by_key["sampling.prompts"].kind == "lines" and by_key["network.target_modules"].kind == "list"
    assert by_key["training.max_steps"].info == TrainConfig.model_fields["training"].annotation.model_fields[
        "max_steps"].description
    advanced = {s.key for s in tv.config_fields(exclude=tv.MAIN_FIELDS)}
    assert "training.max_steps" not in advanced and "training.lr_scheduler" in advanced


def test_form_round_trip_gives_the_same_config():
    config = TrainConfig()
    config.sampling.prompts = ["a, with a comma", "second"]
    config.training.max_steps = 30
    specs = tv.config_fields()
    values = tv.config_to_form(specs, config)
    again = parse_config(tv.form_to_config_dict(specs, values), "Settings")
    assert again == config


def test_form_values_are_converted_and_bad_ones_named():
    specs = tv.config_fields()
    values = tv.config_to_form(specs, TrainConfig())
    index = {s.key: i for i, s in enumerate(specs)}
    values[index["training.max_steps"]] = 30.0           # gr.Number sends floats
    values[index["network.target_modules"]] = "to_q, to_v,"
    values[index["training.text_encoder_lr"]] = None     # empty optional box = default
    config = parse_config(tv.form_to_config_dict(specs, values), "Settings")
    assert config.training.max_steps == 30 and config.network.target_modules == ["to_q", "to_v"]
    assert config.training.text_encoder_lr is None
    values[index["training.learning_rate"]] = 0
    with pytest.raises(StudioError, match=r"Settings: training\.learning_rate"):
        parse_config(tv.form_to_config_dict(specs, values), "Settings")


def test_the_form_holds_the_chosen_methods_options_only_and_keeps_what_was_typed():
    """network.type lokr: LoKr's option shows and goes into the config, LoRA's hide and stay
    out of it with what was typed in them, which comes back with network.type lora."""
    specs = tv.config_fields()
    index = {s.key: i for i, s in enumerate(specs)}
    by_key = {s.key: s for s in specs}
    assert by_key["network.rank"].methods == () and by_key["network.lokr_factor"].methods == ("lokr",)
    assert by_key["network.conv_target_modules"].methods == ("locon", "tlora", "adalora")
    values = tv.config_to_form(specs, TrainConfig())
    values[index["network.use_dora"]] = True              # typed while LoRA was chosen
    values[index["network.type"]] = "lokr"
    values[index["network.lokr_factor"]] = 4.0
    assert tv.shown(by_key["network.lokr_factor"], "lokr") and not tv.shown(by_key["network.use_dora"], "lokr")
    lokr = parse_config(tv.form_to_config_dict(specs, values), "Settings")
    assert lokr.network.type == "lokr" and lokr.network.lokr_factor == 4 and "use_dora" not in lokr.network.model_fields
    assert values[index["network.use_dora"]] is True
    values[index["network.type"]] = "lora"
    lora = parse_config(tv.form_to_config_dict(specs, values), "Settings")
    assert lora.network.use_dora and "lokr_factor" not in tv.form_to_config_dict(specs, values)["network"]
    # the form of a LoKr config: LoRA's inputs show their defaults
    again = tv.config_to_form(specs, lokr)
    assert again[index["network.lokr_factor"]] == 4 and again[index["network.use_dora"]] is False


def test_the_train_tab_hides_other_methods_options_and_a_preset_keeps_them(tmp_path):
    """The page's events: choosing network.type shows exactly that method's inputs; loading a
    preset leaves the inputs of methods other than the preset's as they were."""
    from ui.app import build_app

    app = build_app(tmp_path / "ws")
    fns = {f.fn.__name__: f for f in app.fns.values() if f.fn is not None}
    inputs = {b.elem_id: b for b in app.blocks.values() if (getattr(b, "elem_id", None) or "").startswith("train-")}
    boxes = fns["on_network_type"].outputs  # each holds the inputs of the options of one set of methods
    held = {box.elem_id: {c.elem_id for c in inputs.values() if _inside(c, box)} for box in boxes}
    option_ids = {f"train-{s.key.replace('.', '-').replace('_', '-')}": s.methods for s in tv.config_fields()}
    assert set().union(*held.values()) == {key for key, methods in option_ids.items() if methods}
    for method in ("lokr", "tlora", "lora"):
        updates = dict(zip((box.elem_id for box in boxes), fns["on_network_type"].fn(method)))
        shown = {key for box, update in updates.items() if update["visible"] for key in held[box]}
        assert shown == {key for key, methods in option_ids.items() if method in methods}
    preset = fns["on_preset"]
    filled = dict(zip((c.elem_id for c in preset.outputs), preset.fn("tlora-single-image")))
    assert filled["train-network-type"] == "tlora" and filled["train-network-tlora-min-rank"] == 32
    assert filled["train-network-lokr-factor"] == {"__type__": "update"}  # kept as it was


def _inside(component, box) -> bool:
    parent = component.parent
    while parent is not None and parent is not box:
        parent = parent.parent
    return parent is box


def test_resource_hint_times_come_from_measured_speed():
    from studio.config import TrainConfig
    from studio.jobs.speed import Speed, estimate

    config = TrainConfig()
    config.training.max_steps, config.dataset.resolution = 100, 64
    config.sampling.prompts, config.sampling.steps, config.sampling.every_n_steps = ["a", "b"], 10, 50
    speed = Speed(2.0, 64 * 64, "5 steps measured on this machine", setup_s=4.0, sample_image_s=0.5,
                  sample_steps=20)
    plan = estimate(config, speed, missing_class_images=4)
    # 100 steps at 2/s, 2 prompts x 2 rounds at 0.25 s, 4 class images at 0.25 s, 4 s loading
    assert (plan.training_s, plan.samples_s, plan.class_images_s, plan.total_s) == (50.0, 1.0, 1.0, 56.0)
    config.dataset.resolution, config.training.batch_size = 128, 2  # 8x the pixels per step
    assert estimate(config, speed).training_s == 400.0
    text = tv.resource_hint(family=None, builtin=True, steps=100, batch_size=1, resolution=64, speed=speed,
                           plan=plan, steps_per_epoch=10, sample_prompts=2)
    assert "about 56 s for 100 steps" in text and "5 steps measured on this machine (2.00 steps/s)" in text
    assert "10.0 epochs" in text and "4 sample picture(s)" in text
    measuring = tv.resource_hint(family=None, builtin=True, steps=100, batch_size=1, resolution=64)
    assert "speed is not measured yet" in measuring and "for 100 steps" not in measuring
    sdxl = tv.resource_hint(family="sdxl", builtin=False, steps=1000, batch_size=1, resolution=1024,
                           mixed_precision="bf16")
    assert "VRAM" in sdxl and "SDXL" in sdxl
    checkpointed = tv.resource_hint(family="sdxl", builtin=False, steps=1000, batch_size=1, resolution=1024,
                                   mixed_precision="bf16", gradient_checkpointing=True)
    assert "gradient checkpointing" in checkpointed
    two = tv.resource_hint(family="sdxl", builtin=False, steps=1000, batch_size=2, resolution=1024, processes=2,
                           steps_per_epoch=40)
    assert "**Processes:** 2" in two and "2 × 2 pictures" in two and "per GPU" in two and "100.0 epochs" in two


# ------------------------------------------------------------------ library, datasets
def test_thumbnail_from_metadata():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert lv.thumbnail_from_metadata({"modelspec.thumbnail": url}).size == (8, 8)
    assert lv.thumbnail_from_metadata({"modelspec.thumbnail": "data:image/png;base64,!!!"}) is None
    assert lv.thumbnail_from_metadata({}) is None
    shown = lv.metadata_for_display({"modelspec.thumbnail": url, "ss_tag_frequency": '{"a": {"b": 1}}'})
    assert shown["ss_tag_frequency"] == {"a": {"b": 1}} and "characters" in shown["modelspec.thumbnail"]


def test_gallery_items_mark_repeats_and_class_images(tmp_path):
    item = lambda rel, **kw: SimpleNamespace(path=tmp_path / rel, caption=kw.get("caption", ""),  # noqa: E731
                                             repeats=kw.get("repeats", 1), is_regularisation=kw.get("reg", False))
    items = dv.gallery_items([item("10_x/b.png", repeats=10), item("reg/c.png", reg=True),
                             item("sks.png", caption="sks, dog")], tmp_path)
    assert items[0][1] == "[×10] (no caption) · 10_x/b.png"
    assert items[1] == (str(tmp_path / "sks.png"), "sks, dog · sks.png")  # training pictures before class images
    assert items[2][1].startswith("[class image]")


def test_friendly_turns_studio_errors_into_a_message_and_skips_updates():
    from ui.common import friendly

    @friendly
    def broken():
        raise StudioError("Dataset 'x' has no images; add some.")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = broken()
    assert result == {"__type__": "update"}  # gr.skip(): every output stays as it was
    assert any("has no images" in str(w.message) for w in caught)

    @friendly
    def crashes():
        raise KeyError("oops")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert crashes() == {"__type__": "update"}
    assert any("KeyError" in str(w.message) for w in caught)
