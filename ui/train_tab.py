"""Train tab: pick a dataset, base model and preset, adjust settings, check them, queue a run."""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from types import SimpleNamespace

import gradio as gr

from studio import PRESETS_DIR
from studio.config import TrainConfig, dump_config, load_config, parse_config, planned_steps
from studio.datasets import dataset_stats, list_datasets
from studio.errors import StudioError
from studio.jobs import ACTIVE, enqueue, list_jobs
from studio.jobs.runs import TrainingCheck, check_training, class_image_plan, prior_preservation, run_config
from studio.jobs.speed import cuda_available, estimate, measure_speed, speed_from_runs
from studio.models import resolve_model
from studio.models.families import BUILTIN_MODELS
from ui import format as fmt
from ui import models_view as mv
from ui import train_view as tv
from ui.common import (
    PROBLEM_TITLE,
    Studio,
    dropdown_value,
    friendly,
    heavy_imports,
    unchecked,
)

log = logging.getLogger("ui")

#: How long a hint waits for this machine's speed to be measured (about ten seconds on the built-in model).
MEASURE_WAIT_S = 120
MEASURE_DELAY_S = 3.0  # after the first page has loaded (ui.app's warm-up waits as long)

DEFAULT_PRESET = "tiny-demo-quick"  # the demo concept in about half a minute (bench.time_to_concept)
BUILTIN = "builtin"
#: Main-form inputs in display order (the dataset is its own dropdown).
MAIN_ORDER = [("name",), ("base_model",), ("training", "max_steps"), ("network", "rank"), ("network", "alpha"),
              ("training", "learning_rate"), ("dataset", "resolution"), ("dataset", "trigger_word"),
              ("training", "batch_size"), ("sampling", "prompts"), ("dataset", "class_prompt"),
              ("dataset", "num_class_images")]
_MAIN_LABELS = {("name",): "Adapter name", ("training", "max_steps"): "Steps", ("network", "rank"): "Rank",
                ("network", "alpha"): "Alpha", ("training", "learning_rate"): "Learning rate",
                ("dataset", "resolution"): "Resolution", ("dataset", "trigger_word"): "Trigger word",
                ("training", "batch_size"): "Batch size", ("sampling", "prompts"): "Sample prompts",
                ("dataset", "class_prompt"): "Class prompt", ("dataset", "num_class_images"): "Class pictures"}
#: Shorter help than the config's where a column is narrow.
_MAIN_INFO = {("name",): "Names the file in adapters/",
              ("dataset", "class_prompt"): "What the subject is, e.g. 'a photo of a cat'",
              ("dataset", "num_class_images"): "The dataset's reg/ pictures first, then drawn ones"}


def _number_step(spec: tv.FieldSpec) -> float:
    if spec.kind == "int":
        return 1
    if "lr" in spec.path[-1] or "learning_rate" in spec.path[-1]:
        return 1e-5
    if "epsilon" in spec.path[-1]:
        return 1e-9
    return 0.01


def _visible(spec: tv.FieldSpec, network_type: str) -> bool:
    """Whether the box of `spec`'s options shows while network.type is `network_type`."""
    return tv.shown(spec, network_type)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def preset_config(name: str | None) -> TrainConfig:
    if not name:
        return TrainConfig()
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise StudioError(f"Preset {name!r} not found in {PRESETS_DIR}.")
    return load_config(path)


def warnings_note(check: TrainingCheck) -> str:
    return "".join(f"\n\n- {warning}" for warning in check.warnings)


def model_choices(studio: Studio) -> list[str]:
    """The built-in models (BUILTIN_MODELS), the model names pulled and curated, then the
    other diffusers folders and .safetensors checkpoints in workspace/models."""
    return [*BUILTIN_MODELS, *mv.choices(studio.workspace, "base model")]


def model_options(studio: Studio) -> list[tuple[str, str]]:
    """model_choices as the base-model dropdowns show them (ui.models_view.labelled)."""
    return mv.labelled(studio.workspace, model_choices(studio))


def model_info(studio: Studio) -> str:
    """The base-model fields' help: what they take, and where a checkpoint goes to be listed."""
    return (f"'builtin' (tiny, CPU), a model name (org/name, civitai:ID: pulled when picked), or a checkpoint: "
            f"put .safetensors files or diffusers folders in {studio.workspace.models_dir} to list them here")


class SpeedMeter:
    """The training speed a hint quotes: the newest matching run's, else a short measurement
    of the config (studio.jobs.speed.measure_speed), made once per model, network and dataset."""

    def __init__(self, studio: Studio):
        self.workspace = studio.workspace
        self._measured: dict[str, object] = {}
        self._running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(config: TrainConfig) -> str:
        """What a step's time depends on besides its pixels (scaled by studio.jobs.speed.estimate)."""
        return json.dumps([config.base_model, config.network.model_dump(mode="json"),
                           bool(config.dataset.class_prompt and config.dataset.num_class_images),
                           config.training.num_threads, config.training.optimizer,
                           config.dataset.shuffle_tags], sort_keys=True)  # shuffled captions: encoded every step

    def speed(self, config: TrainConfig, *, wait: float = 0, start: bool = True):
        """The known speed; the built-in model's is measured first (waiting up to `wait` s for
        it), None while that goes on or (`start` False) until a call that starts it."""
        known = speed_from_runs(self.workspace, config)
        if known is not None or config.base_model != BUILTIN:
            return known
        key = self._key(config)
        with self._lock:
            if key in self._measured:
                return self._measured[key]
            thread = self._running.get(key)
            if thread is None and not start:
                return None
            if thread is None:
                thread = threading.Thread(target=self._measure, args=(key, config.model_copy(deep=True)),
                                          name="measure-speed", daemon=True)
                self._running[key] = thread
                thread.start()
        thread.join(wait)
        with self._lock:
            return self._measured.get(key)

    def _measure(self, key: str, config: TrainConfig) -> None:
        speed = None
        try:
            heavy_imports()  # under the lock the warm-up takes: two threads must not import diffusers at once
            speed = measure_speed(config, self.workspace)
        except StudioError as error:  # Check settings explains it; the next change tries again
            log.info("speed not measured: %s", error)
        except Exception:
            log.exception("measuring the training speed failed")
        with self._lock:
            if speed is not None:
                self._measured[key] = speed
            del self._running[key]


def build(studio: Studio) -> SimpleNamespace:
    ws = studio.workspace
    meter = SpeedMeter(studio)
    config = preset_config(DEFAULT_PRESET if DEFAULT_PRESET in preset_names() else None)
    datasets = list_datasets(ws)
    all_main = {spec.path: spec for spec in tv.config_fields() if spec.path in MAIN_ORDER}
    main_specs = [all_main[path] for path in MAIN_ORDER]
    advanced_specs = tv.config_fields(exclude=tv.MAIN_FIELDS)

    def component(spec: tv.FieldSpec, value, *, label: str | None = None, **extra):
        label = label or spec.label
        elem_id = "train-" + spec.key.replace(".", "-").replace("_", "-")
        common = {"label": label, "info": spec.info, "elem_id": elem_id, **extra}
        if spec.kind == "bool":
            return gr.Checkbox(value=bool(value), **common)
        if spec.kind == "choice":
            return gr.Dropdown(list(spec.choices), value=value, **common)
        # An optional number is a text box (empty = the default): Gradio's Number sends an empty
        # box as 0 once it is shown (its accordion opened), which the config refuses (a block
        # rank) or takes for a setting (adalora_tinit = 0 instead of 10% of the steps).
        if spec.kind in ("int", "float") and not spec.optional:
            return unchecked(gr.Number(value=value, precision=0 if spec.kind == "int" else None,
                                       minimum=spec.minimum, maximum=spec.maximum, step=_number_step(spec),
                                       **common))
        if spec.kind == "lines":
            return gr.Textbox(value=value, lines=3, **common)
        return gr.Textbox(value=value, **common)

    main_values = dict(zip(MAIN_ORDER, tv.config_to_form(main_specs, config)))
    with gr.Tab("2 · Train", id="train") as tab:
        gr.Markdown("Choose what to learn from and how long. The defaults teach the built-in toy model the "
                    "demo dataset's purple star on a CPU; the box on the right says how long that takes on "
                    "this machine. *Check settings*, then **Start training**.",
                    elem_classes="tab-intro")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Row():
                    # custom values: a dataset made after the page was built (or named by an API client)
                    # is checked by the handlers, with a clear message when it is not there
                    dataset = gr.Dropdown(datasets, value=dropdown_value(datasets, "demo"), label="Dataset",
                                          allow_custom_value=True, info="From the Datasets tab", scale=2,
                                          elem_id="train-dataset")
                    preset = gr.Dropdown(preset_names(), value=DEFAULT_PRESET if DEFAULT_PRESET in preset_names()
                                         else None, label="Preset", scale=2,
                                         info="Fills every setting from presets/*.toml (dataset kept)",
                                         elem_id="train-preset")
                base_model = gr.Dropdown(model_options(studio), value=main_values[("base_model",)],
                                         allow_custom_value=True, label="Base model", info=model_info(studio),
                                         elem_id="train-base-model")
                main = {}

                def main_input(path, label: str | None = None, **extra):
                    main[path] = component(all_main[path], main_values[path], label=label or _MAIN_LABELS[path],
                                           **({"info": _MAIN_INFO[path]} if path in _MAIN_INFO else {}), **extra)

                with gr.Group():
                    with gr.Row():
                        for path in [("name",), ("training", "max_steps"), ("training", "learning_rate"),
                                     ("training", "batch_size")]:
                            main_input(path)
                    with gr.Row():
                        for path in [("network", "rank"), ("network", "alpha"), ("dataset", "resolution"),
                                     ("dataset", "trigger_word")]:
                            main_input(path)
                    main_input(("sampling", "prompts"), "Sample prompts (one per line)")
                with gr.Group(elem_id="train-prior"):
                    prior_on = gr.Checkbox(prior_preservation(config), elem_id="train-prior-on",
                                           label="Prior preservation: train with class pictures too (DreamBooth)")
                    with gr.Row(equal_height=True):
                        main_input(("dataset", "class_prompt"), scale=3)
                        main_input(("dataset", "num_class_images"), scale=2)
                    class_note = gr.Markdown(elem_id="train-class-note", elem_classes="group-title")
                auto = gr.State(tv.automatic_values(config))
                main[("base_model",)] = base_model
                advanced = []
                method_boxes = []  # (an option of the box, the box) for the options of some methods only
                with gr.Accordion("All settings", open=False, elem_id="train-all-settings"):
                    gr.Markdown("Every setting of the training config, with its meaning. Hover or read the "
                                "small text under each one.")
                    adv_values = tv.config_to_form(advanced_specs, config)
                    sections: dict[str, list[tuple[tv.FieldSpec, object]]] = {}
                    for spec, value in zip(advanced_specs, adv_values):
                        sections.setdefault(spec.section, []).append((spec, value))
                    for section, fields in sections.items():
                        with gr.Accordion(tv.SECTION_TITLES.get(section, fmt.humanize(section)), open=False):
                            # the options of one set of methods in a box, shown with them
                            for methods, group in itertools.groupby(fields, key=lambda field: field[0].methods):
                                group = list(group)
                                with gr.Column(visible=_visible(group[0][0], config.network.type),
                                               elem_id=f"train-options-{'-'.join(methods)}" if methods else None
                                               ) as box:
                                    for start in range(0, len(group), 3):
                                        with gr.Row():
                                            for spec, value in group[start:start + 3]:
                                                advanced.append(component(spec, value))
                                if methods:
                                    method_boxes.append((group[0][0], box))
                with gr.Accordion("Config as TOML — for `lora-studio train`", open=False):
                    toml_view = gr.Code(dump_config(config), language=None, label="config.toml",
                                        interactive=False, elem_id="train-toml")
            with gr.Column(scale=2, min_width=300):
                hint = gr.Markdown(elem_id="train-hint", elem_classes="hint-box")
                check_btn = gr.Button("Check settings", elem_id="train-check")
                launch_btn = gr.Button("▶ Start training", variant="primary", size="lg", elem_id="train-launch")
                launch_note = gr.Markdown(elem_id="train-note")
                with gr.Accordion("Instant adapter — no training", open=False, elem_id="train-instant"):
                    gr.Markdown("An adapter in about a second, made by the base model's hypernetwork from the "
                                "dataset's pictures or from a description (the built-in model has one). It goes "
                                "to the library as *adapter name*-instant, for the trigger word above; a run "
                                "started from it (All settings › Network › Init from) sharpens it in a few steps.")
                    instant_text = gr.Textbox(label="Description", placeholder="a purple star",
                                              info="Empty: from the dataset's pictures", elem_id="train-instant-text")
                    instant_btn = gr.Button("Make instant adapter", elem_id="train-instant-make")
                    instant_note = gr.Markdown(elem_id="train-instant-note")

    main_components = [main[path] for path in MAIN_ORDER]
    form_specs = main_specs + advanced_specs
    form_components = main_components + advanced
    # problems are reported under the labels the page shows, not the config's keys
    labels = {("dataset", "name"): "Dataset", ("dataset", "path"): "Dataset", ("base_model",): "Base model", **{path: label for path, label in _MAIN_LABELS.items()},
              **{(spec.section,): tv.SECTION_TITLES.get(spec.section, spec.section) for spec in advanced_specs},
              **{spec.path: f"{tv.SECTION_TITLES.get(spec.section, spec.section)} › {spec.label}"
                 for spec in advanced_specs}}

    def form_data(dataset_name: str | None, prior: bool, values) -> dict:
        data = tv.form_to_config_dict(form_specs, values)
        data.setdefault("dataset", {})["name"] = dataset_name or None
        data["dataset"].pop("path", None)
        if not prior:  # the class prompt and count stay in their fields, unused
            data["dataset"]["num_class_images"] = 0
        return data

    def build_config(dataset_name: str | None, prior: bool, values) -> TrainConfig:
        if not dataset_name:
            raise StudioError("Pick a dataset (make one in the Datasets tab first).")
        return parse_config(form_data(dataset_name, prior, values), "Settings", labels)

    def checked(config: TrainConfig) -> TrainingCheck:
        """The training check of `config`; each problem and warning is shown as one line, all
        of them at once (friendly's title: a problem leaves the page as it was)."""
        check = check_training(config, ws)
        for problem in check.problems:
            where = labels.get(tuple(problem.field.split(".")), problem.field)
            gr.Warning(f"{where}: {problem.message}", title=PROBLEM_TITLE, duration=None)
        for warning in check.warnings:
            gr.Warning(warning, title="Worth a look", duration=20)
        return check

    def form_values(loaded: TrainConfig) -> list:
        """The form's values for `loaded`; the options of other methods keep what they hold."""
        return [value if tv.shown(spec, loaded.network.type) else gr.skip()
                for spec, value in zip(form_specs, tv.config_to_form(form_specs, loaded))]

    @friendly
    def on_preset(name):
        """Every setting from the preset (then the chosen dataset's trigger word and prompts:
        on_dataset); what the page fills in from here on is the preset's."""
        loaded = preset_config(name)
        return [*form_values(loaded), prior_preservation(loaded), tv.automatic_values(loaded)]

    # the options of the chosen network.type show, the other methods' hide (keeping their values)
    network_type = next(c for spec, c in zip(advanced_specs, advanced) if spec.path == ("network", "type"))

    def on_network_type(chosen):
        return [gr.update(visible=_visible(spec, chosen)) for spec, _ in method_boxes]

    def hint_for(dataset_name, prior, values, *, measure: bool = True) -> tuple[str, str]:
        """The Train tab's hint and its line on class pictures; `measure` False quotes only a
        speed already known."""
        try:
            config = parse_config(form_data(dataset_name, prior, values), "Settings", labels)
        except StudioError as error:
            return f"**Cannot estimate yet:** {error}", ""
        builtin = config.base_model in ("", BUILTIN)
        family = None
        if not builtin:
            try:
                family = resolve_model(config.base_model, workspace=ws).family
            except StudioError as error:
                return f"**Cannot estimate yet:** {error}", ""
        steps_per_epoch = None
        if dataset_name and ws.dataset_dir(dataset_name).is_dir():
            try:
                steps_per_epoch = dataset_stats(ws.dataset_dir(dataset_name)).steps_per_epoch or None
            except StudioError:
                pass
        if config.training.max_epochs and steps_per_epoch:  # time and hint for the steps the run will train
            try:
                config.training.max_steps = planned_steps(config.training, steps_per_epoch)
            except StudioError as error:
                return f"**Cannot estimate yet:** {error}", ""
        speed = meter.speed(config, wait=MEASURE_WAIT_S if measure else 0, start=measure) if dataset_name else None
        try:
            class_plan = class_image_plan(config, ws)
        except StudioError:  # the dataset cannot be read: the hint's check says why
            class_plan = None
        plan = estimate(config, speed, missing_class_images=class_plan.missing if class_plan else 0) if speed else None
        t = config.training
        hint = tv.resource_hint(
            family=family, builtin=builtin, steps=t.max_steps, batch_size=t.batch_size,
            resolution=config.dataset.resolution, grad_accum=t.gradient_accumulation_steps,
            gradient_checkpointing=t.gradient_checkpointing, mixed_precision=t.mixed_precision,
            speed=speed, plan=plan, steps_per_epoch=steps_per_epoch, sample_prompts=len(config.sampling.prompts),
            processes=t.num_processes, gpu=cuda_available())
        model = {value: label for label, value in model_options(studio)}.get(config.base_model, config.base_model)
        note = tv.class_pictures_note(class_plan, on=bool(prior), class_prompt=config.dataset.class_prompt,
                                      model=model or BUILTIN, seconds=plan.class_images_s if plan else None,
                                      root=ws.root)
        return hint, note

    def on_change(dataset_name, prior, *values):
        """The hint for the form as it is; a note under Start from an earlier check or launch
        no longer holds."""
        return hint_for(dataset_name, prior, values)[0], ""

    def on_class_change(dataset_name, prior, *values):
        """The class-pictures line at once: the hint may first wait for a speed measurement."""
        return hint_for(dataset_name, prior, values, measure=False)[1]

    # A page that has just loaded shows the values it was built with: the first hint sends no
    # inputs, since gathering ~100 of them made Gradio's frontend search its whole layout tree
    # once per input (about 0.1 s of the first page's 1.4 s).
    def on_first_load():
        return hint_for(page_values[0], page_values[1], page_values[2:], measure=False)

    def on_page_loaded():
        """Waits until the first page has settled; the hint after it (`on_change`, on the
        settings the page has by then) measures the speed."""
        time.sleep(MEASURE_DELAY_S)

    @friendly
    def on_check(dataset_name, prior, *values):
        config = build_config(dataset_name, prior, values)
        check = checked(config)
        if check.problems:
            return gr.skip()
        gr.Info(f"Settings are valid: {planned_steps(config.training, check.images_per_epoch)} steps on "
                f"{check.images_per_epoch} images per epoch.")
        return dump_config(config), "Settings are valid." + warnings_note(check)

    def on_launch(dataset_name, prior, *values):
        """Queue a run; returns (config TOML, note, job id), or None (its problems shown) when
        it cannot train. Raises StudioError for a form it cannot read, or an adapter a queued
        or running run already writes (studio.jobs.enqueue). The note is empty: the toast and
        the Runs tab say where the run is, and a line here would outlive it."""
        config = build_config(dataset_name, prior, values)
        check = checked(config)
        if check.problems:
            return None
        if (ws.adapters_dir / f"{config.name}.safetensors").exists():
            gr.Warning(f"An adapter named {config.name!r} is in the library; this run replaces it when it "
                       "finishes. Change the adapter name to keep both.")
        ahead = sum(j.state in ACTIVE for j in list_jobs(ws))
        job = enqueue(ws, config)
        gr.Info(f"Queued {job.id}" + (f" ({ahead} run(s) ahead of it)." if ahead else "."))
        return dump_config(config), "", job.id

    @friendly
    def on_dataset(dataset_name, preset_name, current_name, trigger, prompts, class_prompt, auto):
        """The chosen dataset's trigger word (read from its captions), sample prompts (its own
        captions) and name fill the fields that still hold what the page put there (the
        preset's, the previous dataset's); what a person typed stays. Prior preservation with
        the preset's class prompt is on only for a dataset with class pictures of its own
        (the demo's): that prompt describes the demo, not another dataset."""
        folder = ws.dataset_dir(dataset_name) if dataset_name else None
        if folder is None or not folder.is_dir():
            return [gr.skip()] * 5
        follow = tv.follow_dataset(folder, auto, trigger=trigger, prompts=prompts, class_prompt=class_prompt)
        automatic_names = {"", preset_config(preset_name).name if preset_name else "", *list_datasets(ws)}
        name = dataset_name if (current_name or "") in automatic_names else gr.skip()
        trigger_out = gr.skip() if follow.trigger is None else gr.update(value=follow.trigger, info=follow.trigger_info)
        prompts_out = gr.skip() if follow.prompts is None else follow.prompts
        prior_out = gr.skip() if follow.prior is None else follow.prior
        return [name, trigger_out, prompts_out, prior_out, follow.auto]

    @friendly
    def restore_form():
        """A page opened (or reloaded) while a run is queued or training shows that run's
        settings, the newest's: the form as it was when Start was pressed."""
        active = [job for job in list_jobs(ws) if job.state in ACTIVE]
        try:
            loaded = run_config(ws.run_dir(active[0].id)) if active else None
        except StudioError:
            loaded = None
        if loaded is None:
            return [gr.skip()] * (3 + len(form_components))
        names = list_datasets(ws)
        chosen = (gr.update(choices=names, value=loaded.dataset.name) if loaded.dataset.name in names
                  else gr.skip())
        values = form_values(loaded)
        at = form_components.index(base_model)
        values[at] = refresh_choices(None, loaded.base_model)[1]  # a model put in models/ since the page was built
        return [chosen, prior_preservation(loaded), tv.automatic_values(loaded), *values]

    @friendly
    def on_instant(dataset_name, model, description, name, trigger):
        path = tv.instant_adapter(ws, dataset_name, model or BUILTIN, description, name, trigger)
        gr.Info(f"{path.stem} is in the library.")
        return f"Made **{path.stem}** ({path}): use it in Generate, or start a run from it."

    instant_btn.click(on_instant, [dataset, base_model, instant_text, main[("name",)],
                                   main[("dataset", "trigger_word")]], instant_note)

    hint_inputs = [dataset, prior_on, *form_components]
    page_values = [c.value for c in hint_inputs]
    watched = [dataset, base_model, prior_on, *(main[p] for p in MAIN_ORDER if p != ("name",))]
    watched += [c for spec, c in zip(advanced_specs, advanced)
                if spec.key in ("training.gradient_accumulation_steps", "training.gradient_checkpointing",
                                "training.mixed_precision", "sampling.every_n_steps", "sampling.steps")]
    hint_outputs = [hint, launch_note]
    for comp in watched:
        # the class-pictures line answers outside the queue, where it would wait behind hints that
        # wait for a speed measurement; once a hint is there, it quotes the time it measured
        comp.change(on_class_change, hint_inputs, class_note, show_progress="hidden", queue=False)
        comp.change(on_change, hint_inputs, hint_outputs, show_progress="minimal", trigger_mode="always_last").then(
            on_class_change, hint_inputs, class_note, show_progress="hidden", queue=False)
    follow_inputs = [dataset, preset, main[("name",)], main[("dataset", "trigger_word")],
                     main[("sampling", "prompts")], main[("dataset", "class_prompt")], auto]
    follow_outputs = [main[("name",)], main[("dataset", "trigger_word")], main[("sampling", "prompts")], prior_on,
                      auto]
    preset.input(on_preset, preset, [*form_components, prior_on, auto]).then(
        on_dataset, follow_inputs, follow_outputs, show_progress="hidden")

    @friendly
    def on_model_picked(value, progress=gr.Progress()):
        note = mv.pull_for_field(ws, value, "base model", progress)
        return gr.skip() if note is None else gr.update(info=note)

    base_model.input(on_model_picked, base_model, base_model).then(on_change, hint_inputs, hint_outputs,
                                                                    show_progress="hidden")
    network_type.change(on_network_type, network_type, [box for _, box in method_boxes], show_progress="hidden")
    dataset.input(on_dataset, follow_inputs, follow_outputs, show_progress="hidden")
    check_btn.click(on_check, hint_inputs, [toml_view, launch_note], api_name="check_settings")

    def refresh_choices(current_dataset, current_model):
        names = list_datasets(ws)
        models = model_options(studio)
        if current_model and current_model not in [value for _, value in models]:
            models.append((current_model, current_model))
        return (gr.update(choices=names, value=dropdown_value(names, current_dataset)),
                gr.update(choices=models, value=current_model or BUILTIN))

    return SimpleNamespace(tab=tab, dataset=dataset, base_model=base_model, launch_btn=launch_btn,
                           launch=on_launch, hint_inputs=hint_inputs, outputs=[toml_view, launch_note],
                           on_change=on_change, on_first_load=on_first_load, on_page_loaded=on_page_loaded,
                           hint=hint, class_note=class_note, hint_outputs=hint_outputs,
                           refresh_choices=refresh_choices,
                           restore=restore_form, restore_outputs=[dataset, prior_on, auto, *form_components])
