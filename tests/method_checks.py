"""The checks every adapter method owes its users, on the built-in model: the exported file
equals the trained model, in our loader and in diffusers'; it blends with another adapter;
and the run's last sample is what `lora-studio generate` draws from the file with the run's
prompt, seed, steps, CFG and scheduler (the base pipeline's own, DDIM for the built-in model)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def assert_generate_reproduces_sample(trainer, adapter: Path, out: Path, *, step: int, changed_by: int = 8) -> float:
    """Write the trainer's sample for `step` (the first sample prompt) and generate the same
    image through the CLI from `adapter`; returns the largest pixel difference (in 1/255)
    after asserting it is at most 1 and the adapter changed the picture by more than
    `changed_by` somewhere (so that generating without the adapter would fail the check)."""
    from studio.cli import main

    cfg = trainer.config
    trainer.write_samples(step)
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
    changed = int(np.abs(base - sample).max())
    assert changed > changed_by, f"the adapter changes the sample by {changed}/255 only: the check proves nothing"
    assert difference <= 1, f"generate differs from the run's sample by {difference}/255"
    return difference


def unet_out(unet, seed: int = 0):
    """The UNet on fixed random inputs (2 samples, timesteps 500 and 20)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, unet.config.sample_size, unet.config.sample_size, generator=g)
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500, 20]), text).sample


def trained_unet(trainer):
    return trainer.accelerator.unwrap_model(trainer.denoiser)


def assert_file_equals_trained_model(trainer, adapter: Path, *, name: str) -> None:
    """The file attached to a fresh built-in pipeline gives the trained UNet's and text
    encoder's outputs (<= 1e-5), and the adapter changed the UNet."""
    import torch

    from studio.adapters import attach_adapter, load_adapter
    from studio.models import load_pipeline

    fresh = load_pipeline("builtin")
    base = unet_out(fresh.unet)
    attach_adapter(fresh, load_adapter(adapter), name)
    expected = unet_out(trained_unet(trainer))
    assert (expected - base).abs().max() > 1e-3
    assert (unet_out(fresh.unet) - expected).abs().max() <= 1e-5
    ids = fresh.tokenizer(["a sks star"], padding="max_length", max_length=fresh.tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        ours = fresh.text_encoder(ids)[0]
        theirs = dict(trainer.text_encoder_components())["text_encoder"](ids)[0]
    assert (ours - theirs).abs().max() <= 1e-5


def assert_diffusers_loads_every_key(trainer, adapter: Path) -> None:
    """diffusers' load_lora_weights consumes every key of the file, makes one layer per
    module and gives the trained UNet's output (<= 1e-5)."""
    from studio.adapters import load_adapter
    from studio.models import load_pipeline
    from tests.test_formats import _diffusers_load, _lora_layers

    theirs = load_pipeline("builtin")
    messages = _diffusers_load(theirs, adapter)
    problems = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not been", "mismatch"))]
    assert not problems, problems
    assert len(_lora_layers(theirs, "d")) == len(load_adapter(adapter).modules)
    assert (unet_out(theirs.unet) - unet_out(trained_unet(trainer))).abs().max() <= 1e-5


def assert_blends_with_another_adapter(adapter: Path, other_kind: str, folder: Path) -> None:
    """The file at 0.7 with a perturbed `other_kind` adapter at -1.2 in the engine equals the
    base with both merged into its weights (<= 1e-4), and each changes the output."""
    from studio.adapters import adapter_models, export_adapter, save_adapter
    from studio.generation.engine import AdapterUse, Engine
    from studio.models import load_pipeline
    from tests.test_blending import _merged_base
    from tests.test_formats import add_adapter, perturb

    other = load_pipeline("builtin")
    add_adapter(other, other_kind)
    perturb(adapter_models(other).values())
    other_file = save_adapter(folder / f"{other_kind}.safetensors", export_adapter(adapter_models(other)))

    engine = Engine()
    base = unet_out(engine.set_mix("builtin", []).unet)
    alone = unet_out(engine.set_mix("builtin", [AdapterUse(adapter, 0.7)]).unet)
    mixed = unet_out(engine.set_mix("builtin", [AdapterUse(adapter, 0.7), AdapterUse(other_file, -1.2)]).unet)
    expected = unet_out(_merged_base([(adapter, 0.7), (other_file, -1.2)]).unet)
    assert (alone - base).abs().max() > 1e-3 and (mixed - alone).abs().max() > 1e-3
    assert (mixed - expected).abs().max() <= 1e-4


class TrainedFileChecks:
    """The three checks above as tests, for a method's test module: it subclasses this as
    `TestTrainedFile`, sets `blend_with` (the other adapter's kind) and `steps` (the run's
    last step), and its module fixture `trained` gives the run's "trainer" and file "path"."""

    blend_with: str
    steps: int

    @pytest.mark.slow(seconds=60)
    def test_diffusers_loads_every_key(self, trained):
        assert_diffusers_loads_every_key(trained["trainer"], trained["path"])

    @pytest.mark.slow(seconds=60)
    def test_it_blends_with_another_adapter(self, trained, tmp_path):
        assert_blends_with_another_adapter(trained["path"], self.blend_with, tmp_path)

    @pytest.mark.slow(seconds=20)
    def test_generate_reproduces_the_runs_last_sample(self, trained, tmp_path):
        assert_generate_reproduces_sample(trained["trainer"], trained["path"], tmp_path, step=self.steps)
