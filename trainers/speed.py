"""Time a few training steps of a run folder, for the studio's time estimates (studio.jobs.speed):

    python -m trainers.speed RUN_DIR [--steps 5] [--warmup 2]

prints one JSON line: setup_s, steps_per_s and sample_image_s (one sample picture)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from studio.errors import StudioError


def measure(run_dir: Path, *, steps: int, warmup: int, samples: bool = True) -> dict:
    """Set up the run's trainer, train `warmup` untimed steps, time `steps` more and (with
    `samples`) one round of sample pictures. Writes only inside `run_dir`."""
    from trainers.trainer import AdapterTrainer

    trainer = AdapterTrainer(run_dir, show_progress=False)
    started = time.perf_counter()
    trainer.setup()
    setup_s = time.perf_counter() - started
    for step in range(warmup):
        trainer.train_step(step)
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        loss = trainer.train_step(step)
    float(loss)  # wait for the last step
    steps_per_s = steps / (time.perf_counter() - started)
    sample_image_s = None
    prompts = trainer.config.sampling.prompts
    if samples and prompts:
        started = time.perf_counter()
        trainer.sample(warmup + steps)
        sample_image_s = (time.perf_counter() - started) / len(prompts)
    return {"setup_s": setup_s, "steps_per_s": steps_per_s, "sample_image_s": sample_image_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.speed")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        print(json.dumps(measure(args.run_dir, steps=args.steps, warmup=args.warmup)))
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
