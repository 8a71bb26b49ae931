"""Every adapter variant on the demo concept with the same step budget: each network.type in
METHODS (new methods appear by themselves) and the LoRA options (DoRA, rsLoRA, LoRA+,
PiSSA, Sensitivity-LoRA rank allocation, LoRA-Squeeze), trained from the demo dataset on
the built-in model with the tiny-demo preset's settings but RECIPE's budget, for each
training seed. Per variant, mean over the seeds (min-max where it varies):

- purple / star: share of "a sks shape on a white/black/gray background" pictures that are
  purple / a star (toyworld.fidelity.concept_figures, read from pixels);
- prior kept: the lowest of colour / shape / background accuracy on prompts without the
  trigger, with the adapter, as % of the base model's;
- trainable parameters (at the end of training: after a squeeze, the squeezed ones), file
  size, training steps/s (the training loop alone, one torch thread), peak memory of the
  training process (RSS; CUDA: peak allocated) and the optimizer's state.

Each training runs in a process of its own, so its peak memory is its own.

    python -m bench.variants [--seeds 42 7] [--steps 100] [--eval-seeds 4] [--variants lora locon+dora ...]
    python -m bench.variants --quick      # a smoke run: 4 steps, one seed, one evaluation seed, 4 class pictures
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The training budget of every variant: time_to_concept's fast recipe (4 pictures and 4
# class pictures a step at lr 5e-3, half-weight prior loss) without the text encoder (T-LoRA
# adapts the UNet only), for --steps steps. Rank 16, alpha 16, as the preset.
RECIPE = {
    "training": {"batch_size": 4, "learning_rate": 5e-3},
    "dataset": {"prior_loss_weight": 0.5},
    "checkpoints": {"every_n_steps": 0},
    "sampling": {"every_n_steps": 0, "prompts": []},
}
# The LoRA options, each on the network the preset trains (LoCon; PiSSA on LoRA: peft has no
# PiSSA init for convs). squeeze_at_step is set to half the run (see `network`).
OPTIONS = {
    "locon+dora": {"type": "locon", "use_dora": True},
    "locon+rslora": {"type": "locon", "use_rslora": True},
    "locon+lora+": {"type": "locon", "loraplus_lr_ratio": 16.0},
    "lora+pissa": {"type": "lora", "init": "pissa"},
    "locon+sensitivity": {"type": "locon", "rank_allocation": "sensitivity"},
    "locon+ard": {"type": "locon", "rank_allocation": "ard"},
    "locon+squeeze": {"type": "locon", "squeeze_rank": 4},
}


def variants() -> dict[str, dict]:
    """variant name -> network settings: every method as it comes, then the options."""
    from studio.adapters.methods import METHODS

    return {**{name: {"type": name} for name in METHODS}, **OPTIONS}


def network(variant: str, steps: int) -> dict:
    settings = dict(variants()[variant])
    if "squeeze_rank" in settings:
        settings["squeeze_at_step"] = max(1, steps // 2)
    return settings


def train_one(spec: dict) -> dict:
    """Train one variant (in this process) and say what it cost."""
    import torch

    from bench.time_to_concept import recipe_config
    from studio.config import network_config
    from studio.jobs.runs import create_run, iter_events
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    config = recipe_config("tiny-demo", {**RECIPE, "training": {**RECIPE["training"], "max_steps": spec["steps"]}},
                           spec["seed"])
    config.name = f"{spec['variant']}-{spec['seed']}".replace("+", "-")
    # The preset's conv_rank / conv_alpha equal its rank / alpha, which LoCon takes when they are
    # unset; unset, they go with the LoCon variants and leave the methods without them.
    config.network = network_config(like=config.network, conv_rank=None, conv_alpha=None)
    config.network = network_config(like=config.network, **network(spec["variant"], spec["steps"]))
    config.training.log_every_n_steps = spec["steps"]
    if spec.get("quick"):  # a smoke run: fewer class pictures to encode, a one-step final sample
        config.dataset.num_class_images, config.sampling.steps = 4, 1
    trainer = AdapterTrainer(create_run(config, Workspace.open(spec["workspace"])), show_progress=False)
    adapter = trainer.run(resume=False)
    rate = [e["it_s"] for e in iter_events(trainer.run_dir) if e["type"] == "progress"][-1]
    state = trainer.optimizer.state
    return {"adapter": str(adapter), "params": sum(p.numel() for p in trainer.trainable),
            "file_kb": Path(adapter).stat().st_size / 1024, "steps_s": rate,
            "optimizer_kb": sum(t.numel() * t.element_size() for s in state.values() for t in s.values()
                                if torch.is_tensor(t)) / 1024,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}


def train_in_child(spec: dict, folder: Path) -> dict:
    """train_one in a process of its own; adds its peak RSS (MB)."""
    out = folder / f"{spec['variant']}-{spec['seed']}.json"
    log = folder / f"{spec['variant']}-{spec['seed']}.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "bench.variants", "--train-one", json.dumps(spec),
                                 "--result", str(out)], stdout=stderr, stderr=stderr,
                                cwd=Path(__file__).resolve().parent.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"training {spec['variant']} (seed {spec['seed']}) failed:\n{log.read_text()[-3000:]}")
    return {**json.loads(out.read_text()), "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv=None) -> dict:
    import torch

    from studio.generation.engine import Engine
    from toyworld.fidelity import concept_figures, prior_pictures

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7], help="training seeds")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every variant")
    parser.add_argument("--eval-seeds", type=int, default=4, help="generation seeds per prompt")
    parser.add_argument("--variants", nargs="+", default=None, help=f"default: all ({', '.join(variants())})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, the first seed, 1 evaluation seed")
    parser.add_argument("--train-one", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_one:
        torch.set_num_threads(1)
        Path(args.result).write_text(json.dumps(train_one(json.loads(args.train_one))))
        return {}
    if args.quick:
        args.steps, args.seeds, args.eval_seeds = 4, args.seeds[:1], 1
    names = args.variants or list(variants())
    unknown = [n for n in names if n not in variants()]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(variants())}")
    torch.set_num_threads(1)
    eval_seeds = list(range(100, 100 + args.eval_seeds))
    engine = Engine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base_pictures = prior_pictures(engine, eval_seeds)
        for name in names:
            for seed in args.seeds:
                spec = {"variant": name, "seed": seed, "steps": args.steps, "workspace": str(folder / "ws"),
                        "quick": args.quick}
                trained = train_in_child(spec, folder)
                figures = concept_figures(engine, Path(trained["adapter"]), eval_seeds, base_pictures=base_pictures)
                kept = min(figures["prior_with_lora"][a] / max(figures["prior_base"][a], 1e-9)
                           for a in ("color", "shape", "background"))
                rows.append({"variant": name, "seed": seed, **trained, "purple": figures["concept"]["color"],
                             "star": figures["concept"]["shape"], "prior_kept": kept})
                print(json.dumps(rows[-1]), flush=True)
    table = report(rows, names)
    print(f"\n{args.steps} steps, training seeds {' '.join(map(str, args.seeds))}, {len(eval_seeds)} evaluation "
          f"seeds x 3 trigger prompts (prior: 4 prompts without the trigger)\n")
    print(table)
    return {"rows": rows, "table": table}


def report(rows: list[dict], names: list[str]) -> str:
    """The markdown table: one line per variant, means over the training seeds."""
    def mean(values):
        return sum(values) / len(values)

    def rate(values):
        low, high = min(values), max(values)
        return f"{100 * mean(values):.0f}%" + (f" ({100 * low:.0f}-{100 * high:.0f})" if high > low else "")

    cuda = any(r["cuda_peak_mb"] is not None for r in rows)
    lines = ["| variant | purple | star | prior kept | trainable params | file KB | steps/s | "
             f"{'CUDA peak MB' if cuda else 'peak RSS MB'} | optimizer state KB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        memory = mean([r["cuda_peak_mb"] if cuda else r["peak_rss_mb"] for r in mine])
        lines.append(f"| {name} | {rate([r['purple'] for r in mine])} | {rate([r['star'] for r in mine])} | "
                     f"{100 * mean([r['prior_kept'] for r in mine]):.0f}% | {mean([r['params'] for r in mine]):,.0f} | "
                     f"{mean([r['file_kb'] for r in mine]):,.0f} | {mean([r['steps_s'] for r in mine]):.2f} | "
                     f"{memory:,.0f} | {mean([r['optimizer_kb'] for r in mine]):,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
