"""Latents and text conditioning cached on disk (trainers/cache.py): the next run on the same
pictures and model reads them instead of encoding; anything they depend on changed (a
picture's bytes, a caption, the resolution, the flip, the VAE's or text encoder's weights) makes new
entries; a damaged entry is encoded again; the cached values are the encoded ones."""
from __future__ import annotations

import shutil

import pytest
import torch

from studio import ASSETS_DIR
from tests.conftest import demo_config


def _dataset(tmp_path, count=3):
    folder = tmp_path / "pictures"
    folder.mkdir(exist_ok=True)
    for picture in sorted((ASSETS_DIR / "demo-dataset").glob("sks_*.png"))[:count]:
        shutil.copyfile(picture, folder / picture.name)
        shutil.copyfile(picture.with_suffix(".txt"), folder / picture.with_suffix(".txt").name)
    return folder


def _set_up(workspace, folder, **dataset):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=1)
    config.dataset.path = str(folder)
    for key, value in dataset.items():
        setattr(config.dataset, key, value)
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    return trainer


def _counts(trainer) -> tuple[int, int]:
    """(read from disk, encoded) as the run's last "cache" event reports them."""
    from studio.jobs.runs import iter_events

    event = [e for e in iter_events(trainer.run_dir) if e["type"] == "cache"][-1]
    return event["from_disk"], event["encoded"]


@pytest.mark.slow(seconds=40)
def test_second_run_reads_latents_and_text_from_disk(workspace, tmp_path, monkeypatch):
    folder = _dataset(tmp_path)
    first = _set_up(workspace, folder)
    assert _counts(first) == (0, 6)  # 3 latents + 3 captions
    assert len(list((workspace.cache_dir / "latents").rglob("*.safetensors"))) == 3
    assert len(list((workspace.cache_dir / "text").rglob("*.safetensors"))) == 3
    # the event says where the cache is, how big, and how to clear it
    from studio.jobs.runs import iter_events
    from ui.runs_view import event_line

    event = [e for e in iter_events(first.run_dir) if e["type"] == "cache"][-1]
    files = list(workspace.cache_dir.rglob("*.safetensors"))
    assert event["folder"] == str(workspace.cache_dir) and event["entries"] == 6
    assert event["bytes"] == sum(f.stat().st_size for f in files)
    assert str(workspace.cache_dir) in event_line(event) and "delete" in event_line(event)

    from trainers.trainer import AdapterTrainer

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded although the disk cache holds it")

    monkeypatch.setattr(AdapterTrainer, "latent_dist", no_encoding)
    monkeypatch.setattr(AdapterTrainer, "encode_text", no_encoding)
    second = _set_up(workspace, folder)
    assert _counts(second) == (6, 0)
    for key, (mean, std) in first._latent_cache.items():
        assert torch.equal(second._latent_cache[key][0], mean) and torch.equal(second._latent_cache[key][1], std)
    for caption, conditioning in first._text_cache.items():
        for name, tensor in conditioning.items():
            assert torch.equal(second._text_cache[caption][name], tensor)
    # the batches a step trains on are the same
    assert torch.equal(first.loss(0), second.loss(0))


@pytest.mark.slow(seconds=60)
def test_what_the_latents_depend_on_makes_new_entries(workspace, tmp_path):
    folder = _dataset(tmp_path)
    _set_up(workspace, folder)
    # one picture's bytes changed: that picture alone is encoded again
    picture = sorted(folder.glob("*.png"))[0]
    from PIL import Image

    image = Image.open(picture).convert("RGB")
    image.putpixel((0, 0), (1, 2, 3))
    image.save(picture)
    changed = _set_up(workspace, folder)
    assert _counts(changed) == (5, 1)
    # one caption changed: that caption alone is encoded again
    caption = picture.with_suffix(".txt")
    caption.write_text(caption.read_text().strip() + ", on a table\n")
    assert _counts(_set_up(workspace, folder)) == (5, 1)
    # another resolution (bucket): every latent again, the captions' conditioning is reused
    other_size = _set_up(workspace, folder, resolution=32)
    assert _counts(other_size) == (3, 3)
    # flips: the mirrored latents are new entries, the plain ones are reused
    flipped = _set_up(workspace, folder, random_flip=True)
    assert _counts(flipped) == (6, 3)


@pytest.mark.slow(seconds=60)
def test_other_weights_miss_and_a_damaged_entry_is_encoded_again(workspace, tmp_path, monkeypatch):
    folder = _dataset(tmp_path, count=2)
    _set_up(workspace, folder)
    own = sorted((workspace.cache_dir / "latents").rglob("*.safetensors"))
    # another VAE encoder (or text encoder): nothing of the first model's is read
    from trainers import trainer as trainer_module

    real = trainer_module.load_pipeline

    def other_model(*args, **kwargs):
        pipe = real(*args, **kwargs)
        with torch.no_grad():
            pipe.vae.encoder.conv_in.weight.mul_(1.01)
            pipe.text_encoder.get_input_embeddings().weight.mul_(1.01)
        return pipe

    monkeypatch.setattr(trainer_module, "load_pipeline", other_model)
    other = _set_up(workspace, folder)
    assert _counts(other) == (0, 4)
    monkeypatch.setattr(trainer_module, "load_pipeline", real)
    # the decoder plays no part in the latents: a model differing there reuses them
    def other_decoder(*args, **kwargs):
        pipe = real(*args, **kwargs)
        with torch.no_grad():
            pipe.vae.decoder.conv_out.weight.mul_(1.01)
        return pipe

    monkeypatch.setattr(trainer_module, "load_pipeline", other_decoder)
    assert _counts(_set_up(workspace, folder)) == (4, 0)
    monkeypatch.setattr(trainer_module, "load_pipeline", real)
    # a damaged file is encoded again and rewritten
    entry = own[0]
    entry.write_bytes(b"not a safetensors file")
    again = _set_up(workspace, folder)
    assert _counts(again) == (3, 1)
    from safetensors.torch import load_file

    assert set(load_file(str(entry))) == {"mean", "std"}


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("setting", ["cache_to_disk", "cache_latents"])
def test_turned_off_writes_nothing(workspace, tmp_path, setting):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=1)
    config.dataset.path = str(_dataset(tmp_path, count=1))
    setattr(config.training, setting, False)
    config.training.cache_text_embeddings = setting != "cache_latents"
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    from studio.jobs.runs import iter_events

    if setting == "cache_to_disk":
        assert not workspace.cache_dir.exists()
        assert not [e for e in iter_events(trainer.run_dir) if e["type"] == "cache"]
    else:
        assert not (workspace.cache_dir / "latents").exists()
