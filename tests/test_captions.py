"""Caption dropout and tag shuffling: the captions the model sees change as configured,
every choice from the per-sample generators (so resume stays exact)."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import demo_config
from trainers.data import micro_generator

TAGS = ["purple", "star", "white background", "centered", "small", "flat"]


def test_caption_variant_keeps_the_first_tags_and_the_set_of_tags():
    from trainers.data import caption_variant

    caption = "a sks shape, " + ", ".join(TAGS)
    seen = set()
    for i in range(200):
        tags = caption_variant(caption, torch.Generator().manual_seed(i), dropout_rate=0.0, shuffle=True,
                               keep=2).split(", ")
        assert tags[:2] == ["a sks shape", "purple"] and sorted(tags) == sorted(["a sks shape"] + TAGS)
        seen.add(tuple(tags))
    assert len(seen) > 50  # 5! = 120 orders of the other tags
    unshuffled = caption_variant(caption, torch.Generator().manual_seed(0), dropout_rate=0.0, shuffle=False, keep=0)
    assert unshuffled == caption


def test_caption_dropout_rate_is_the_share_of_empty_captions():
    from trainers.data import caption_variant

    n, rate = 4000, 0.3
    dropped = sum(caption_variant("sks, star", torch.Generator().manual_seed(i), dropout_rate=rate, shuffle=False,
                                  keep=1) == "" for i in range(n))
    assert abs(dropped / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5  # four standard deviations


def _tagged_dataset(tmp_path):
    """The demo pictures captioned with tags, the trigger inside the first one."""
    from studio import ASSETS_DIR

    folder = tmp_path / "tagged"
    shutil.copytree(ASSETS_DIR / "demo-dataset", folder, ignore=shutil.ignore_patterns("reg"))
    for i, caption in enumerate(sorted(folder.glob("*.txt"))):
        caption.write_text(", ".join(["a sks shape"] + TAGS[i % 3:] + TAGS[:i % 3]))
    return folder


def _trainer(tmp_path, workspace, **dataset):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=6, every_n_steps=3)
    config.dataset.path = str(_tagged_dataset(tmp_path))
    config.sampling.steps = 1
    for key, value in dataset.items():
        setattr(config.dataset, key, value)
    return AdapterTrainer(create_run(config, workspace), show_progress=False)


@pytest.mark.slow
def test_the_model_sees_shuffled_and_dropped_captions(tmp_path, workspace):
    """Shuffled tags are encoded every step (the trigger's tag first); with caching on and
    dropout alone, the empty caption's cached embedding stands in for a dropped caption."""
    trainer = _trainer(tmp_path, workspace, shuffle_tags=True, caption_dropout_rate=0.25)
    trainer.setup()
    assert not trainer.cache_text and trainer.keep_tags == 1  # trigger word "sks": its tag stays first
    encoded: list[str] = []
    encode = trainer.encode_text
    trainer.encode_text = lambda captions: (encoded.extend(captions), encode(captions))[1]
    sources = {ex.caption for ex in trainer.instance}
    n = 400
    for k in range(n):
        trainer.batch(trainer.instance, trainer.instance_order.batch(k), micro_generator(42, k), varied_at=k)
    assert len(encoded) == n
    dropped = encoded.count("")
    assert abs(dropped / n - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5
    shown = [c for c in encoded if c]
    assert all(c.split(", ")[0] == "a sks shape" and sorted(c.split(", ")) in
               [sorted(s.split(", ")) for s in sources] for c in shown)
    assert len(set(shown) - sources) > 50  # new orders, not the captions as written

    cached = _trainer(tmp_path / "cached", workspace, caption_dropout_rate=0.5)
    cached.setup()
    empty = cached._text_cache[""]["encoder_hidden_states"]
    assert cached.cache_text and not torch.equal(
        empty, cached._text_cache[cached.instance[0].caption]["encoder_hidden_states"])
    texts = [cached.batch(cached.instance, cached.instance_order.batch(k), micro_generator(42, k),
                           varied_at=k).conditioning["encoder_hidden_states"][0]
             for k in range(200)]
    share = sum(torch.equal(t, empty) for t in texts) / len(texts)
    assert abs(share - 0.5) < 4 * (0.25 / len(texts)) ** 0.5


@pytest.mark.slow(seconds=15)
def test_resume_with_shuffled_and_dropped_captions_is_exact(tmp_path, workspace):
    from studio.jobs.runs import iter_events
    from trainers.trainer import AdapterTrainer

    full = _trainer(tmp_path, workspace, shuffle_tags=True, keep_tokens=2, caption_dropout_rate=0.3)
    full.run(resume=False)
    resumed = AdapterTrainer(full.run_dir, show_progress=False)
    resumed.run(resume=True)
    assert [e["step"] for e in iter_events(full.run_dir) if e["type"] == "resume"] == [3]
    a, b = full.adapter_state(), resumed.adapter_state()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
