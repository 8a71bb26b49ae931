"""Auto-captioning: the shipped toy captioner reads the toy world, transformers image-to-text
folders and WD14 taggers caption offline, the modes keep what they must, and the CLI and the
Datasets tab's view run the same function."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.datasets import read_caption
from studio.datasets.captioning import CHARACTER_THRESHOLD, Captioner, caption_dataset, load_captioner, merge_caption
from studio.errors import StudioError
from toyworld import world

DEMO = world.PROJECT_DEMO_DIR


def _truth(caption: str) -> tuple:
    parsed = world.parse_caption(caption)
    return parsed["color"], parsed["shape"], parsed["background"]


@pytest.fixture(scope="module")
def builtin():
    return load_captioner("builtin")


# --------------------------------------------------------------------------- the toy captioner
def test_builtin_captioner_reads_fresh_toy_world_pictures(builtin):
    """Every colour, shape and background (purple and star too), the world's sizes: >= 95%
    of captions name all three right."""
    rng = np.random.default_rng(2024)
    scenes = [world.sample_scene(rng, shapes=world.SHAPES, colors=world.SHAPE_COLORS, backgrounds=world.BACKGROUNDS)
              for _ in range(300)]
    captions = builtin.caption([world.render_scene(s) for s in scenes])
    right = [_truth(c) == (s.color, s.shape, s.background) for c, s in zip(captions, scenes)]
    assert np.mean(right) >= 0.95, [(c, s) for c, s, r in zip(captions, scenes, right) if not r]
    for attribute, index in (("color", 0), ("shape", 1), ("background", 2)):
        values = {getattr(s, attribute) for s in scenes}
        assert values == {_truth(c)[index] for c in captions}, attribute  # no value is never or always said


def test_builtin_captioner_reads_the_shipped_demo_dataset(builtin):
    """The demo's purple stars (their captions hide colour and shape behind "sks shape")
    and its regularisation pictures: >= 95% all three right."""
    stars = sorted(DEMO.glob("sks_*.png"))
    reg = sorted((DEMO / "reg").glob("*.png"))
    captions = builtin.caption([Image.open(p) for p in stars + reg])
    wanted = [("purple", "star", s.background) for s in world.demo_scenes()]
    wanted += [_truth(p.with_suffix(".txt").read_text()) for p in reg]
    right = [_truth(c) == w for c, w in zip(captions, wanted)]
    assert len(right) == 36 and np.mean(right) >= 0.95, list(zip(captions, wanted))


# --------------------------------------------------------------------------- modes
def test_merge_caption_modes():
    assert merge_caption("", "a red circle", "fill") == "a red circle"
    assert merge_caption("mine", "a red circle", "fill") == "mine"
    assert merge_caption("mine", "a red circle", "overwrite") == "a red circle"
    assert merge_caption("sks, smiling", "smiling, red hair", "prepend") == "red hair, sks, smiling"
    assert merge_caption("sks, smiling", "smiling, red hair", "append") == "sks, smiling, red hair"
    assert merge_caption("sks, red hair", "red hair", "append") == "sks, red hair"  # twice adds nothing
    # the line training reads changes; the others stay
    assert merge_caption("\nfirst\nsecond note", "tag", "append") == "first, tag\nsecond note"
    with pytest.raises(StudioError, match="fill, overwrite, prepend, append"):
        merge_caption("x", "y", "replace")


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    return folder


def test_caption_dataset_modes_on_files(demo_copy, builtin):
    stars = sorted(demo_copy.glob("sks_*.png"))
    reg_before = {p: p.read_bytes() for p in (demo_copy / "reg").glob("*.txt")}
    stars[0].with_suffix(".txt").unlink()
    stars[1].with_suffix(".txt").write_text("")
    stars[2].with_suffix(".txt").write_text("hand written\nsecond line\n")
    (demo_copy / "broken.png").write_bytes(b"not a png")
    calls = []

    report = caption_dataset(demo_copy, builtin, mode="fill", progress=lambda d, t: calls.append((d, t)))
    # fill: only the missing and the empty captions; the broken picture is reported, not fatal
    assert sorted(report.written) == ["sks_01.png", "sks_02.png"]
    assert [rel for rel, _ in report.failed] == ["broken.png"] and "broken.png" in report.summary()
    want = [f"a purple star on a {s.background} background" for s in world.demo_scenes()]
    assert [read_caption(stars[i]) for i in (0, 1)] == want[:2]
    assert stars[2].with_suffix(".txt").read_text() == "hand written\nsecond line\n"
    assert calls[0] == (0, 3) and calls[-1] == (3, 3)
    assert {p: p.read_bytes() for p in (demo_copy / "reg").glob("*.txt")} == reg_before  # reg left alone

    report = caption_dataset(demo_copy, builtin, mode="append", trigger="sks")
    assert read_caption(stars[2]) == f"sks, hand written, {want[2]}\nsecond line"
    assert read_caption(stars[3]) == f"a sks shape on a {world.demo_scenes()[3].background} background, {want[3]}"
    again = caption_dataset(demo_copy, builtin, mode="append", trigger="sks")
    assert again.written == [] and len(again.unchanged) == 12  # nothing twice

    caption_dataset(demo_copy, builtin, mode="overwrite", include_regularisation=True)
    assert [read_caption(p) for p in stars] == want[:2] + [want[2] + "\nsecond line"] + want[3:]
    for p in (demo_copy / "reg").glob("*.png"):  # reg pictures are seen pictures, captioned in full
        assert _truth(read_caption(p)) == _truth(reg_before[p.with_suffix(".txt")].decode())
    assert not list(demo_copy.rglob("*.tmp"))

    caption_dataset(demo_copy, builtin, mode="prepend")
    assert read_caption(stars[0]) == want[0]  # its own text, not repeated


class _Silent(Captioner):
    """A model that finds nothing to say (a tagger whose tags are all under its threshold)."""

    name = "silent"

    def caption(self, images):
        return ["" for _ in images]


def test_nothing_is_lost_to_an_empty_answer_or_a_shared_caption_file(tmp_path, builtin):
    world.render("circle", "red", "white").save(tmp_path / "a.png")
    world.render("square", "blue", "gray").save(tmp_path / "a.jpg")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "b.txt").write_text("mine")
    report = caption_dataset(tmp_path, _Silent(), mode="overwrite")
    assert report.written == [] and (tmp_path / "b.txt").read_text() == "mine"
    assert {rel for rel, _ in report.failed} == {"a.jpg", "a.png", "b.png"}
    report = caption_dataset(tmp_path, builtin, mode="fill")
    # a.jpg sorts first and owns a.txt; a.png is reported, not written over it
    assert report.written == ["a.jpg"] and read_caption(tmp_path / "a.png") == "a blue square on a gray background"
    assert [rel for rel, _ in report.failed] == ["a.png"] and "shares its caption file a.txt" in report.failed[0][1]


# --------------------------------------------------------------------------- captioners a person points at
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "on",
         "background", "picture", "of"]


@pytest.fixture(scope="module")
def image_to_text_folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny BLIP and a tiny GIT, random weights, saved as a person's download would be."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor)

    root = tmp_path_factory.mktemp("i2t")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(str(root / "vocab.txt"))
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    vision = dict(tiny, image_size=32, patch_size=8)
    ids = dict(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    blip = BlipForConditionalGeneration(BlipConfig(
        text_config=dict(tiny, vocab_size=len(VOCAB), max_position_embeddings=64, sep_token_id=3, **ids),
        vision_config=vision, projection_dim=32))
    blip.save_pretrained(root / "blip")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(root / "blip")
    git = GitForCausalLM(GitConfig(vision_config=vision, vocab_size=len(VOCAB), max_position_embeddings=64,
                                   **tiny, **ids))
    git.save_pretrained(root / "git")
    GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                 tokenizer=tokenizer).save_pretrained(root / "git")
    return {"blip": root / "blip", "git": root / "git"}


@pytest.mark.parametrize("kind", ["blip", "git"])
@pytest.mark.slow(seconds=10)
def test_transformers_image_to_text_folder_captions_offline(kind, image_to_text_folders, tmp_path):
    """The caption written is what the model itself generates for that picture (greedy),
    decoded without special tokens; loaded with local files only."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = image_to_text_folders[kind]
    data = tmp_path / "data"
    data.mkdir()
    pictures = [world.render("circle", "red", "blue"), world.render("square", "yellow", "black")]
    for i, picture in enumerate(pictures):
        picture.save(data / f"{i}.png")
    report = caption_dataset(data, folder, mode="overwrite", batch_size=1)
    assert report.written == ["0.png", "1.png"] and report.model == str(folder)

    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    for i, picture in enumerate(pictures):
        out = model.generate(**processor(images=[picture], return_tensors="pt"), max_new_tokens=75, do_sample=False)
        expected = " ".join(processor.batch_decode(out, skip_special_tokens=True)[0].split())
        assert expected and read_caption(data / f"{i}.png") == expected


@pytest.fixture(scope="module")
def florence2_folder(tmp_path_factory) -> Path:
    """A tiny Florence-2 (DaViT + BART), random weights, with its processor. A random model
    with tied embeddings repeats its decoder's start token; starting from a letter instead
    of </s> makes its caption non-empty."""
    import json

    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)

    root = tmp_path_factory.mktemp("florence2")
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + letters + ["\u0120" + c for c in letters])}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = BartTokenizer(str(root / "vocab.json"), str(root / "merges.txt"),
                              extra_special_tokens={"image_token": "<image>"})
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                         max_position_embeddings=128, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                         decoder_start_token_id=vocab["k"], forced_eos_token_id=2),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[32], num_heads=[2], num_groups=[2], window_size=4, projection_dim=32,
                           max_temporal_embeddings=4, max_position_embeddings=16),
        image_token_id=tokenizer.image_token_id))
    model.save_pretrained(root / "model")
    # 32 / 4 = 8 x 8 image tokens, plus the pooled one
    images = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False, image_seq_length=65)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(root / "model")
    return root / "model"


@pytest.mark.slow(seconds=5)
def test_florence2_folder_captions_with_its_task_token(florence2_folder, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    captioner = load_captioner(florence2_folder)
    assert captioner.prompt == "<DETAILED_CAPTION>"  # Florence-2 captions only when asked a task
    picture = world.render("circle", "red", "blue")
    (caption,) = captioner.caption([picture])
    model = AutoModelForImageTextToText.from_pretrained(florence2_folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(florence2_folder, local_files_only=True)
    inputs = processor(images=[picture], text=["<DETAILED_CAPTION>"], return_tensors="pt")
    # the processor turns the task token into its question (spelt with the tiny vocabulary's letters)
    assert "indetailwhatisshown" in processor.batch_decode(inputs["input_ids"])[0]
    out = model.generate(**inputs, max_new_tokens=75, do_sample=False)
    assert caption and caption == " ".join(processor.batch_decode(out, skip_special_tokens=True)[0].split())


# The tagger's tags: (name, category); scores from the tiny ONNX model below.
TAGS = [("general", 9), ("red_hair", 0), ("blue_sky", 0), ("^_^", 0), ("hatsune_miku", 4), ("other_girl", 4),
        ("white_border", 0)]


class _TinyTagger(torch.nn.Module):
    """NHWC BGR 0-255 in, one probability per tag out, as WD14 taggers: red_hair lights up
    when the picture is redder than blue, blue_sky the other way round (so reading RGB as
    BGR or 0-1 instead of 0-255 gives other tags), white_border when the top-left pixel is
    white (the padding of a picture that is not square); the rest are constants."""

    def forward(self, x):
        mean = x.mean(dim=(1, 2)) / 255.0  # B, G, R
        red_minus_blue = mean[:, 2] - mean[:, 0]
        one = torch.ones_like(red_minus_blue)
        return torch.stack([0.99 * one, torch.sigmoid(20 * red_minus_blue - 5), torch.sigmoid(-20 * red_minus_blue - 5),
                            0.5 * one, 0.9 * one, (CHARACTER_THRESHOLD - 0.05) * one,
                            torch.sigmoid(20 * x[:, 0, 0, :].mean(dim=1) / 255.0 - 10)], dim=1)


@pytest.fixture(scope="module")
def tagger_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wd14")
    torch.onnx.export(_TinyTagger(), (torch.zeros(1, 32, 32, 3),), str(folder / "model.onnx"), dynamo=False,
                      input_names=["input_1"], output_names=["predictions_sigmoid"],
                      dynamic_axes={"input_1": {0: "batch"}, "predictions_sigmoid": {0: "batch"}})
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + "".join(
        f"{i},{name},{category},{100 - i}\n" for i, (name, category) in enumerate(TAGS)))
    return folder


def test_wd14_tagger_threshold_categories_and_pixel_convention(tagger_folder, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    world.render("circle", "blue", "red").save(data / "red.png")
    world.render("circle", "red", "blue").resize((64, 40)).save(data / "blue.png")
    (data / "blue.txt").write_text("1girl")

    caption_dataset(data, tagger_folder, mode="append")
    # most probable first; rating never; a character only over CHARACTER_THRESHOLD; kaomoji keep "_"
    assert read_caption(data / "red.png") == "red hair, hatsune miku, ^_^"
    # padded with white to a square: a white border, and less blue (blue_sky 0.65)
    assert read_caption(data / "blue.png") == "1girl, white border, hatsune miku, blue sky, ^_^"
    caption_dataset(data, tagger_folder, mode="overwrite", threshold=0.6)
    assert read_caption(data / "red.png") == "red hair, hatsune miku"
    with pytest.raises(StudioError, match="outside"):
        caption_dataset(data, tagger_folder, threshold=1.5)


# --------------------------------------------------------------------------- bad input
def test_bad_model_folders_say_one_clear_line(tmp_path, tagger_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    no_tags = tmp_path / "no-tags"
    no_tags.mkdir()
    shutil.copy(tagger_folder / "model.onnx", no_tags / "model.onnx")
    cases = [(tmp_path / "missing", "is not a folder"), (empty, "holds no captioning model"),
             (bogus, "not an image-to-text model"), (no_tags, "no selected_tags.csv")]
    for model, message in cases:
        with pytest.raises(StudioError, match=message) as caught:
            load_captioner(model)
        assert "\n" not in str(caught.value)
    with pytest.raises(StudioError, match="WD14 tagger only"):
        load_captioner("builtin", threshold=0.5)


# --------------------------------------------------------------------------- CLI and the Datasets tab
def test_cli_dataset_caption(tmp_path, capsys, tagger_folder):
    from studio.cli import main

    folder = tmp_path / "ws" / "datasets" / "shapes"
    folder.mkdir(parents=True)
    for i, (shape, colour, background) in enumerate([("circle", "red", "white"), ("star", "purple", "gray")]):
        world.render(shape, colour, background).save(folder / f"{i}.png")
    capsys.readouterr()
    assert main(["dataset", "caption", "shapes", "--workspace", str(tmp_path / "ws")]) == 0
    out, err = capsys.readouterr()
    assert read_caption(folder / "0.png") == "a red circle on a white background"
    assert read_caption(folder / "1.png") == "a purple star on a gray background"
    assert "2 caption file(s) written" in out and "2/2" in err  # the progress bar is on stderr
    assert main(["dataset", "caption", str(folder), "--model", str(tagger_folder), "--mode", "prepend",
                 "--threshold", "0.6", "--trigger", "sks"]) == 0
    assert read_caption(folder / "0.png") == "sks, white border, hatsune miku, a red circle on a white background"
    capsys.readouterr()
    assert main(["dataset", "caption", str(folder), "--threshold", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WD14 tagger only" in err


def test_datasets_view_caption_action(demo_copy, tagger_folder):
    from ui import datasets_view as dv

    seen = []
    for p in demo_copy.glob("sks_*.txt"):
        p.unlink()
    # the slider's threshold always comes; only a tagger gets it
    note = dv.auto_caption(demo_copy, "builtin", "fill", 0.35, False, "sks", lambda share, desc: seen.append(share))
    assert "12 caption file(s) written" in note
    assert read_caption(demo_copy / "sks_01.png").startswith("sks, a purple star on a")
    assert seen[0] == 0.0 and seen[-1] == 1.0
    dv.auto_caption(demo_copy, str(tagger_folder), "overwrite", 0.6, False, "", lambda share, desc: None)
    assert read_caption(demo_copy / "sks_01.png") == "white border, hatsune miku"  # 0.6: without ^_^ (0.5)
    with pytest.raises(StudioError, match="is not a folder"):
        dv.auto_caption(demo_copy, "no/such/model", "fill", 0.35, False, "", lambda share, desc: None)


def test_the_training_script_writes_a_folder_the_product_loads(tmp_path):
    """toyworld/train_captioner.py at toy size: its folder loads with load_captioner, its
    record names the command and the figures, and the same seed gives the same weights."""
    from toyworld.train_captioner import main

    small = ["--bank", "64", "--steps", "3", "--batch", "8", "--eval-images", "16"]
    first = main(small + ["--out", str(tmp_path / "a")])
    main(small + ["--out", str(tmp_path / "b")])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    captioner = load_captioner(tmp_path / "a")
    assert captioner.heads == {"color": list(world.SHAPE_COLORS), "shape": list(world.SHAPES),
                               "background": list(world.BACKGROUNDS)}
    assert len(captioner.caption([world.render("star", "purple", "white")])[0].split()) == 7
    record = (tmp_path / "a" / "TRAINING.md").read_text()
    assert "python -m toyworld.train_captioner --bank 64" in record
    assert first["evaluation"]["demo_dataset"]["n"] == 36
