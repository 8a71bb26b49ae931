"""The check every adapter method owes its users: the run's last sample is what
`lora-studio generate` draws from the exported file with the run's prompt, seed, steps, CFG
and scheduler (the base pipeline's own, DDIM for the built-in model)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def assert_generate_reproduces_sample(trainer, adapter: Path, out: Path, *, step: int) -> float:
    """Write the trainer's sample for `step` (the first sample prompt) and generate the same
    image through the CLI from `adapter`; returns the largest pixel difference (in 1/255)
    after asserting it is at most 1 and the adapter changed the picture."""
    from studio.cli import main

    cfg = trainer.config
    trainer._write_samples(step)
    sample = np.asarray(Image.open(trainer.run_dir / "samples" / f"step-{step:06d}-0.png"), dtype=np.int16)
    prompt = cfg.sampling.prompts[0] if cfg.sampling.prompts else trainer.instance[0].caption
    common = ["generate", "--model", cfg.base_model, "--prompt", prompt, "--seed", str(cfg.sampling.seed),
              "--steps", str(cfg.sampling.steps), "--guidance", str(cfg.sampling.guidance_scale),
              "--width", str(cfg.dataset.resolution), "--height", str(cfg.dataset.resolution),
              "--negative", cfg.sampling.negative_prompt]
    assert main([*common, "--adapter", f"{adapter}:1", "--out", str(out / "with.png")]) == 0
    assert main([*common, "--out", str(out / "base.png")]) == 0
    generated = np.asarray(Image.open(out / "with.png"), dtype=np.int16)
    base = np.asarray(Image.open(out / "base.png"), dtype=np.int16)
    difference = int(np.abs(generated - sample).max())
    assert np.abs(base - sample).max() > 8, "the adapter does not change the sample: the check proves nothing"
    assert difference <= 1, f"generate differs from the run's sample by {difference}/255"
    return difference
