"""LoRA vs T-LoRA trained from ONE image of a new concept on the built-in model: the purple
star (never seen by the base model) under the trigger "sks", same steps and learning rate.
Read from the pixels of generated images (toyworld.evaluate):

- concept match: images of trigger prompts that show a purple star;
- prompt following: images of trigger prompts asking for a background the training image
  did not show ("a sks shape on a green background") that have that background;
- both: a purple star on the asked background.

The base model (no adapter) is the reference row: it cannot draw the concept, and its
background following is what an adapter should keep.

    python -m bench.tlora_single_image [--steps 2400] [--lr 2e-3] [--rank 8] [--min-rank 4] [--seeds 8]

At 200-1200 steps at lr 1e-3 neither adapter draws the star from one image (0%), so the
defaults train long enough for LoRA to start overfitting (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from toyworld.world import DEMO_TRIGGER, SEEN_BACKGROUNDS, parse_caption

CONCEPT = {"color": "purple", "shape": "star"}


def one_image_dataset(folder: Path, image_name: str) -> Path:
    """A dataset of one demo image (a purple star) and its caption."""
    from studio.config import DEMO_DATASET

    image = DEMO_DATASET / image_name
    if not image.is_file():
        choices = ", ".join(sorted(p.name for p in DEMO_DATASET.glob("*.png")))
        raise SystemExit(f"--image {image_name!r} is not in {DEMO_DATASET}; choose one of {choices}.")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / image.name).write_bytes(image.read_bytes())
    (folder / image.with_suffix(".txt").name).write_text(image.with_suffix(".txt").read_text())
    return folder


def figures(records: list[dict], trained_background: str) -> dict:
    """Concept match over every image; background following and both over the prompts that
    ask for a background other than the training image's."""
    def share(rows, test) -> float:
        return sum(map(test, rows)) / len(rows)

    def concept(r) -> bool:
        return all(r["predicted"][k] == v for k, v in CONCEPT.items())

    new = [r for r in records if r["expected"]["background"] != trained_background]
    return {"concept": share(records, concept),
            "background": share(new, lambda r: r["predicted"]["background"] == r["expected"]["background"]),
            "both": share(new, lambda r: concept(r) and r["predicted"]["background"] == r["expected"]["background"]),
            "images": len(records)}


def main(argv=None) -> dict:
    import torch

    from toyworld.evaluate import score_prompts
    from toyworld.fidelity import train
    from studio.generation.engine import AdapterUse, Engine
    from studio.workspace import Workspace

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2400, help="training steps of each adapter")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of each adapter")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--min-rank", type=int, default=4, help="T-LoRA rank at the noisiest step")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    parser.add_argument("--image", default="sks_01.png", help="the demo-dataset image to train on")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    seeds = list(range(500, 500 + args.seeds))
    prompts = [f"a {DEMO_TRIGGER} shape on a {background} background" for background in SEEN_BACKGROUNDS]
    networks = {"LoRA": {"type": "lora"},
                "T-LoRA": {"type": "tlora", "tlora_min_rank": args.min_rank, "tlora_ortho": True}}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.open(tmp)
        dataset = one_image_dataset(Path(tmp) / "one-image", args.image)
        caption = (dataset / Path(args.image).with_suffix(".txt").name).read_text()
        trained_background = parse_caption(caption)["background"]
        engine = Engine()
        adapters: dict[str, list] = {"base model": []}
        for label, network in networks.items():
            path = train(workspace, name=label.lower(), dataset=dataset, steps=args.steps, model=args.model,
                         learning_rate=args.lr, rank=args.rank, alpha=float(args.rank), prior_preservation=False,
                         **network)
            adapters[label] = [AdapterUse(path)]
        for label, uses in adapters.items():
            scored = score_prompts(engine.set_mix(args.model, uses), prompts, seeds)
            results[label] = figures(scored["records"], trained_background)

    print(f"\nOne image ({args.image}, {trained_background} background), {args.steps} steps, lr {args.lr:g}, "
          f"rank {args.rank} (T-LoRA min rank {args.min_rank}), {len(prompts)} prompts x {len(seeds)} seeds, "
          f"{time.time() - started:.0f} s")
    header = ("adapter", "concept: purple star", "asked background (new ones)", "both")
    rows = [(label, f"{100 * r['concept']:.0f}%", f"{100 * r['background']:.0f}%", f"{100 * r['both']:.0f}%")
            for label, r in results.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print(json.dumps({"settings": vars(args), "results": results}))
    return results


if __name__ == "__main__":
    main()
