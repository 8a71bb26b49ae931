"""Does training teach and keep? On the built-in model, measured from pixels:
concept (demo LoRA), prior kept, two LoRAs composed (LoRA vs T-LoRA from one image:
bench/tlora_single_image.py).

    python -m bench.fidelity [--seeds 8] [--steps N (default: the tiny-demo preset's; 800 for the colour adapter)] [--model builtin]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> dict:
    from toyworld.fidelity import (COLOR_ADAPTER, COLOR_STEPS, composition_figures, concept_figures, train,
                                 write_concept_dataset)
    from studio.generate import Engine
    from studio.workspace import Workspace

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--model", default="builtin")
    args = parser.parse_args(argv)
    seeds = list(range(100, 100 + args.seeds))
    started = time.time()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.open(tmp)
        engine = Engine()
        demo = train(workspace, name="demo", steps=args.steps, model=args.model)
        figures["concept"] = concept_figures(engine, demo, seeds, args.model)
        color = train(workspace, name="color", steps=args.steps or COLOR_STEPS, model=args.model,
                      dataset=write_concept_dataset(workspace.root / "color", "color"), **COLOR_ADAPTER)
        shape = train(workspace, name="shape", steps=args.steps, model=args.model,
                      dataset=write_concept_dataset(workspace.root / "shape", "shape"))
        figures["composition"] = composition_figures(engine, color, shape, seeds, args.model)
    figures["settings"] = {"seeds": len(seeds), "steps": args.steps, "model": args.model,
                           "seconds": round(time.time() - started)}
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
