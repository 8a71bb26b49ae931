"""Generate tab: a base model, a prompt and up to four weighted adapters (text-encoder
weight, LoRA Block Weights, T-LoRA timestep mask) -> images saved in workspace/outputs with
A1111 `parameters` text; suggestions from the library for the prompt, fused into a mixture
whose gates per block show as a heat map and can be overridden; an X/Y mix grid."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from studio.models.families import DEFAULT
from ui import generate_view as gv
from ui import models_view as mv
from ui.common import Studio, friendly, heavy_imports, unchecked

ADAPTER_ROWS = 4
#: The most columns the mix grid's single images are shown in (a wider grid wraps).
GRID_GALLERY_COLUMNS = 4
NONE = ""
# the built-in model's family; picking a base model offers its family's (gv.block_weight_choices)
BLOCK_WEIGHT_CHOICES, BLOCK_WEIGHT_HELP = gv.block_weight_choices(DEFAULT)


def build(studio: Studio, model_choices, model_info: str) -> SimpleNamespace:
    ws = studio.workspace
    with gr.Tab("4 · Generate", id="generate") as tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, value="a sks star on a white background",
                                    info="Adapters below, or A1111 tags in the text: <lora:name:0.8>; add "
                                         ":start=N:stop=M (steps) or :curve=1,0 to schedule one over the steps",
                                    elem_id="gen-prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
                rows, masks = [], []
                with gr.Group(elem_id="gen-adapters"):
                    gr.Markdown("**Adapters** — pick from the library; weight 1 = full strength, "
                                "negative weights push away.", elem_classes="group-title")
                    for i in range(ADAPTER_ROWS):
                        with gr.Row(equal_height=True):
                            # custom values: a name typed (or sent by an API client) is looked up in
                            # the library like a <lora:name> tag, with the same clear error when unknown
                            name = gr.Dropdown([NONE], value=NONE, label=f"Adapter {i + 1}", scale=3,
                                               allow_custom_value=True, elem_id=f"gen-adapter-{i + 1}")
                            weight = unchecked(gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", scale=2,
                                                         info="Strength on the UNet", elem_id=f"gen-weight-{i + 1}"))
                        with gr.Row(equal_height=True):
                            te_weight = gr.Textbox("", label="Text-encoder weight", scale=2,
                                                   placeholder="same as Weight", info="Empty = the same as Weight",
                                                   elem_id=f"gen-te-weight-{i + 1}")
                            blocks = gr.Dropdown(BLOCK_WEIGHT_CHOICES, value=NONE, label="Block weights", scale=3,
                                                 allow_custom_value=True, info=BLOCK_WEIGHT_HELP,
                                                 elem_id=f"gen-blocks-{i + 1}")
                            masked = gr.Checkbox(True, label="Timestep mask", scale=2, visible=False,
                                                 info="T-LoRA: off = all ranks at every step",
                                                 elem_id=f"gen-tlora-mask-{i + 1}")
                        rows.append((name, weight, te_weight, blocks, masked))
                        masks.append(masked)
                with gr.Row(equal_height=True):
                    suggest_btn = gr.Button("Suggest adapters for the prompt", size="sm", elem_id="gen-suggest")
                with gr.Group(visible=False, elem_id="gen-suggestions") as suggestions_box:
                    suggestions = gr.Dataframe(headers=gv.SUGGESTION_HEADERS, type="array", interactive=False,
                                               wrap=True, label="Suggested from the library (trigger words and "
                                                                "what each adapter was trained on)",
                                               elem_id="gen-suggestions-table")
                    accept_btn = gr.Button("Accept: put them in the adapter rows", variant="primary", size="sm",
                                           elem_id="gen-accept")
                    with gr.Row(equal_height=True):
                        fuse_name = gr.Textbox("", label="Mixture name", scale=3, placeholder="mix-<adapters>",
                                               info="Fuse the suggestions as one mixture with a gate per block",
                                               elem_id="gen-fuse-name")
                        fuse_btn = gr.Button("Fuse into a mixture", size="sm", scale=2, elem_id="gen-fuse")
                with gr.Accordion("Mixture gates — each member's weight per block", open=False,
                                  elem_id="gen-gates") as gates_box:
                    with gr.Row(equal_height=True):
                        mixture = gr.Dropdown([NONE], value=NONE, label="Mixture", allow_custom_value=True, scale=3,
                                              elem_id="gen-gates-mixture")
                        show_gates = gr.Button("Show gates", size="sm", scale=1, elem_id="gen-gates-show")
                    gate_map = gr.Image(label="Gates (white 0, blue 1, dark 2, red < 0)", type="pil",
                                        interactive=False, height=120, elem_id="gen-gates-map")
                    gate_table = gr.Dataframe(headers=gv.gate_headers(), type="array", interactive=True, wrap=False,
                                              label="Gates: edit and save to override", elem_id="gen-gates-table")
                    save_gates = gr.Button("Save gates", size="sm", elem_id="gen-gates-save")
                with gr.Accordion("Settings", open=True):
                    model = gr.Dropdown(model_choices(), value="builtin", allow_custom_value=True,
                                        label="Base model", elem_id="gen-model", info=model_info)
                    with gr.Row():
                        scheduler = gr.Dropdown(gv.sampler_choices(DEFAULT), value=DEFAULT.default_sampler,
                                                label="Sampler", info="The base model's family's samplers",
                                                elem_id="gen-scheduler")
                        size = gr.Dropdown(gv.SIZE_CHOICES, value=gv.SIZE_DEFAULT, allow_custom_value=True,
                                           label="Size (width × height)", elem_id="gen-size")
                    with gr.Row():
                        steps = unchecked(gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="gen-steps"))
                        cfg = unchecked(gr.Slider(0, 20, value=5.0, step=0.5, label="CFG scale",
                                                  info="How strongly the prompt steers", elem_id="gen-cfg"))
                    with gr.Row():
                        seed = unchecked(gr.Number(-1, precision=0, label="Seed", info="-1 = random",
                                                   elem_id="gen-seed"))
                        count = unchecked(gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="gen-count"))
            with gr.Column(scale=3):
                go = gr.Button("Generate", variant="primary", size="lg", elem_id="gen-go")
                # grows with its pictures (CSS in ui/app.py), so none is cut off at the bottom
                results = gr.Gallery(label="Results", columns=2, object_fit="contain",
                                     interactive=False, elem_id="gen-results")
                info = gr.Markdown("Images are saved in `outputs/` in the workspace with their settings "
                                   "(A1111 `parameters`), so they can be read back by other tools.",
                                   elem_id="gen-info")
        with gr.Accordion("Mix grid — the mix side by side over weights, seeds or prompts", open=False,
                          elem_id="gen-grid"):
            with gr.Row(equal_height=True):
                x_axis = gr.Dropdown(gv.grid_axis_choices(ADAPTER_ROWS), value="adapter0", label="X axis",
                                     info="What changes from column to column", elem_id="gen-grid-x")
                x_values = gr.Textbox("0, 0.5, 1", label="X values", elem_id="gen-grid-x-values",
                                      info="Weights or seeds: comma-separated; prompts: separated by |")
                y_axis = gr.Dropdown(gv.grid_axis_choices(ADAPTER_ROWS, optional=True), value=gv.GRID_NO_AXIS,
                                     label="Y axis", info="What changes from row to row; (none) = one row",
                                     elem_id="gen-grid-y")
                y_values = gr.Textbox("", label="Y values", elem_id="gen-grid-y-values",
                                      info="Same forms as X values")
            grid_btn = gr.Button("Make grid", variant="primary", elem_id="gen-grid-go")
            with gr.Row(equal_height=False):
                grid_sheet = gr.Image(label="Grid", type="filepath", interactive=False, buttons=["download"],
                                      elem_id="gen-grid-sheet")
                # grows with its pictures (CSS in ui/app.py): a 3 x 3 grid's ninth is not cut off;
                # laid out in the grid's columns, its captions under the pictures
                grid_cells = gr.Gallery(label="Single images", columns=GRID_GALLERY_COLUMNS, object_fit="contain",
                                        interactive=False, elem_id="gen-grid-cells", elem_classes="captions-below")
            grid_info = gr.Markdown("Uses the prompt, adapters and settings above (one image per cell); the grid "
                                    "and its single images are saved in `outputs/`.", elem_id="gen-grid-info")

    settings_inputs = [prompt, negative, model, scheduler, size, steps, cfg, seed, count]
    flat_rows = [component for row in rows for component in row]
    names = [row[0] for row in rows]
    weights = [row[1] for row in rows]

    def form(values) -> tuple[gv.GenerateSettings, list]:
        """(settings, adapter rows) from the values of settings_inputs + flat_rows."""
        settings = gv.GenerateSettings(*values[:len(settings_inputs)])
        row_values = values[len(settings_inputs):]
        width = len(gv.AdapterRow._fields)
        return settings, [row_values[i:i + width] for i in range(0, len(row_values), width)]

    @friendly
    def on_generate(*values):
        heavy_imports()
        return gv.generate_images(studio, *form(values))

    @friendly
    def on_grid(x_choice, x_text, y_choice, y_text, *values):
        heavy_imports()
        sheet, cells, columns, note = gv.mix_grid(studio, *form(values), x_choice, x_text, y_choice, y_text)
        return sheet, gr.update(value=cells, columns=min(columns, GRID_GALLERY_COLUMNS)), note

    @friendly
    def on_suggest(prompt_text, model_name):
        heavy_imports()
        found = gv.suggest_adapters(studio, prompt_text, model_name)
        if not found:
            gr.Info("No adapter in the library matches this prompt.")
        return gr.update(value=found), gr.update(visible=bool(found))

    @friendly
    def on_accept(suggested):
        choices = [NONE, *studio.adapter_names()]
        new_names, new_weights, left_out = gv.accept_suggestions(suggested, ADAPTER_ROWS)
        if left_out:
            gr.Warning(f"Only {ADAPTER_ROWS} adapter rows: {', '.join(left_out)} left out.")
        return ([gr.update(choices=choices, value=n) for n in new_names] + list(new_weights)
                + [gr.update(visible=False)])

    @friendly
    def on_fuse(suggested, name, *current):
        fused = gv.fuse_suggestions(studio, suggested, name)
        rows = put_adapter(fused, *current)
        headers, gates = gv.mixture_gates(studio, fused)
        return [*rows, gr.update(choices=[NONE, *gv.mixture_names(ws)], value=fused),
                gr.update(value=gates, headers=headers), gv.gate_heatmap(gates), gr.update(open=True)]

    @friendly
    def on_show_gates(name, prompt_text, model_name):
        heavy_imports()
        headers, gates = gv.mixture_gates(studio, name, prompt_text, model_name)
        return (gr.update(choices=[NONE, *gv.mixture_names(ws)], value=name), gr.update(value=gates, headers=headers),
                gv.gate_heatmap(gates))

    @friendly
    def on_save_gates(name, rows):
        gr.Info(gv.save_mixture_gates(studio, name, rows))
        return gv.gate_heatmap(rows)

    @friendly
    def on_adapter_picked(name):
        return gr.update(visible=gv.is_tlora_adapter(ws, name))

    @friendly
    def on_model_picked(value, progress=gr.Progress()):
        note = mv.pull_for_field(ws, value, "base model", progress)
        return gr.skip() if note is None else gr.update(info=note)

    # One stable API name per action for scripts (`/generate`, `/grid`, `/suggest`; ui.app.PUBLIC_API
    # keeps every other handler private); Enter in the prompt runs the same handler as Generate.
    # Everything that runs the engine queues as one.
    go.click(on_generate, [*settings_inputs, *flat_rows], [results, info], concurrency_id="generate",
             api_name="generate")
    prompt.submit(on_generate, [*settings_inputs, *flat_rows], [results, info], concurrency_id="generate")
    grid_btn.click(on_grid, [x_axis, x_values, y_axis, y_values, *settings_inputs, *flat_rows],
                   [grid_sheet, grid_cells, grid_info], concurrency_id="generate", api_name="grid")
    suggest_btn.click(on_suggest, [prompt, model], [suggestions, suggestions_box], concurrency_id="generate",
                      api_name="suggest")
    model.input(on_model_picked, model, model)

    def on_model_family(value, sampler, *block_values):
        """The sampler and block-weight choices of the picked model's family (a sampler the
        family has stays picked; block weights of another family's presets are cleared)."""
        family = gv.model_family(studio, value)
        if family is None:
            return [gr.skip()] * (1 + len(block_values))
        samplers = gv.sampler_choices(family)
        keep = sampler if any(name == sampler for _, name in samplers) else family.default_sampler
        choices, help_text = gv.block_weight_choices(family)
        return [gr.update(choices=samplers, value=keep),
                *(gr.update(choices=choices, info=help_text, value=v if v in choices or "," in v else NONE)
                  for v in block_values)]

    block_fields = [row[3] for row in rows]
    model.change(on_model_family, [model, scheduler, *block_fields], [scheduler, *block_fields],
                 show_progress="hidden")
    accept_btn.click(on_accept, suggestions, [*names, *weights, suggestions_box])
    fuse_btn.click(on_fuse, [suggestions, fuse_name, *names], [*names, mixture, gate_table, gate_map, gates_box],
                   concurrency_id="generate")
    show_gates.click(on_show_gates, [mixture, prompt, model], [mixture, gate_table, gate_map],
                     concurrency_id="generate")
    save_gates.click(on_save_gates, [mixture, gate_table], gate_map)
    for name, masked in zip(names, masks):
        name.change(on_adapter_picked, name, masked, show_progress="hidden")

    def refresh_adapters(*current_names):
        """New choices for the adapter dropdowns (keeping what is picked while it exists) and
        for the base model."""
        choices = [NONE, *studio.adapter_names()]
        return [*(gr.update(choices=choices, value=value if value in choices else NONE) for value in current_names),
                gr.update(choices=model_choices())]

    def put_adapter(name: str, *current_names):
        """Put `name` in the first empty row (or row 1) and refresh every row's choices."""
        choices = [NONE, *studio.adapter_names()]
        values = [v if v in choices else NONE for v in current_names]
        if name not in values:
            slot = values.index(NONE) if NONE in values else 0
            values[slot] = name
        return [gr.update(choices=choices, value=v) for v in values]

    def open_adapter(name: str, *current_names):
        """put_adapter, with the base model the adapter was trained on and a prompt that
        calls it (generate_view.adapter_context): Generate then draws what the run sampled."""
        context = gv.adapter_context(ws, name)
        models = model_choices()
        if context.model and context.model not in [value for _, value in models]:
            models.append((context.model, context.model))
        return [*put_adapter(name, *current_names),
                gr.update(choices=models, value=context.model) if context.model else gr.skip(),
                context.prompt if context.prompt else gr.skip()]

    return SimpleNamespace(tab=tab, names=names, weights=weights, model=model, refresh_adapters=refresh_adapters,
                           open_adapter=open_adapter, prompt=prompt)
