"""SDXL training on a tiny SDXL-architecture model: aspect-ratio buckets, and every adapter
type trains, exports, reloads and generates."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from studio.config import network_config
from tests.conftest import demo_config
from tests.test_networks import NETWORKS, _fixed_loss
from trainers.data import BatchOrder, Example, bucket_sizes, center_crop_offsets, choose_bucket, prepare_image


def test_buckets_cover_aspects_and_batches_never_mix(tmp_path):
    buckets = bucket_sizes(1024)
    assert (1024, 1024) in buckets and all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert choose_bucket((1920, 1080), 1024, enabled=True)[0] > choose_bucket((1920, 1080), 1024, enabled=True)[1]
    assert choose_bucket((1080, 1920), 1024, enabled=True)[0] < choose_bucket((1080, 1920), 1024, enabled=True)[1]
    assert choose_bucket((300, 200), 1024, enabled=True, no_upscale=True) == (256, 192)
    assert choose_bucket((300, 200), 1024, enabled=False) == (1024, 1024)

    examples = [Example(tmp_path / f"{i}.png", "x", 1 + i % 2, (w, h), choose_bucket((w, h), 64, enabled=True))
                for i, (w, h) in enumerate([(64, 64), (100, 50), (50, 100), (64, 64), (90, 45)])]
    order = BatchOrder(examples, batch_size=2, seed=3)
    seen = []
    for k in range(order.batches_per_epoch):
        batch = order.batch(k)
        assert len({examples[i].bucket for i in batch}) == 1
        seen += batch
    assert sorted(seen) == sorted(i for i, ex in enumerate(examples) for _ in range(ex.repeats))
    assert BatchOrder(examples, 2, 3).batch(7) == order.batch(7)  # pure function of (seed, k)


def test_prepare_image_crops_to_bucket(tmp_path):
    image = np.zeros((50, 100, 3), dtype=np.uint8)
    image[:, :10] = 255  # a white stripe on the left edge
    Image.fromarray(image).save(tmp_path / "wide.png")
    pixels, (top, left) = prepare_image(tmp_path / "wide.png", (48, 48), center_crop=True, flip=False, generator=None)
    assert pixels.shape == (3, 48, 48) and (top, left) == center_crop_offsets((100, 50), (48, 48)) == (0, 24)
    assert pixels[:, :, 0].mean() < 0  # the stripe was cropped away
    flipped, _ = prepare_image(tmp_path / "wide.png", (96, 48), center_crop=True, flip=True, generator=None)
    assert flipped[:, :, -1].mean() > 0.9  # mirrored: the stripe is now on the right


@pytest.mark.slow
def test_sdxl_lora_trains_with_buckets(tmp_path, workspace):
    from studio.jobs.runs import create_run
    from tests.tiny_models import tiny_sdxl_pipeline
    from trainers.trainer import AdapterTrainer

    model_dir = tmp_path / "tiny-sdxl"
    tiny_sdxl_pipeline(seed=0).save_pretrained(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    for i, (w, h) in enumerate([(64, 64), (96, 48), (48, 96), (80, 64)]):
        canvas = np.full((h, w, 3), 255, dtype=np.uint8)
        canvas[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = (128, 0, 160)
        Image.fromarray(canvas).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a sks square on a white background")

    config = demo_config(max_steps=20, learning_rate=3e-3, batch_size=2)
    config.base_model = str(model_dir)
    config.dataset.path = str(data)
    config.dataset.enable_bucket = True
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    assert trainer.family.name == "sdxl" and len({ex.bucket for ex in trainer.instance}) == 4

    batch = trainer.batch(trainer.instance, [1], torch.Generator().manual_seed(0))
    conditioning = batch.conditioning
    assert conditioning["encoder_hidden_states"].shape[-1] == sum(enc.config.hidden_size
                                                                   for enc in trainer.text_encoders)
    assert conditioning["text_embeds"].shape == (1, trainer.text_encoders[1].config.projection_dim)
    width, height = trainer.instance[1].bucket
    top, left = center_crop_offsets((96, 48), (width, height))
    assert conditioning["time_ids"].tolist() == [[48, 96, top, left, height, width]]
    factor = 2 ** (len(trainer.vae.config.block_out_channels) - 1)
    assert batch.latents.shape[-2:] == (height // factor, width // factor)

    def fixed_loss():
        with torch.no_grad():
            return float(np.mean([trainer.loss(k).item() for k in range(900, 910)]))

    before = fixed_loss()
    for step in range(20):
        trainer.train_step(step)
    assert fixed_loss() < before
    trainer.sample(20)
    assert len(list((trainer.run_dir / "samples").glob("*.png"))) == len(config.sampling.prompts)


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    from tests.tiny_models import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_engine():
    from studio.generation.engine import Engine

    return Engine()


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(NETWORKS))
def test_every_network_trains_exports_and_generates_on_sdxl(kind, tiny_sdxl_dir, sdxl_engine, workspace):
    """Loss drops; the exported file, loaded on a fresh base by the engine, computes what
    training left on the UNet (PiSSA / OLoRA included: their init moved the base weights);
    its image differs from the base model's."""
    from dataclasses import replace

    from studio.adapters import read_checked_header
    from studio.generation.engine import AdapterUse, GenerateRequest
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    steps = 20
    config = demo_config(max_steps=steps, learning_rate=3e-3)
    config.base_model = str(tiny_sdxl_dir)
    config.network = network_config(like=config.network, **NETWORKS[kind])
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    assert trainer.family.name == "sdxl"
    before = _fixed_loss(trainer, range(5000, 5008))
    for step in range(steps):
        trainer.train_step(step)
    assert _fixed_loss(trainer, range(5000, 5008)) < before
    path = trainer.export(time.time())
    assert read_checked_header(path)[1]["ss_base_model_version"] == "sdxl_base_v1-0"

    batch = trainer.batch(trainer.instance, [0], torch.Generator().manual_seed(0))
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(1))

    def predict(unet):
        with torch.no_grad():
            return trainer.predict(unet, batch, noise, torch.tensor([300]))

    trained_unet = trainer.accelerator.unwrap_model(trainer.denoiser)
    trained_unet.eval()
    trained = predict(trained_unet)
    model = str(tiny_sdxl_dir)
    reloaded = predict(sdxl_engine.set_mix(model, [AdapterUse(path)]).unet)
    base = predict(sdxl_engine.set_mix(model, []).unet)
    assert (trained - base).abs().max() > 0.05
    assert (reloaded - trained).abs().max() <= 1e-4

    request = GenerateRequest("a sks star on a white background", model=model, steps=2, width=64, height=64)
    adapted = np.asarray(sdxl_engine.generate(replace(request, adapters=[AdapterUse(path)]))[0], dtype=float)
    plain = np.asarray(sdxl_engine.generate(request)[0], dtype=float)
    assert np.abs(adapted - plain).mean() > 0.5
