"""Rank allocation during training on the built-in model: LoCon as it is, LoCon with ARD-LoRA
(no budget, and half of its rank components as rank_budget) and AdaLoRA (rank 8 on average,
from 12), the same steps, data and seed. For each: the denoising loss on fixed draws before
and after (the trainer's own loss at fixed step numbers, so every setting sees the same
noise), the rank components the file keeps out of those trained, its ranks, and steps/s.

    python -m bench.rank_allocation [--steps 160] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from studio import PRESETS_DIR

# Fixed draws: the trainer's loss at these step numbers (beyond any run's length).
FIXED = range(5000, 5012)
SETTINGS = {
    "locon": {"type": "locon"},
    "locon + ard": {"type": "locon", "rank_allocation": "ard"},
    "locon + ard, half budget": {"type": "locon", "rank_allocation": "ard", "rank_budget": "half"},
    "adalora": {"type": "adalora"},
}


def config_for(network: dict, steps: int):
    from studio.config import load_config, network_config

    config = load_config(PRESETS_DIR / "tiny-demo.toml")
    config.network = network_config(rank=8, alpha=8.0, **network)
    config.dataset.num_class_images = 0
    config.training.min_snr_gamma = None
    config.training.lr_scheduler = "constant"
    config.training.max_steps = steps
    config.checkpoints.every_n_steps = 0
    config.sampling.every_n_steps = 0
    return config


def fixed_loss(trainer) -> float:
    with torch.no_grad():
        return float(sum(trainer.loss(k).item() for k in FIXED) / len(FIXED))


def measure(name: str, network: dict, steps: int, tmp: Path) -> dict:
    from studio.adapters import load_adapter
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    budget = network.get("rank_budget") == "half"
    config = config_for({k: v for k, v in network.items() if k != "rank_budget"}, steps)
    if budget:  # half of rank x modules (the modules LoCon adapts on this model)
        probe = AdapterTrainer(create_run(config_for({"type": "locon"}, steps), Workspace.open(tmp / "probe")),
                        show_progress=False)
        probe.setup()
        modules = sum(1 for n, _ in probe.adapter.named_parameters("unet") if n.endswith(".lora_A.default.weight"))
        config.network.rank_budget = modules * config.network.rank // 2
    trainer = AdapterTrainer(create_run(config, Workspace.open(tmp / name.replace(" ", "_").replace(",", ""))),
                      show_progress=False)
    trainer.setup()
    trained = sum(p.shape[0] for n, p in trainer.adapter.named_parameters("unet")
                  if n.endswith((".lora_A.default.weight", ".lora_A.default")))
    before = fixed_loss(trainer)
    started = time.perf_counter()
    for step in range(steps):
        trainer.train_step(step)
    rate = steps / (time.perf_counter() - started)
    after = fixed_loss(trainer)
    ranks = [m.rank for m in load_adapter(trainer.export(time.time())).modules.values()]
    return {"name": name, "before": before, "after": after, "kept": sum(ranks), "trained": trained,
            "ranks": f"{min(ranks)}-{max(ranks)}", "modules": len(ranks), "steps/s": rate}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.steps} steps, lr 1e-3, built-in model, demo dataset, seed 42")
    print("| setting | loss before | loss after | rank components kept / trained | file modules | ranks | steps/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, network in SETTINGS.items():
            r = measure(name, network, args.steps, Path(tmp))
            print(f"| {r['name']} | {r['before']:.4f} | {r['after']:.4f} | {r['kept']} / {r['trained']} | "
                  f"{r['modules']} | {r['ranks']} | {r['steps/s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
