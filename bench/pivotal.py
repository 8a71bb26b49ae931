"""Pivotal tuning and Prodigy on the demo concept: a recipe (the tiny-demo preset: AdamW, lr
1e-3, 2400 steps of one picture; with `--base quick` the tiny-demo-quick preset; with `--base
candidate` the fast candidate bench/RESULTS.md's issue-23 figures were measured with: 250
steps of four pictures at lr 5e-3, the text encoder's LoRA too) against the
same recipe with a trained trigger embedding (2 vectors started from "shape", the class word;
embedding lr = the recipe's lr) and against Prodigy (lr 1.0: d estimated, the recipe's
schedule on it). Each trained from the demo dataset in one run on one torch thread, then
judged as bench.fidelity judges the demo (toyworld.fidelity.concept_figures): "a sks shape
on a white / black / gray background" must draw purple stars, and the four prompts without
the trigger must keep the base model's accuracy (the prior).

    python -m bench.pivotal [--base preset|quick|candidate] [--train-seeds 42 7] [--eval-seeds 8]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench.time_to_concept import recipe_config, train_and_time

# base -> (preset, what differs from it)
BASES = {
    "preset": ("tiny-demo", {}),
    "quick": ("tiny-demo-quick", {}),
    "candidate": ("tiny-demo", {
        "network": {"alpha": 32.0, "conv_alpha": 32.0, "train_text_encoder": True},
        "training": {"max_steps": 250, "batch_size": 4, "learning_rate": 5e-3},
        "dataset": {"prior_loss_weight": 0.5},
        "checkpoints": {"every_n_steps": 100},
        "sampling": {"every_n_steps": 100},
    }),
}
RECIPES = {
    "AdamW": {},
    "+ pivotal tuning": {"network": {"pivotal_vectors": 2, "pivotal_init": "shape"}},
    "Prodigy": {"training": {"learning_rate": 1.0, "optimizer": "prodigy"}},
}


def merged(base: dict, change: dict) -> dict:
    """The base recipe's sections with `change`'s fields set over them."""
    return {section: {**base.get(section, {}), **change.get(section, {})} for section in {*base, *change}}


def main(argv=None) -> list[dict]:
    from studio.generation.engine import Engine
    from studio.workspace import Workspace
    from toyworld.fidelity import concept_figures

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=list(BASES), default="preset")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--eval-seeds", type=int, default=8)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    eval_seeds = list(range(100, 100 + args.eval_seeds))
    engine = Engine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.open(tmp)
        for seed in args.train_seeds:
            for name in args.recipes:
                preset, base = BASES[args.base]
                config = recipe_config(preset, merged(base, RECIPES[name]), seed)
                config.name = f"demo-{seed}-{len(rows)}"
                adapter, wall_s = train_and_time(config, workspace)
                figures = concept_figures(engine, adapter, eval_seeds)
                rows.append({"recipe": f"{args.base}, {name}", "seed": seed, "wall_s": wall_s,
                             "purple": figures["concept"]["color"], "star": figures["concept"]["shape"],
                             "prior_base": figures["prior_base"], "prior_with_lora": figures["prior_with_lora"]})
                print(json.dumps(rows[-1]), flush=True)
    report(rows, len(eval_seeds))
    return rows


def report(rows: list[dict], eval_seeds: int) -> None:
    print(f"\n{eval_seeds} evaluation seeds x 3 trigger prompts per adapter; prior: 4 prompts without the trigger")
    print("| recipe | training seed | wall s | purple | star | prior with the adapter, % of base "
          "(colour / shape / background) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        kept = " / ".join(f"{100 * r['prior_with_lora'][a] / max(r['prior_base'][a], 1e-9):.0f}"
                          for a in ("color", "shape", "background"))
        print(f"| {r['recipe']} | {r['seed']} | {r['wall_s']:.1f} | {100 * r['purple']:.1f}% | "
              f"{100 * r['star']:.1f}% | {kept} |")


if __name__ == "__main__":
    main()
