"""Generate tab: a base model, a prompt and up to four weighted adapters -> images saved in
workspace/outputs with A1111 `parameters` text."""
from __future__ import annotations

import datetime
import math
import random
from types import SimpleNamespace

import gradio as gr

from studio.errors import StudioError
from studio.generate import SCHEDULER_LABELS, SCHEDULERS, GenerateRequest, parse_prompt_loras
from ui import helpers as h
from ui.common import Studio, friendly, heavy_imports

ADAPTER_ROWS = 4
NONE = ""


def build(studio: Studio, model_choices) -> SimpleNamespace:
    ws = studio.workspace
    with gr.Tab("4 · Generate", id="generate") as tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, value="a sks star on a white background",
                                    info="Adapters below, or A1111 tags in the text: <lora:name:0.8>",
                                    elem_id="gen-prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
                rows = []
                with gr.Group(elem_id="gen-adapters"):
                    gr.Markdown("**Adapters** — pick from the library; weight 1 = full strength, "
                                "negative weights push away.", elem_classes="group-title")
                    for i in range(ADAPTER_ROWS):
                        with gr.Row(equal_height=True):
                            # custom values: a name typed (or sent by an API client) is looked up in
                            # the library like a <lora:name> tag, with the same clear error when unknown
                            name = gr.Dropdown([NONE], value=NONE, label=f"Adapter {i + 1}", scale=3,
                                               allow_custom_value=True, elem_id=f"gen-adapter-{i + 1}")
                            weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", scale=2,
                                               elem_id=f"gen-weight-{i + 1}")
                        rows.append((name, weight))
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        model = gr.Dropdown(model_choices(), value="builtin", allow_custom_value=True,
                                            label="Base model", info="'builtin' or a model path",
                                            elem_id="gen-model")
                        scheduler = gr.Dropdown([(SCHEDULER_LABELS[k], k) for k in SCHEDULERS], value="ddim",
                                                label="Sampler", elem_id="gen-scheduler")
                        size = gr.Dropdown(h.SIZE_CHOICES, value=h.SIZE_DEFAULT, allow_custom_value=True,
                                           label="Size (width × height)", elem_id="gen-size")
                    with gr.Row():
                        steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="gen-steps")
                        cfg = gr.Slider(0, 20, value=5.0, step=0.5, label="CFG scale",
                                        info="How strongly the prompt steers", elem_id="gen-cfg")
                    with gr.Row():
                        seed = gr.Number(-1, precision=0, label="Seed", info="-1 = random", elem_id="gen-seed")
                        count = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="gen-count")
            with gr.Column(scale=3):
                go = gr.Button("Generate", variant="primary", size="lg", elem_id="gen-go")
                results = gr.Gallery(label="Results", columns=2, height=420, object_fit="contain",
                                     interactive=False, elem_id="gen-results")
                info = gr.Markdown("Images are saved in `outputs/` in the workspace with their settings "
                                   "(A1111 `parameters`), so they can be read back by other tools.",
                                   elem_id="gen-info")

    @friendly
    def on_generate(prompt_text, negative_text, model_name, scheduler_name, size_text, step_count, guidance,
                    seed_value, image_count, *row_values):
        heavy_imports()
        from studio.generate import save_new_png
        from studio.library import find_adapter

        if not (prompt_text or "").strip():
            raise StudioError("Write a prompt first.")
        resolve = lambda name: find_adapter(ws, name)  # noqa: E731
        clean_prompt, tagged = parse_prompt_loras(prompt_text, resolve)
        pairs = [(row_values[2 * i], row_values[2 * i + 1]) for i in range(ADAPTER_ROWS)]
        uses = h.merge_uses(h.adapter_uses(pairs, resolve), tagged)
        width, height = h.parse_size(size_text)
        base_seed = _seed(seed_value)
        request = GenerateRequest(prompt=clean_prompt, model=model_name or "builtin",
                                  negative_prompt=negative_text or "", adapters=uses, seed=base_seed,
                                  steps=int(step_count), guidance_scale=float(guidance), width=width,
                                  height=height, scheduler=scheduler_name, batch_count=int(image_count))
        request.validate()
        images = studio.engine().generate(request)
        day = datetime.datetime.now()
        folder = studio.outputs_dir / day.strftime("%Y-%m-%d")
        gallery, saved = [], []
        for index, image in enumerate(images):
            seed_used = base_seed + index
            path = save_new_png(image, folder, f"{day.strftime('%H%M%S')}-{seed_used}")
            gallery.append((str(path), f"seed {seed_used}"))
            saved.append(path)
        params = images[0].info.get("parameters", "")
        where = saved[0].parent.relative_to(ws.root).as_posix()
        text = (f"Saved {len(saved)} image(s) in `{where}/` — "
                f"{', '.join(f'`{p.name}`' for p in saved)}\n\n```\n{params}\n```")
        return gallery, text

    flat_rows = [c for pair in rows for c in pair]
    # One stable API name (`/generate`) for scripts; Enter in the prompt runs the same handler.
    go.click(on_generate, [prompt, negative, model, scheduler, size, steps, cfg, seed, count, *flat_rows],
             [results, info], concurrency_id="generate", api_name="generate")
    prompt.submit(on_generate, [prompt, negative, model, scheduler, size, steps, cfg, seed, count, *flat_rows],
                  [results, info], concurrency_id="generate", api_visibility="private")

    def refresh_adapters(*current_names):
        """New choices for the adapter dropdowns, keeping what is picked while it exists."""
        names = [NONE, *studio.adapter_names()]
        return [gr.update(choices=names, value=value if value in names else NONE) for value in current_names]

    def put_adapter(name: str, *current_names):
        """Put `name` in the first empty row (or row 1) and refresh every row's choices."""
        names = [NONE, *studio.adapter_names()]
        values = [v if v in names else NONE for v in current_names]
        if name not in values:
            slot = values.index(NONE) if NONE in values else 0
            values[slot] = name
        return [gr.update(choices=names, value=v) for v in values]

    return SimpleNamespace(tab=tab, names=[r[0] for r in rows], weights=[r[1] for r in rows], model=model,
                           refresh_adapters=refresh_adapters, put_adapter=put_adapter, prompt=prompt)


def _seed(value) -> int:
    """The seed field: a whole number >= 0, or -1 (or empty) for a random one."""
    if value is None or value == "":
        return random.randrange(2**31)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StudioError(f"Seed {value!r} is not a number; give a whole number, or -1 for a random one.") from None
    if not math.isfinite(number) or number != int(number):
        raise StudioError(f"Seed {value!r} is not a whole number; give e.g. 1234, or -1 for a random one.")
    return random.randrange(2**31) if number < 0 else int(number)
