"""Masked loss (dataset.masked_loss): a picture's `<stem>-masklabel.png` or alpha channel
weights the loss in latent space. What is under a black mask does not reach the gradient
through the loss; the mask follows the picture's crop and flip; bad masks are refused."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import demo_config

DEMO = ["sks_01", "sks_02"]


def _dataset(tmp_path, *, mask=None, alpha=None):
    """Two demo pictures; `mask` (an "L" image) saved as sks_01-masklabel.png, or `alpha`
    put into sks_01.png as its alpha channel."""
    from studio import ASSETS_DIR

    folder = tmp_path / "masked"
    folder.mkdir(parents=True)
    for stem in DEMO:
        for suffix in (".png", ".txt"):
            shutil.copy(ASSETS_DIR / "demo-dataset" / f"{stem}{suffix}", folder / f"{stem}{suffix}")
    if mask is not None:
        mask.save(folder / "sks_01-masklabel.png")
    if alpha is not None:
        picture = Image.open(folder / "sks_01.png").convert("RGBA")
        picture.putalpha(alpha)
        picture.save(folder / "sks_01.png")
    return folder


def _left_black(size=(64, 64)) -> Image.Image:
    """Black (ignored) on the left half, white (trained) on the right."""
    pixels = np.full(size[::-1], 255, np.uint8)
    pixels[:, : size[0] // 2] = 0
    return Image.fromarray(pixels)


def _trainer(folder, workspace, **dataset):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=2)
    config.dataset.path = str(folder)
    for key, value in dataset.items():
        setattr(config.dataset, key, value)
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    return trainer


def test_mask_files_are_masks_not_pictures_and_alpha_is_a_mask(tmp_path):
    from studio.datasets import load_items, mask_path, open_mask

    folder = _dataset(tmp_path, mask=_left_black())
    assert [item.path.name for item in load_items(folder)] == ["sks_01.png", "sks_02.png"]
    assert mask_path(folder / "sks_01.png") == folder / "sks_01-masklabel.png" and mask_path(folder / "sks_02.png") is None
    assert np.array_equal(np.asarray(open_mask(folder / "sks_01.png")), np.asarray(_left_black()))
    assert open_mask(folder / "sks_02.png") is None  # no mask file, opaque: trains whole

    alpha_folder = _dataset(tmp_path / "a", alpha=_left_black())
    assert np.array_equal(np.asarray(open_mask(alpha_folder / "sks_01.png")), np.asarray(_left_black()))


def test_the_mask_follows_the_pictures_crop_and_flip(tmp_path):
    """A grey picture equal to its mask, randomly cropped and flipped: the latent mask is the
    picture's own brightness averaged over each latent cell."""
    from trainers.data import prepare_image, prepare_mask

    rng = np.random.default_rng(0)
    pixels = np.zeros((80, 96), np.uint8)
    pixels[10:50, 5:40] = 255
    pixels[60:, 70:] = 128
    mask = Image.fromarray(pixels)
    path = tmp_path / "grey.png"
    Image.fromarray(np.stack([pixels] * 3, -1)).save(path)
    crops = set()
    for seed in range(8):
        bucket = ((64, 64), (48, 80))[seed % 2]  # square, and an aspect-ratio bucket
        generator = torch.Generator().manual_seed(seed)
        flip = bool(rng.integers(2))
        image, crop = prepare_image(path, bucket, center_crop=False, flip=flip, generator=generator)
        crops.add((crop, flip))
        latent = prepare_mask(mask, (96, 80), bucket, crop, flip, (bucket[1] // 8, bucket[0] // 8))
        seen = torch.nn.functional.avg_pool2d(((image[0] + 1) / 2)[None, None], 8)[0, 0]
        assert torch.allclose(latent, seen, atol=0.03), (seed, bucket, crop, flip)
    assert len(crops) > 3  # several crops and both flips were checked


@pytest.mark.slow(seconds=8)
def test_a_masked_out_region_does_not_reach_the_gradient(tmp_path, workspace):
    """Through the loss, the masked-out latents carry no gradient: whatever the UNet predicts
    there (a change added to its output under the black half) leaves the loss and every
    adapter gradient bit for bit as they were; the same change under the white half changes
    them. (The pixels under a mask still reach the UNet as context, as in kohya and
    OneTrainer; what the mask removes is their error from the loss.)"""
    torch.manual_seed(0)
    trainer = _trainer(_dataset(tmp_path, mask=_left_black()), workspace, masked_loss=True)
    unet = trainer.accelerator.unwrap_model(trainer.denoiser)
    first = next(i for i, ex in enumerate(trainer.instance) if ex.path.name == "sks_01.png")
    # Train a few steps so that B != 0 and the A matrices get gradients too.
    for step in range(3):
        trainer.train_step(step)

    def gradients(delta: torch.Tensor | None):
        handle = None
        if delta is not None:
            handle = unet.register_forward_hook(lambda module, args, out: type(out)(sample=out.sample + delta))
        try:
            generator = torch.Generator().manual_seed(5)
            batch = trainer.batch(trainer.instance, [first], generator)
            weight = batch.mask[0]
            half = weight.shape[1] // 2
            assert not weight[:, :half].any() and bool((weight[:, half:] == 1).all())
            loss = trainer.per_sample_loss(batch, generator).mean()
            grads = torch.autograd.grad(loss, trainer.trainable, allow_unused=True)
        finally:
            if handle is not None:
                handle.remove()
        return loss.detach(), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, trainer.trainable)]

    loss, plain = gradients(None)
    channels, height, width = trainer.latent_dist(torch.zeros(1, 3, 64, 64))[0].shape[1:]
    left = torch.zeros(1, channels, height, width)
    left[..., : width // 2] = torch.randn(1, channels, height, width // 2)
    masked_loss, masked = gradients(left)
    assert masked_loss == loss and all(torch.equal(a, b) for a, b in zip(plain, masked))
    assert sum(float(g.abs().sum()) for g in plain) > 0
    right = left.flip(-1)
    changed_loss, changed = gradients(right)
    assert changed_loss != loss and sum(float((a - b).abs().sum()) for a, b in zip(plain, changed)) > 1e-3


@pytest.mark.slow(seconds=10)
def test_masks_train_with_caching_random_crops_flips_and_validation(tmp_path, workspace):
    """Without masks the masked loss is the plain loss (same draws); cached and uncached
    latent masks agree; a run with random crops, flips, an alpha mask and a validation split
    trains and validates."""
    torch.manual_seed(0)
    folder = _dataset(tmp_path)
    plain = _trainer(folder, workspace, masked_loss=False)
    unmasked = _trainer(folder, workspace, masked_loss=True)
    for k in (0, 1):
        with torch.no_grad():
            assert float(unmasked.loss(k)) == pytest.approx(float(plain.loss(k)), rel=1e-5)

    alpha_folder = _dataset(tmp_path / "a", alpha=_left_black())
    cached = _trainer(alpha_folder, workspace, masked_loss=True, random_flip=True, unmasked_weight=0.25)
    assert cached.cache_latents
    example = next(ex for ex in cached.instance if ex.path.name == "sks_01.png")
    for flip in (False, True):
        height, width = cached._latent_cache[(example.path, flip)][0].shape[-2:]
        weight = cached._latent_mask(example, (0, 0), flip, (height, width))
        assert cached._mask_cache[(example.path, flip)] is weight
        black, white = (weight[:, width // 2:], weight[:, :width // 2]) if flip else \
            (weight[:, :width // 2], weight[:, width // 2:])
        assert torch.all(black == 0.25) and torch.all(white == 1.0)

    config_run = _trainer(alpha_folder, workspace, masked_loss=True, random_flip=True, center_crop=False,
                          validation_split=0.5)
    assert not config_run.cache_latents and len(config_run.validation) == 1
    first = config_run.validation_loss()
    config_run.config.training.max_steps = 2
    config_run.config.sampling.steps = 1
    config_run.run(resume=False)
    assert config_run.validation_loss() != first and not config_run._mask_cache


def test_bad_masks_get_one_clear_line(tmp_path, workspace):
    """Training refuses them in one line; the dataset report (Datasets tab) names them first."""
    from studio.datasets import check_dataset
    from studio.errors import StudioError

    wrong_size = _dataset(tmp_path / "size", mask=_left_black((32, 64)))
    with pytest.raises(StudioError, match=r"sks_01-masklabel.png is 32x64 but its picture sks_01.png is 64x64"):
        _trainer(wrong_size, workspace, masked_loss=True)
    corrupt = _dataset(tmp_path / "corrupt")
    (corrupt / "sks_01-masklabel.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(StudioError, match="sks_01-masklabel.png"):
        _trainer(corrupt, workspace, masked_loss=True)
    for folder, says in ((wrong_size, "32x64 but its picture is 64x64"), (corrupt, "not an image PIL can read")):
        report = check_dataset(folder)
        found = [issue for issue in report.issues if issue.kind == "mask_unusable"]
        assert [issue.path for issue in found] == ["sks_01-masklabel.png"] and says in found[0].message
        assert report.image_count == 2  # the mask is not a picture
    black = Image.new("L", (64, 64), 0)
    with pytest.raises(StudioError, match="mask of sks_01.png is all black.*unmasked_weight"):
        _trainer(_dataset(tmp_path / "black", mask=black), workspace, masked_loss=True)
    trainer = _trainer(_dataset(tmp_path / "black-ok", mask=black), workspace, masked_loss=True, unmasked_weight=0.1)
    with torch.no_grad():
        assert float(trainer.loss(0)) > 0
