"""T-LoRA's claim (arXiv 2507.05964) in kind, on the built-in model: trained on ONE picture
of a new concept (the purple star, which the base model never saw, under the trigger
"sks"), plain LoRA's prompt following falls as training goes on (it memorises the
picture's background), T-LoRA's holds at similar concept fidelity.

Three adapters at matched settings that can learn the concept from one picture (the demo
preset's layers: attention and the ResNet convs, rank/alpha, learning rate, steps,
seed): LoRA (LoCon), T-LoRA (the rank mask on every layer, Ortho-LoRA init) and vanilla
T-LoRA (mask only). Each is trained once per (picture, training seed) and read at every
`--every` steps of that one run (its weights exported there), from generated pixels
(toyworld.evaluate):

- concept: images of the trigger prompts that show a purple star;
- asked background: images of prompts asking for a background the training picture did
  not show ("a sks shape on a green background") that have it (prompt following);
- both: a purple star on the asked background.

Mean and spread (sample standard deviation) are over the runs, i.e. pictures x training
seeds. The base model (no adapter) is the reference: no star, every background.

    python -m bench.tlora_single_image [--images sks_01.png sks_02.png] [--train-seeds 42 43]
        [--steps 1600] [--every 400] [--lr 1e-3] [--rank 16] [--min-rank 8] [--exponent 1]
        [--seeds 4] [--plot bench/tlora_single_image.png]
    python -m bench.tlora_single_image --tune sks_03.png   # T-LoRA's schedule on another picture

`--tune` trains T-LoRA over a small grid of (min rank, exponent) on a picture that is not
reported and prints the grid; the report's defaults are its pick (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from toyworld.world import DEMO_TRIGGER, SEEN_BACKGROUNDS, parse_caption

CONCEPT = {"color": "purple", "shape": "star"}
METRICS = ("concept", "background", "both")
METRIC_LABELS = {"concept": "concept: purple star", "background": "asked background (new ones)",
                 "both": "both"}


def one_image_dataset(folder: Path, image_name: str) -> Path:
    """A dataset of one demo image (a purple star) and its caption."""
    from studio.config import DEMO_DATASET

    image = DEMO_DATASET / image_name
    if not image.is_file():
        choices = ", ".join(sorted(p.name for p in DEMO_DATASET.glob("*.png")))
        raise SystemExit(f"{image_name!r} is not in {DEMO_DATASET}; choose one of {choices}.")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / image.name).write_bytes(image.read_bytes())
    (folder / image.with_suffix(".txt").name).write_text(image.with_suffix(".txt").read_text())
    return folder


def figures(records: list[dict], trained_background: str) -> dict:
    """Concept over every image; background following and both over the prompts that ask
    for a background other than the training image's."""
    def share(rows, test) -> float:
        return sum(map(test, rows)) / len(rows)

    def concept(r) -> bool:
        return all(r["predicted"][k] == v for k, v in CONCEPT.items())

    def asked(r) -> bool:
        return r["predicted"]["background"] == r["expected"]["background"]

    new = [r for r in records if r["expected"]["background"] != trained_background]
    return {"concept": share(records, concept), "background": share(new, asked),
            "both": share(new, lambda r: concept(r) and asked(r)), "images": len(records)}


def networks(args) -> dict[str, dict]:
    """The compared adapters: the same layers and rank; LoRA and vanilla T-LoRA (B = 0 at
    the start, as LoRA) at alpha = rank, so the two differ by the timestep mask alone;
    T-LoRA's alpha and schedule from args (tuned by --tune: its Ortho-LoRA init starts with
    both factors non-zero, so at LoRA's alpha its conv updates are far larger per step)."""
    common = {"rank": args.rank, "alpha": float(args.rank), "conv_rank": args.rank, "conv_alpha": float(args.rank)}
    schedule = {"type": "tlora", "tlora_conv": True, "tlora_min_rank": args.min_rank, "tlora_exponent": args.exponent}
    return {"LoRA": {**common, "type": "locon"},
            "T-LoRA": {**common, **schedule, "alpha": args.tlora_alpha, "tlora_ortho": True},
            "vanilla T-LoRA": {**common, **schedule, "tlora_ortho": False}}


def train_and_read(workspace, engine, dataset: Path, network: dict, *, seed: int, args, prompts, trained_background):
    """One run of `args.steps` steps; at every `args.every` steps its weights are exported
    and judged. Returns {step: figures}."""
    from studio.generation.engine import AdapterUse
    from studio.jobs.runs import create_run
    from toyworld.evaluate import score_prompts
    from toyworld.fidelity import demo_config
    from trainers.trainer import AdapterTrainer

    config = demo_config(name=f"{network['type']}-{seed}", dataset=dataset, steps=args.steps, model=args.model,
                         learning_rate=args.lr, prior_preservation=False, seed=seed, **network)
    config.training.lr_scheduler = "constant"  # every read point is the same run, not a shorter schedule
    config.training.num_threads = args.threads
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    read: dict[int, dict] = {}
    for step in range(args.steps):
        trainer.train_step(step)
        done = step + 1
        if done % args.every == 0 or done == args.steps:
            path = trainer.export(time.time())
            scored = score_prompts(engine.set_mix(args.model, [AdapterUse(path)]), prompts, args.sample_seeds)
            read[done] = figures(scored["records"], trained_background)
    return read


def summarise(runs: list[dict[int, dict]]) -> dict[int, dict]:
    """{step: {metric: (mean, sd)}} over the runs (sd 0 for one run)."""
    out = {}
    for step in runs[0]:
        values = {m: [run[step][m] for run in runs] for m in METRICS}
        out[step] = {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in values.items()}
    return out


def plot(summary: dict[str, dict[int, dict]], base: dict, path: Path, title: str) -> Path:
    """Concept and asked-background rates against training steps, one line per adapter with
    its spread as bars, drawn with Pillow (the bench needs no plotting library)."""
    from PIL import Image, ImageDraw

    colours = {"LoRA": (214, 39, 40), "T-LoRA": (31, 119, 180), "vanilla T-LoRA": (44, 160, 44)}
    panel_w, panel_h, margin = 420, 300, 50
    lines = title.split("; ")
    image = Image.new("RGB", (2 * panel_w + 20, panel_h + 110 + 14 * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    draw.multiline_text((margin, 8), "\n".join(lines), fill="black")
    steps = sorted(next(iter(summary.values())))
    for panel, metric in enumerate(("concept", "background")):
        left, top = panel * (panel_w + 20) + margin, 30 + 14 * len(lines)
        width, height = panel_w - margin - 10, panel_h - 40
        draw.rectangle((left, top, left + width, top + height), outline="black")
        draw.text((left, top + height + 22), METRIC_LABELS[metric], fill="black")
        for level in (0, 25, 50, 75, 100):
            y = top + height - height * level / 100
            draw.line((left - 4, y, left, y), fill="black")
            draw.text((left - 30, y - 6), f"{level}%", fill="black")

        def x_of(step):
            return left + width * step / steps[-1]

        for step in steps:
            draw.text((x_of(step) - 12, top + height + 6), str(step), fill="black")
        base_y = top + height - height * base[metric]
        draw.line((left, base_y, left + width, base_y), fill=(150, 150, 150))
        for label, by_step in summary.items():
            points = [(x_of(s), top + height - height * by_step[s][metric][0]) for s in steps]
            draw.line(points, fill=colours[label], width=2)
            for s, (x, y) in zip(steps, points):
                spread = height * by_step[s][metric][1]
                draw.line((x, y - spread, x, y + spread), fill=colours[label])
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colours[label])
    legend_x = margin
    for label, colour in [*colours.items(), ("base model", (150, 150, 150))]:
        legend_y = panel_h + 85 + 14 * len(lines)
        draw.line((legend_x, legend_y, legend_x + 20, legend_y), fill=colour, width=3)
        draw.text((legend_x + 25, legend_y - 6), label, fill="black")
        legend_x += 40 + 7 * len(label)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def table(summary: dict[str, dict[int, dict]], base: dict) -> list[str]:
    header = ["adapter", "steps", *(METRIC_LABELS[m] for m in METRICS)]
    rows = [["base model", "-", *(f"{100 * base[m]:.0f}%" for m in METRICS)]]
    for label, by_step in summary.items():
        for step, values in by_step.items():
            rows.append([label, str(step), *(f"{100 * values[m][0]:.0f}% ± {100 * values[m][1]:.0f}" for m in METRICS)])
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def report_combined(paths: list[Path], plot_path: Path) -> dict:
    """The table and plot of the runs in several --json files, as if run at once."""
    parts = [json.loads(path.read_text()) for path in paths]
    runs: dict[str, list[dict]] = {}
    for part in parts:
        for label, reads in part["runs"].items():
            runs.setdefault(label, []).extend({int(step): read for step, read in run.items()} for run in reads)
    base = {m: statistics.mean(part["base"][m] for part in parts) for m in METRICS}
    summary = {label: summarise(reads) for label, reads in runs.items()}
    first = parts[0]["settings"]
    images = [image for part in parts for image in part["settings"]["images"]]
    settings = (f"{', '.join(images)} x training seeds {first['train_seeds']}; rank {first['rank']} (attention + "
                f"convs), lr {first['lr']:g} constant, {first['steps']} steps; T-LoRA alpha {first['tlora_alpha']:g}, "
                f"min rank {first['min_rank']}, exponent {first['exponent']:g}; {first['seeds']} images per prompt")
    print(settings)
    print("\n".join(table(summary, base)))
    print(f"plot: {plot(summary, base, plot_path, 'LoRA vs T-LoRA from one picture: ' + settings)}")
    return {"base": base, "summary": summary}


def main(argv=None) -> dict:
    import torch

    from studio.generation.engine import Engine
    from studio.workspace import Workspace
    from toyworld.evaluate import score_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", default=["sks_01.png", "sks_02.png"], help="demo pictures reported")
    parser.add_argument("--train-seeds", nargs="+", type=int, default=[42, 43])
    parser.add_argument("--steps", type=int, default=1600, help="training steps of each run")
    parser.add_argument("--every", type=int, default=400, help="read every N steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--min-rank", type=int, default=8, help="T-LoRA rank at the noisiest step")
    parser.add_argument("--exponent", type=float, default=1.0, help="T-LoRA schedule exponent")
    parser.add_argument("--tlora-alpha", type=float, default=1.0, help="T-LoRA's (Ortho-LoRA) alpha")
    parser.add_argument("--seeds", type=int, default=4, help="generated images per prompt")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("tlora_single_image.png"))
    parser.add_argument("--tune", metavar="IMAGE", help="tune T-LoRA's alpha, min rank and exponent on this "
                                                        "picture instead (every combination of the --tune-* lists)")
    parser.add_argument("--tune-alphas", nargs="+", type=float, default=[16.0, 4.0, 1.0])
    parser.add_argument("--tune-min-ranks", nargs="+", type=int, default=[8])
    parser.add_argument("--tune-exponents", nargs="+", type=float, default=[1.0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="report the runs of several earlier --json files together (e.g. one per picture, "
                             "run side by side) instead of training")
    args = parser.parse_args(argv)
    if args.combine:
        return report_combined(args.combine, args.plot)
    torch.set_num_threads(args.threads)
    args.sample_seeds = list(range(500, 500 + args.seeds))
    started = time.time()
    prompts = [f"a {DEMO_TRIGGER} shape on a {background} background" for background in SEEN_BACKGROUNDS]
    engine = Engine()
    if args.tune:
        adapters = {f"T-LoRA alpha {a:g}, min rank {m}, exponent {e:g}":
                    {**networks(args)["T-LoRA"], "alpha": a, "tlora_min_rank": m, "tlora_exponent": e}
                    for a in args.tune_alphas for m in args.tune_min_ranks for e in args.tune_exponents}
        images = [args.tune]
    else:
        adapters, images = networks(args), args.images
    runs: dict[str, list[dict]] = {label: [] for label in adapters}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.open(Path(tmp) / "ws")
        bases = []
        for image in images:
            dataset = one_image_dataset(Path(tmp) / image.removesuffix(".png"), image)
            trained_background = parse_caption((dataset / Path(image).with_suffix(".txt").name).read_text())["background"]
            scored = score_prompts(engine.set_mix(args.model, []), prompts, args.sample_seeds)
            bases.append(figures(scored["records"], trained_background))
            for label, network in adapters.items():
                for seed in args.train_seeds:
                    read = train_and_read(workspace, engine, dataset, network, seed=seed, args=args, prompts=prompts,
                                          trained_background=trained_background)
                    runs[label].append(read)
                    print(f"[{time.time() - started:5.0f} s] {image} {label} seed {seed}: "
                          + ", ".join(f"{s}: {100 * r['concept']:.0f}/{100 * r['background']:.0f}%"
                                      for s, r in read.items()), flush=True)
    base = {m: statistics.mean(b[m] for b in bases) for m in METRICS}
    summary = {label: summarise(reads) for label, reads in runs.items()}
    settings = (f"{', '.join(images)} x training seeds {args.train_seeds}; rank {args.rank} (attention + convs), "
                f"lr {args.lr:g} constant, {args.steps} steps; T-LoRA alpha {args.tlora_alpha:g}, min rank "
                f"{args.min_rank}, exponent {args.exponent:g}; {len(prompts)} prompts x {args.seeds} seeds per read; "
                f"{time.time() - started:.0f} s")
    print("\n" + settings)
    print("\n".join(table(summary, base)))
    if not args.tune:
        print(f"plot: {plot(summary, base, args.plot, 'LoRA vs T-LoRA from one picture: ' + settings)}")
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "base": base, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
