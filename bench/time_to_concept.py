"""Time to the demo concept: the tiny-demo-quick preset against tiny-demo (2400 steps of
one picture at lr 1e-3), each trained from the demo dataset in the same run on the same
machine with one torch thread, checkpoints and sample pictures included as the presets ask.
Per training seed: wall time, UNet passes, pictures through the UNet, and the concept's
figures (toyworld.fidelity.concept_figures); the headline is the ratio of the wall times.
Also the Train tab's estimate for tiny-demo-quick (studio.jobs.speed), to compare with its
measured time.

    python -m bench.time_to_concept [--train-seeds 42 7 1] [--eval-seeds 16] [--preset-seeds 42]
                                    [--candidate '{"training": {"max_steps": 300}}']

--candidate changes fields of tiny-demo-quick: how the search in bench/RESULTS.md reruns.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from studio import PRESETS_DIR

QUICK, PRESET = "tiny-demo-quick", "tiny-demo"


def recipe_config(preset: str, overrides: dict, seed: int):
    """A shipped preset with `overrides` ({section: {field: value}}), trained with one thread."""
    from studio.config import load_config

    config = load_config(PRESETS_DIR / f"{preset}.toml")
    config.seed = seed
    config.training.num_threads = 1
    for section, fields in overrides.items():
        for field, value in fields.items():
            setattr(getattr(config, section), field, value)
    return config


def unet_passes(config) -> dict:
    """UNet forward + backward passes, and the pictures they carry (instance and class
    pictures share one pass when prior preservation is on)."""
    t = config.training
    passes = t.max_steps * t.gradient_accumulation_steps
    with_class = bool(config.dataset.class_prompt and config.dataset.num_class_images)
    class_batch = (config.dataset.class_batch_size or t.batch_size) if with_class else 0
    return {"passes": passes, "pictures": passes * (t.batch_size + class_batch)}


def train_and_time(config, workspace) -> tuple:
    from studio.jobs.runs import create_run
    from trainers.run import train_run

    run_dir = create_run(config, workspace)
    started = time.perf_counter()
    adapter = train_run(run_dir, show_progress=False)
    return adapter, time.perf_counter() - started


def train_tab_estimate_s(config, workspace) -> float:
    """What the Train tab shows before a run: a few steps timed here, scaled to the config."""
    from studio.jobs.speed import estimate, measure_speed

    return estimate(config, measure_speed(config, workspace)).total_s


def main(argv=None) -> dict:
    from studio.generation.engine import Engine
    from studio.workspace import Workspace
    from toyworld.fidelity import concept_figures

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[42, 7, 1])
    parser.add_argument("--eval-seeds", type=int, default=16)
    parser.add_argument("--preset-seeds", type=int, nargs="*", default=None,
                        help="training seeds of the preset (default: --train-seeds); its time does not depend "
                             "on the seed, so one is enough for the ratio")
    parser.add_argument("--candidate", type=json.loads, default={},
                        help="JSON of config sections and fields to change in tiny-demo-quick (a row of the search "
                             "in bench/RESULTS.md), e.g. '{\"training\": {\"max_steps\": 300}}'")
    args = parser.parse_args(argv)
    recipes = {QUICK: args.candidate, PRESET: {}}
    torch.set_num_threads(1)
    eval_seeds = list(range(100, 100 + args.eval_seeds))
    engine = Engine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.open(tmp)
        estimate_s = train_tab_estimate_s(recipe_config(QUICK, args.candidate, args.train_seeds[0]), workspace)
        # Untimed: the first training in a process imports diffusers, peft and transformers
        # and loads the model; that second or two would otherwise count for whichever recipe
        # trains first.
        warm_up = recipe_config(QUICK, args.candidate, args.train_seeds[0])
        warm_up.name, warm_up.training.max_steps = "warm-up", 2
        train_and_time(warm_up, workspace)
        for seed in args.train_seeds:
            for name, overrides in recipes.items():
                if name == PRESET and args.preset_seeds is not None and seed not in args.preset_seeds:
                    continue
                config = recipe_config(name, overrides, seed)
                config.name = f"demo-{seed}-{config.training.max_steps}-steps"
                adapter, wall_s = train_and_time(config, workspace)
                figures = concept_figures(engine, adapter, eval_seeds)
                rows.append({"recipe": name, "seed": seed, "wall_s": wall_s, **unet_passes(config),
                             "purple": figures["concept"]["color"], "star": figures["concept"]["shape"],
                             "prior_base": figures["prior_base"], "prior_with_lora": figures["prior_with_lora"],
                             "prior_paired": figures["prior_paired"]})
                print(json.dumps(rows[-1]), flush=True)
    return report(rows, estimate_s, len(eval_seeds))


def report(rows: list[dict], estimate_s: float, eval_seeds: int) -> dict:
    fast, preset = QUICK, PRESET
    wall = {name: sum(r["wall_s"] for r in rows if r["recipe"] == name) / sum(r["recipe"] == name for r in rows)
            for name in (fast, preset)}
    ratio = wall[preset] / wall[fast]
    print(f"\n{eval_seeds} evaluation seeds x 3 trigger prompts per adapter; prior: 4 prompts without the trigger")
    print("| recipe | training seed | wall s | UNet passes | pictures | purple | star | "
          "prior with the adapter, % of base (colour / shape / background) | prior pictures read the same | "
          "prior outlines' template fit, % of the base's, mean / lowest |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kept = " / ".join(f"{100 * r['prior_with_lora'][a] / max(r['prior_base'][a], 1e-9):.0f}"
                          for a in ("color", "shape", "background"))
        paired = r["prior_paired"]
        print(f"| {r['recipe']} | {r['seed']} | {r['wall_s']:.1f} | {r['passes']} | {r['pictures']} | "
              f"{100 * r['purple']:.1f}% | {100 * r['star']:.1f}% | {kept} | {100 * paired['same']:.0f}% | "
              f"{100 * paired['outline']:.0f} / {100 * paired['lowest_outline']:.0f} |")
    print(f"\nwall time (mean over training seeds): {fast} {wall[fast]:.1f} s, {preset} {wall[preset]:.1f} s: "
          f"{ratio:.2f}x (target >= 4x)")
    print(f"Train tab estimate for {fast}: {estimate_s:.1f} s, measured {wall[fast]:.1f} s "
          f"({100 * (estimate_s / wall[fast] - 1):+.0f}%; target within 30%)")
    held = {}
    for name in (fast, preset):
        mine = [r for r in rows if r["recipe"] == name]
        kept = min(r["prior_with_lora"][a] / max(r["prior_base"][a], 1e-9) for r in mine
                   for a in ("color", "shape", "background"))
        held[name] = min(r["purple"] for r in mine) >= 0.9 and min(r["star"] for r in mine) >= 0.9 and kept >= 0.9
        print(f"{name}: lowest over training seeds: purple {100 * min(r['purple'] for r in mine):.1f}%, star "
              f"{100 * min(r['star'] for r in mine):.1f}%, prior kept {100 * kept:.0f}% of base: fidelity targets "
              f"{'held' if held[name] else 'not held'}")
    return {"rows": rows, "ratio": ratio, "estimate_s": estimate_s, "wall_s": wall, "held": held}

if __name__ == "__main__":
    main()
