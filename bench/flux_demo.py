"""Does presets/tiny-flux-demo.toml teach the demo concept on the built-in FLUX.1-architecture
model? Trained through the worker as `lora-studio train` does, once per training seed, and
measured from pixels as bench/fidelity.py measures the SD demo (toyworld.fidelity's prompts
and targets): trigger prompts -> purple stars; prompts without the trigger keep the base
model's accuracy (the ratio with / without the adapter).

    python -m bench.flux_demo [--training-seeds 42,43] [--seeds 8] [--steps N] [--model builtin-flux]

The pictures come from a FluxPipeline with the trained file attached by the studio
(studio.adapters.attach_adapter), FlowMatchEuler 20 steps and true classifier-free guidance
5 against the empty prompt at the T5 length the model was trained with, as the built-in
model's record evaluates it: the engine's generation path does not drive FluxPipeline yet.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GUIDANCE = 5.0
PRIOR_PROMPTS = [f"a {c} {s} on a {b} background" for c, s, b in (
    ("red", "circle", "white"), ("blue", "square", "black"), ("yellow", "triangle", "gray"), ("green", "circle", "blue"))]


def flux_generate_fn(pipe, guidance: float = GUIDANCE, steps: int = 20):
    """(prompts, seeds) -> images with true CFG against the empty prompt."""
    import torch

    def generate(prompts, seeds):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            return pipe(list(prompts), negative_prompt=[""] * len(prompts), true_cfg_scale=guidance, generator=gens,
                        num_inference_steps=steps, height=64, width=64,
                        max_sequence_length=pipe.tokenizer_2.model_max_length).images

    return generate


def concept_figures(pipe, seeds: list[int], base: dict) -> dict:
    from toyworld.evaluate import score_prompts
    from toyworld.fidelity import NEUTRAL, Target, match_rates

    generate = flux_generate_fn(pipe)
    triggered = [f"a sks shape on a {b} background" for b in NEUTRAL]
    images = [img for prompt in triggered for img in generate([prompt] * len(seeds), seeds)]
    kept = score_prompts(generate, PRIOR_PROMPTS, seeds)["accuracy"]
    return {"concept": match_rates(images, Target("purple", "star")), "prior_base": base, "prior_with_lora": kept,
            "prior_kept": {k: (kept[k] / base[k] if base[k] else None) for k in base}}


def main(argv=None) -> dict:
    from diffusers import FluxPipeline

    from studio.adapters import attach_adapter, load_adapter
    from studio.config import load_config
    from studio.jobs.runs import create_run
    from studio.models import resolve_model
    from studio.workspace import Workspace
    from studio import PRESETS_DIR
    from toyworld.evaluate import score_prompts
    from trainers.run import train_run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-seeds", default="42,43")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--model", default="builtin-flux")
    args = parser.parse_args(argv)
    seeds = list(range(100, 100 + args.seeds))
    started = time.time()
    folder = resolve_model(args.model).path
    load = lambda: FluxPipeline.from_pretrained(folder, local_files_only=True).to("cpu")  # noqa: E731
    base_pipe = load()
    base_pipe.set_progress_bar_config(disable=True)
    base = score_prompts(flux_generate_fn(base_pipe), PRIOR_PROMPTS, seeds)["accuracy"]
    figures = {"runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.open(tmp)
        for training_seed in [int(s) for s in args.training_seeds.split(",")]:
            config = load_config(PRESETS_DIR / "tiny-flux-demo.toml")
            config.name, config.seed, config.base_model = f"flux-demo-{training_seed}", training_seed, args.model
            config.checkpoints.every_n_steps = 0
            if args.steps:
                config.training.max_steps = args.steps
            t0 = time.time()
            adapter = train_run(create_run(config, workspace), show_progress=False)
            seconds = time.time() - t0
            pipe = load()
            pipe.set_progress_bar_config(disable=True)
            attach_adapter(pipe, load_adapter(adapter), "demo")
            figures["runs"][training_seed] = {**concept_figures(pipe, seeds, base), "train_seconds": round(seconds)}
    figures["settings"] = {"seeds": len(seeds), "steps": args.steps, "model": args.model, "guidance": GUIDANCE,
                           "seconds": round(time.time() - started)}
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
