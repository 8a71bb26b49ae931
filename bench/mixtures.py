"""Mixtures of adapters on the built-in model, judged from pixels (toyworld.evaluate):

1. composition: the colour LoRA ("zwx" = purple) and the shape LoRA ("ohwx shape" = star)
   of bench.fidelity together, prompt "a zwx ohwx shape on a <white|black|gray>
   background": share of purple stars ("both") for the plain sum (weight 1 each), learned
   block gates (MoLE), learned block x timestep gates, prompt-conditioned gates and arrow
   routing.
2. interference: four concept adapters loaded at once (zwx = purple, ohwx = star, vrk =
   blue triangle, qjx = yellow square; the last two with the colour adapter's light
   recipe), prompts naming one trigger: share of pictures with that concept, and the
   accuracy of prompts without a trigger (prior), for the plain sum, arrow routing,
   prompt-conditioned gates, and that adapter alone.

Gates learn from the members' own pictures and captions (the mixture run's default).
`--workspace DIR` keeps the adapters and mixtures, and a rerun reuses what is there.

    python -m bench.mixtures [--seeds 8] [--steps N (adapters; default the recipes')]
                             [--gate-steps 300] [--gate-lr 0.01] [--workspace DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# trigger -> (what a prompt naming it should draw, the prompt's words before "on a <bg> background")
CONCEPTS = {
    "zwx": ({"color": "purple", "shape": "circle"}, "a zwx circle"),
    "ohwx": ({"shape": "star"}, "a red ohwx shape"),
    "vrk": ({"color": "blue", "shape": "triangle"}, "a vrk shape"),
    "qjx": ({"color": "yellow", "shape": "square"}, "a qjx shape"),
}
PRIOR_PROMPTS = [f"a {c} {s} on a {b} background" for c, s, b in (
    ("red", "circle", "white"), ("blue", "square", "black"), ("yellow", "triangle", "gray"), ("green", "circle", "blue"))]


def train_gates(workspace, name: str, members: list[str], gate: str, steps: int, lr: float):
    """A mixture of library adapters with gates trained on the members' own pictures (kept when there)."""
    if (workspace.adapters_dir / f"{name}.safetensors").is_file():
        return workspace.adapters_dir / f"{name}.safetensors"
    from studio import PRESETS_DIR
    from studio.config import load_config
    from studio.jobs.runs import create_run
    from trainers.run import train_run

    config = load_config(PRESETS_DIR / "tiny-demo.toml")
    config.name = name
    config.dataset.path = None
    config.dataset.trigger_word = ""
    config.dataset.num_class_images = 0
    config.training.max_steps = steps
    config.training.learning_rate = lr
    config.checkpoints.every_n_steps = 0
    config.sampling.every_n_steps = 0
    config.sampling.prompts = []
    config.mixture.members = members
    config.mixture.gate = gate
    return train_run(create_run(config, workspace), show_progress=False)


def main(argv=None) -> dict:
    from studio.generation.engine import AdapterUse, Engine
    from studio.workspace import Workspace
    from toyworld.fidelity import COLOR_ADAPTER, COLOR_STEPS, NEUTRAL, Target, match_rates, train, write_concept_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--gate-steps", type=int, default=300)
    parser.add_argument("--gate-lr", type=float, default=0.01)
    parser.add_argument("--workspace", default=None)
    args = parser.parse_args(argv)
    seeds = list(range(100, 100 + args.seeds))
    started = time.time()
    figures: dict = {"composition": {}, "interference": {}, "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.open(args.workspace or tmp)
        engine = Engine()
        root = workspace.root

        def adapter(name, **recipe):
            path = workspace.adapters_dir / f"{name}.safetensors"
            return path if path.is_file() else train(workspace, name=name, **recipe)

        light = dict(steps=args.steps or COLOR_STEPS, **COLOR_ADAPTER)
        lap = time.time()
        paths = {
            "zwx": adapter("zwx", dataset=write_concept_dataset(root / "color", "color"), **light),
            "ohwx": adapter("ohwx", steps=args.steps, dataset=write_concept_dataset(root / "shape", "shape")),
            "vrk": adapter("vrk", dataset=write_concept_dataset(root / "vrk", "object", trigger="vrk", color="blue",
                                                                shape="triangle"), **light),
            "qjx": adapter("qjx", dataset=write_concept_dataset(root / "qjx", "object", trigger="qjx", color="yellow",
                                                                shape="square"), **light),
        }
        figures["seconds"]["adapters"] = round(time.time() - lap)

        lap = time.time()
        pair = ["zwx", "ohwx"]
        mixtures = {
            "block gates": train_gates(workspace, "pair-block", pair, "block", args.gate_steps, args.gate_lr),
            "block x timestep gates": train_gates(workspace, "pair-band", pair, "block_timestep", args.gate_steps,
                                                  args.gate_lr),
            "prompt gates": train_gates(workspace, "pair-prompt", pair, "prompt", args.gate_steps, args.gate_lr),
        }
        all_prompt = train_gates(workspace, "all-prompt", list(CONCEPTS), "prompt", args.gate_steps, args.gate_lr)
        figures["seconds"]["gates"] = round(time.time() - lap)

        lap = time.time()
        prompts = [f"a zwx ohwx shape on a {b} background" for b in NEUTRAL]
        setups = {"plain sum": ([AdapterUse(paths[n]) for n in pair], False),
                  **{label: ([AdapterUse(path)], False) for label, path in mixtures.items()},
                  "arrow routing": ([AdapterUse(paths[n]) for n in pair], True)}
        for label, (uses, route) in setups.items():
            images = _generate(engine, prompts, seeds, uses, route)
            figures["composition"][label] = match_rates(images, Target("purple", "star"))["all"]

        everything = [AdapterUse(paths[n]) for n in CONCEPTS]
        setups = {"plain sum": (everything, False), "arrow routing": (everything, True),
                  "prompt gates": ([AdapterUse(all_prompt)], False)}
        for label, (uses, route) in {**setups, "adapter alone": (None, False)}.items():
            rates = {}
            for trigger, (want, words) in CONCEPTS.items():
                chosen = [AdapterUse(paths[trigger])] if uses is None else uses
                images = _generate(engine, [f"{words} on a {b} background" for b in NEUTRAL], seeds, chosen, route)
                rates[trigger] = match_rates(images, Target(**want))["all"]
            if uses is None:
                prior = sum(_prior(engine, [AdapterUse(paths[n])], False, seeds) for n in CONCEPTS) / len(CONCEPTS)
            else:
                prior = _prior(engine, uses, route, seeds)
            figures["interference"][label] = {"right concept": rates,
                                              "mean": sum(rates.values()) / len(rates), "prior": prior}
        figures["interference"]["base model"] = {"prior": _prior(engine, [], False, seeds)}
        figures["seconds"]["evaluation"] = round(time.time() - lap)
    figures["settings"] = {"seeds": len(seeds), "steps": args.steps, "gate_steps": args.gate_steps,
                           "gate_lr": args.gate_lr, "seconds": round(time.time() - started)}
    print(json.dumps(figures, indent=1))
    return figures


def _generate(engine, prompts, seeds, uses, route):
    from studio.generation.engine import GenerateRequest

    return [engine.generate(GenerateRequest(prompt=p, seed=s, adapters=list(uses), route=route))[0]
            for p in prompts for s in seeds]


def _prior(engine, uses, route, seeds) -> float:
    """Accuracy (colour, shape and background all right) of prompts without a trigger."""
    from toyworld.evaluate import score_prompts

    def fn(prompts, seeds):
        return [_generate(engine, [p], [s], uses, route)[0] for p, s in zip(prompts, seeds)]

    return score_prompts(fn, PRIOR_PROMPTS, seeds)["accuracy"]["all"]


if __name__ == "__main__":
    main()
