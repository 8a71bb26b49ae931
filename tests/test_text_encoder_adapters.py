"""Adapters with text-encoder modules (`lora_te*`, as most CivitAI LoRAs have) through the
engine, the CLI, bake, fuse and training, on SD1.5 and SDXL. These go through peft's
`inject_adapter_in_model`, which works with every transformers/peft pair (transformers
5.24's own `add_adapter` refuses peft 0.21)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import demo_config
from tests.test_formats import add_adapter, cli, max_pixel_diff, perturb
from tests.tiny_models import tiny_sd15_pipeline

PIXEL_TOLERANCE = 1 / 255
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def te_files(tmp_path_factory):
    """A kohya LoRA for the built-in model's architecture with UNet and text-encoder modules,
    and the same file without its text-encoder modules."""
    from studio.adapters import AdapterFile, adapter_models, export_adapter, save_adapter

    folder = tmp_path_factory.mktemp("te")
    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, "lora")
    perturb(adapter_models(pipe).values(), scale=0.2)
    adapter = export_adapter(adapter_models(pipe), family="sd15")
    assert {n.split("_")[1] for n in adapter.modules} == {"unet", "te"}
    full = save_adapter(folder / "with_te.safetensors", adapter)
    unet_only = AdapterFile({n: m for n, m in adapter.modules.items() if n.startswith("lora_unet_")},
                            dict(adapter.metadata), adapter.family, adapter.source_format)
    return full, save_adapter(folder / "unet_only.safetensors", unet_only)


def _image(engine, *adapters):
    from studio.generation.engine import GenerateRequest

    request = GenerateRequest(PROMPT, steps=4, seed=3, adapters=list(adapters))
    return np.asarray(engine.generate(request)[0], dtype=np.float64) / 255


def test_text_encoder_weight_zero_is_the_unet_only_file(te_files):
    from studio.generation.engine import AdapterUse, Engine

    full, unet_only = te_files
    engine = Engine()
    base = _image(engine)
    with_te = _image(engine, AdapterUse(full, 1.0))
    te_off = _image(engine, AdapterUse(full, 1.0, te_weight=0.0))
    assert max_pixel_diff(with_te, base) > 0.05
    assert max_pixel_diff(te_off, _image(engine, AdapterUse(unet_only, 1.0))) <= PIXEL_TOLERANCE
    assert max_pixel_diff(with_te, te_off) > 0.02  # the text-encoder modules act
    assert engine.pipeline_loads == 1


def test_cli_generates_with_a_text_encoder_file(te_files, tmp_path, capsys):
    from PIL import Image

    full, _ = te_files
    code, out, err = cli(capsys, "generate", "--prompt", PROMPT, "--steps", "4", "--seed", "3",
                         "--adapter", f"{full}:1", "--out", tmp_path / "te.png")
    assert code == 0, err
    code, _, err = cli(capsys, "generate", "--prompt", PROMPT, "--steps", "4", "--seed", "3",
                       "--out", tmp_path / "base.png")
    assert code == 0, err
    adapted = np.asarray(Image.open(tmp_path / "te.png"), dtype=np.float64) / 255
    base = np.asarray(Image.open(tmp_path / "base.png"), dtype=np.float64) / 255
    assert max_pixel_diff(adapted, base) > 0.05


def test_bake_and_fuse_keep_the_text_encoder_modules(te_files, tmp_path):
    from studio.adapters import load_adapter
    from studio.generation.engine import AdapterUse, Engine, GenerateRequest
    from studio.adapters.mixing import bake, fuse

    full, _ = te_files
    engine = Engine()
    live = _image(engine, AdapterUse(full, 0.7))
    baked = bake([(full, 0.7)], tmp_path / "baked.safetensors", dtype=torch.float32).path
    assert any(n.startswith("lora_te_") for n in load_adapter(baked).modules)
    assert max_pixel_diff(_image(engine, AdapterUse(baked, 1.0)), live) <= PIXEL_TOLERANCE
    checkpoint = fuse("builtin", [(full, 0.7)], tmp_path / "fused.safetensors")
    fused = engine.generate(GenerateRequest(PROMPT, model=str(checkpoint), steps=4, seed=3))[0]
    assert max_pixel_diff(np.asarray(fused, dtype=np.float64) / 255, live) <= 2 * PIXEL_TOLERANCE


def _diffusers_consumes_everything(pipe, path) -> int:
    """Loads `path` with diffusers' `load_lora_weights`; returns how many text-encoder layers
    it adapted, after checking that no key was left unused."""
    from peft.tuners.lora.layer import LoraLayer

    from tests.test_formats import _diffusers_load

    messages = _diffusers_load(pipe, path)
    problems = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not been", "mismatch"))]
    assert not problems, problems
    return sum(isinstance(m, LoraLayer) and "d" in m.lora_A
               for attr in ("text_encoder", "text_encoder_2") if getattr(pipe, attr, None) is not None
               for m in getattr(pipe, attr).modules())


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_training_the_text_encoder_exports_modules_diffusers_loads(family, workspace, tmp_path):
    from studio.adapters import load_adapter
    from studio.jobs.runs import create_run
    from tests.tiny_models import tiny_sdxl_pipeline
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=3, learning_rate=3e-2)
    config.sampling.steps = 2
    config.network.train_text_encoder = True
    if family == "sdxl":
        tiny_sdxl_pipeline(seed=0).save_pretrained(tmp_path / "tiny-sdxl")
        config.base_model = str(tmp_path / "tiny-sdxl")
    path = AdapterTrainer(create_run(config, workspace), show_progress=False).run()
    adapter = load_adapter(path)
    prefixes = adapter.prefix_counts()
    expected = {"sd15": {"lora_unet", "lora_te"}, "sdxl": {"lora_unet", "lora_te1", "lora_te2"}}[family]
    assert set(prefixes) == expected
    theirs = tiny_sd15_pipeline() if family == "sd15" else tiny_sdxl_pipeline(seed=0)
    te_modules = sum(n for p, n in prefixes.items() if p != "lora_unet")
    assert _diffusers_consumes_everything(theirs, path) == te_modules
