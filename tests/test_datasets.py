"""Datasets: import (folder / zip / files, zip safety), image loading, checks, items,
captions and stats. Every bad file is built here; nothing binary is committed."""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from studio.datasets import (
    MAX_CAPTION_BYTES,
    ImageLoadError,
    ZipLimits,
    add_prefix,
    add_suffix,
    add_trigger_word,
    check_dataset,
    dataset_stats,
    find_replace,
    import_dataset,
    list_datasets,
    load_items,
    open_image,
    read_caption,
    remove_tag,
    tag_frequency,
    training_items,
    write_caption,
)
from studio.errors import StudioError
from studio.workspace import Workspace

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.open(tmp_path / "ws")


def img(path: Path, size=(16, 16), color=RED, mode="RGB", fmt=None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt, **save)
    return path


def text(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def fake_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height with a tiny IDAT: costs bytes, not pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def png_bytes(size=(16, 16), color=RED) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def noisy_png(path: Path, size=(64, 64)) -> bytes:
    Image.frombytes("RGB", size, bytes((i * 7919) % 251 for i in range(size[0] * size[1] * 3))).save(path)
    return path.read_bytes()


def issue_kinds(report, path: str) -> set[str]:
    return {i.kind for i in report.issues if i.path == path}


# ----------------------------------------------------------------------------- import
def test_import_folder_keeps_kohya_layout_and_never_touches_originals(tmp_path, ws):
    src = tmp_path / "src"
    img(src / "a.png"); text(src / "a.txt", "top, image")
    img(src / "10_sks dog" / "b.jpg", fmt="JPEG"); text(src / "10_sks dog" / "b.txt", "sks dog")
    img(src / "reg" / "c.png")
    text(src / "notes.pdf", b"%PDF-1.4")
    text(src / ".DS_Store", b"\0\0")
    text(src / "orphan.txt", "no image here")
    before = checksums(src)

    report = import_dataset(src, "dogs", ws)

    dest = ws.dataset_dir("dogs")
    assert sorted(report.imported) == ["10_sks dog/b.jpg", "10_sks dog/b.txt", "a.png", "a.txt", "reg/c.png"]
    assert report.image_count == 3 and report.caption_count == 2
    reasons = {Path(s.source).name: s.reason for s in report.skipped}
    assert "not an image" in reasons["notes.pdf"]
    assert "without a matching image" in reasons["orphan.txt"]
    assert "hidden" in reasons[".DS_Store"]
    assert (dest / "10_sks dog" / "b.txt").read_text() == "sks dog"
    assert (dest / "a.png").read_bytes() == (src / "a.png").read_bytes()
    assert checksums(src) == before
    assert not list(dest.rglob("*.tmp")) and not list(dest.rglob(".*"))
    assert "Imported 3 images and 2 captions" in report.summary()
    json.dumps(report.to_dict())


def test_import_source_folder_named_like_a_subset_keeps_its_repeats(tmp_path, ws):
    img(tmp_path / "5_cat" / "x.png")
    import_dataset(tmp_path / "5_cat", "cats", ws)
    items = load_items(ws.dataset_dir("cats"))
    assert [(i.path.name, i.repeats) for i in items] == [("x.png", 5)]


def test_import_modes_new_add_overwrite(tmp_path, ws):
    src = tmp_path / "src"
    img(src / "a.png", color=RED)
    import_dataset(src, "d", ws)
    dest = ws.dataset_dir("d")

    with pytest.raises(StudioError, match="already exists.*mode 'add'"):
        import_dataset(src, "d", ws)

    img(src / "a.png", color=BLUE)
    img(src / "b.png")
    added = import_dataset(src, "d", ws, mode="add")
    assert added.imported == ["b.png"]
    assert any("already exists" in s.reason for s in added.skipped)
    assert Image.open(dest / "a.png").getpixel((0, 0)) == RED  # not overwritten

    over = import_dataset(src, "d", ws, mode="overwrite")
    assert sorted(over.replaced) == ["a.png", "b.png"]
    assert Image.open(dest / "a.png").getpixel((0, 0)) == BLUE

    with pytest.raises(StudioError, match="Unknown import mode"):
        import_dataset(src, "d", ws, mode="merge")  # type: ignore[arg-type]
    with pytest.raises(StudioError, match="Invalid dataset name"):
        import_dataset(src, "../escape", ws)
    with pytest.raises(StudioError, match="does not exist"):
        import_dataset(tmp_path / "nope", "e", ws)


def test_import_file_list_brings_sibling_captions(tmp_path, ws):
    a = img(tmp_path / "pics" / "a.png"); text(tmp_path / "pics" / "a.txt", "cap a")
    b = img(tmp_path / "pics" / "b.webp", fmt="WEBP")
    report = import_dataset([a, b], "files", ws)
    assert sorted(report.imported) == ["a.png", "a.txt", "b.webp"]
    assert read_caption(ws.dataset_dir("files") / "a.png") == "cap a"


def test_names_differing_only_by_case_never_overwrite(tmp_path, ws):
    src = tmp_path / "src"
    img(src / "A.png", color=RED)
    img(src / "a.png", color=BLUE)
    img(src / "10_Dog" / "x.png"); img(src / "10_dog" / "y.png")
    report = import_dataset(src, "case", ws)
    dest = ws.dataset_dir("case")
    assert "A.png" in report.imported and "a.png" not in report.imported
    assert any("differs only by case" in s.reason for s in report.skipped)
    assert Image.open(dest / "A.png").getpixel((0, 0)) == RED
    # both folders land in one (the first spelling), as they would on a case-insensitive disk
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png")) == [
        "10_Dog/x.png", "10_Dog/y.png", "A.png"]

    img(tmp_path / "more" / "a.PNG", color=BLUE)
    added = import_dataset(tmp_path / "more", "case", ws, mode="add")
    assert added.imported == [] and "already exists" in added.skipped[0].reason
    assert Image.open(dest / "A.png").getpixel((0, 0)) == RED


def test_import_zip_strips_single_root_folder(tmp_path, ws):
    zpath = tmp_path / "set.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("myset/10_sks/a.png", png_bytes())
        zf.writestr("myset/10_sks/a.txt", "sks")
        zf.writestr("myset/b.png", png_bytes())
        zf.writestr("__MACOSX/myset/._b.png", b"junk")
    before = zpath.read_bytes()
    report = import_dataset(zpath, "z", ws)
    assert sorted(report.imported) == ["10_sks/a.png", "10_sks/a.txt", "b.png"]
    assert any("hidden" in s.reason for s in report.skipped)
    assert zpath.read_bytes() == before
    assert [i.repeats for i in load_items(ws.dataset_dir("z"))] == [10, 1]


def test_zip_members_escaping_the_dataset_are_skipped(tmp_path, ws):
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("good.png", png_bytes())
        zf.writestr("../evil.png", png_bytes())
        zf.writestr("sub/../../evil2.png", png_bytes())
        zf.writestr("/abs_evil.png", png_bytes())
        zf.writestr("C:/drive_evil.png", png_bytes())
        zf.writestr("..\\back_evil.png", png_bytes())
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "../../../../etc/passwd")
    assert "/abs_evil.png" in zipfile.ZipFile(zpath).namelist()  # the archive really holds it

    report = import_dataset(zpath, "safe", ws)

    assert report.imported == ["good.png"]
    reasons = {s.source.split(":", 1)[1]: s.reason for s in report.skipped}
    assert "'..'" in reasons["../evil.png"] and "'..'" in reasons["sub/../../evil2.png"]
    assert "absolute" in reasons["/abs_evil.png"] and "absolute" in reasons["C:/drive_evil.png"]
    assert "'..'" in reasons["..\\back_evil.png"]
    assert "symbolic link" in reasons["link.png"]
    written = [p for p in tmp_path.rglob("*") if "evil" in p.name and p != zpath]
    assert written == []
    assert not (ws.dataset_dir("safe") / "link.png").exists()
    assert not any(p.is_symlink() for p in ws.root.rglob("*"))


def test_zip_bomb_ratio_member_skipped(tmp_path, ws):
    zpath = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.png", b"\0" * (2 * 1024 * 1024))  # ~1000:1
        zf.writestr("ok.png", png_bytes())
    report = import_dataset(zpath, "b", ws)
    assert report.imported == ["ok.png"]
    assert "compression ratio" in report.skipped[0].reason
    assert not (ws.dataset_dir("b") / "bomb.png").exists()


def test_zip_total_size_and_count_limits_refuse_before_writing(tmp_path, ws):
    zpath = tmp_path / "big.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(3):
            zf.writestr(f"{i}.png", png_bytes())
    with pytest.raises(StudioError, match="would unpack to"):
        import_dataset(zpath, "big", ws, zip_limits=ZipLimits(max_total_bytes=100))
    with pytest.raises(StudioError, match="3 entries, over the limit of 2"):
        import_dataset(zpath, "big", ws, zip_limits=ZipLimits(max_members=2))
    assert not ws.dataset_dir("big").exists()
    bad = text(tmp_path / "bad.zip", b"not a zip")
    with pytest.raises(StudioError, match="not a readable zip"):
        import_dataset(bad, "bad", ws)


# ----------------------------------------------------------------------------- open_image
def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (4, 1))
    for x, v in enumerate((0, 25700, 32768, 65535)):
        im.putpixel((x, 0), v)
    im.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    out = open_image(tmp_path / "g16.png")
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 100, 128, 255]


def test_cmyk_palette_and_alpha_become_rgb(tmp_path):
    img(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0), fmt="JPEG", quality=95)
    r, g, b = open_image(tmp_path / "cmyk.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60

    pal = Image.new("RGB", (8, 8), BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    assert open_image(tmp_path / "pal.png").getpixel((0, 0)) == BLUE

    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "alpha.png")
    out = open_image(tmp_path / "alpha.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == RED

    img(tmp_path / "la.png", mode="LA", color=(0, 0))
    assert open_image(tmp_path / "la.png").getpixel((0, 0)) == WHITE

    report = check_dataset(tmp_path)
    converted = {i.path: i.message for i in report.issues if i.kind == "converted"}
    assert "CMYK -> RGB" in converted["cmyk.jpg"]
    assert "palette -> RGB" in converted["pal.png"]
    assert "composited on white" in converted["alpha.png"]


def test_exif_orientation_is_applied_to_pixels(tmp_path):
    im = Image.new("RGB", (32, 16), RED)
    im.paste(BLUE, (16, 0, 32, 16))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)

    out = open_image(tmp_path / "rot.jpg")
    assert out.size == (16, 32)
    top, bottom = out.getpixel((8, 4)), out.getpixel((8, 28))
    assert top[0] > 200 and top[2] < 60      # the left (red) edge is now on top
    assert bottom[2] > 200 and bottom[0] < 60

    report = check_dataset(tmp_path)
    assert "orientation 6" in next(i.message for i in report.issues if i.kind == "exif_rotated")


def test_broken_images_raise_clear_errors(tmp_path):
    text(tmp_path / "empty.png", b"")
    text(tmp_path / "garbage.jpg", b"this is not a jpeg at all" * 10)
    data = noisy_png(tmp_path / "full.png")
    text(tmp_path / "cut.png", data[: len(data) // 2])
    Image.open(tmp_path / "full.png").save(tmp_path / "full.jpg", quality=95)
    jpg = (tmp_path / "full.jpg").read_bytes()
    text(tmp_path / "cut.jpg", jpg[: len(jpg) // 2])    # cut in the image data
    text(tmp_path / "head.jpg", jpg[:100])              # cut in the header

    kinds = {}
    for name in ("empty.png", "garbage.jpg", "cut.png", "cut.jpg", "head.jpg"):
        with pytest.raises(ImageLoadError) as info:
            open_image(tmp_path / name)
        kinds[name] = info.value.kind
        assert str(tmp_path / name) in str(info.value)
    assert kinds == {"empty.png": "empty_file", "garbage.jpg": "unreadable",
                     "cut.png": "truncated", "cut.jpg": "truncated", "head.jpg": "truncated"}
    assert isinstance(ImageLoadError("x", kind="k", path=Path()), StudioError)

    report = check_dataset(tmp_path)  # reported, not raised
    assert sorted(report.ok) == ["full.jpg", "full.png"]
    assert {i.path: i.kind for i in report.errors} == kinds
    assert [i.path.name for i in load_items(tmp_path)] == ["full.jpg", "full.png"]


def test_decompression_bombs_are_refused_cheaply(tmp_path):
    text(tmp_path / "bomb.png", fake_png(50_000, 50_000))
    text(tmp_path / "big.png", fake_png(5_000, 5_000))
    start = time.perf_counter()
    with pytest.raises(ImageLoadError) as pil_limit:
        open_image(tmp_path / "bomb.png")
    with pytest.raises(ImageLoadError, match="5000x5000") as our_limit:
        open_image(tmp_path / "big.png", max_pixels=1_000_000)
    assert time.perf_counter() - start < 2.0
    assert pil_limit.value.kind == our_limit.value.kind == "decompression_bomb"

    report = check_dataset(tmp_path, max_pixels=1_000_000)
    assert set(report.paths("decompression_bomb")) == {"big.png", "bomb.png"}
    assert report.ok == []


# ----------------------------------------------------------------------------- check_dataset
def test_check_dataset_reports_everything_and_changes_nothing(tmp_path):
    ds = tmp_path / "ds"
    img(ds / "ok.png", size=(64, 64)); text(ds / "ok.txt", "fine, caption")
    img(ds / "small.png", size=(8, 8)); text(ds / "small.txt", "tiny")
    img(ds / "nocap.png", size=(64, 64))
    img(ds / "emptycap.png", size=(64, 64)); text(ds / "emptycap.txt", "  \n")
    img(ds / "latin.png", size=(64, 64)); text(ds / "latin.txt", "caf\xe9, na\xefve".encode("cp1252"))
    img(ds / "bom.png", size=(64, 64)); text(ds / "bom.txt", b"\xef\xbb\xbfsks, dog")
    img(ds / "huge.png", size=(64, 64)); text(ds / "huge.txt", "tag, " * 400)
    img(ds / "multi.png", size=(64, 64)); text(ds / "multi.txt", "first line\nsecond line")
    text(ds / "zero.png", b"")
    text(ds / "lonely.txt", "no image")
    text(ds / "model.safetensors", b"\0" * 8)
    img(ds / "photos" / "x.png")
    img(ds / "3_cat" / "deeper" / "y.png")
    before = checksums(ds)

    report = check_dataset(ds, resolution=32)

    assert checksums(ds) == before
    assert report.image_count == 9 and "zero.png" not in report.ok and len(report.ok) == 8
    assert report.paths("empty_file") == ["zero.png"]
    assert report.paths("too_small") == ["small.png"]
    assert report.paths("missing_caption") == ["nocap.png"]
    assert report.paths("empty_caption") == ["emptycap.txt"]
    assert sorted(report.paths("caption_not_utf8")) == ["bom.txt", "latin.txt"]
    assert "cp1252" in next(i.message for i in report.issues if i.path == "latin.txt")
    assert report.paths("huge_caption") == ["huge.txt"]
    assert report.paths("multiline_caption") == ["multi.txt"]
    assert report.paths("caption_without_image") == ["lonely.txt"]
    assert report.paths("non_image") == ["model.safetensors"]
    assert sorted(report.paths("ignored_folder")) == ["3_cat/deeper", "photos"]
    assert "'1_photos'" in next(i.message for i in report.issues if i.path == "photos")
    assert issue_kinds(report, "ok.png") == set()
    assert [i.path for i in report.errors] == ["zero.png"]

    data = json.loads(json.dumps(report.to_dict()))
    assert data["counts"]["missing_caption"] == 1 and data["unusable"] == 1
    summary = report.summary()
    assert summary.splitlines()[0].startswith("ds: 9 images, 8 usable") and "1 empty file" in summary
    with pytest.raises(StudioError, match="does not exist"):
        check_dataset(tmp_path / "missing")



def test_size_is_a_problem_only_below_the_training_resolution(tmp_path):
    from studio.config import DEMO_DATASET

    img(tmp_path / "a.png", size=(64, 64)); text(tmp_path / "a.txt", "sks")
    assert check_dataset(tmp_path).issues == []
    assert check_dataset(tmp_path, resolution=64).issues == []
    report = check_dataset(tmp_path, resolution=512)
    assert report.paths("too_small") == ["a.png"] and "512 px training resolution" in report.issues[0].message
    # the demo's 64-px pictures are right for the 64-px built-in model: nothing to warn about
    assert check_dataset(DEMO_DATASET).warnings == []


def test_training_items_says_what_training_skips_and_why(tmp_path):
    img(tmp_path / "good.png", size=(64, 64)); text(tmp_path / "good.txt", "sks, star\nsecond line")
    text(tmp_path / "notes.png", "this is a text file with an image's name")
    img(tmp_path / "big.png", size=(64, 64)); text(tmp_path / "big.txt", b"x" * (MAX_CAPTION_BYTES + 1))
    items, skipped = training_items(tmp_path)
    assert [(i.path.name, i.caption) for i in items] == [("good.png", "sks, star")]
    assert {(s.path, s.kind) for s in skipped} == {("notes.png", "unreadable"), ("big.png", "huge_caption")}
    assert [i.path for i in load_items(tmp_path)] == [i.path for i in items]

def test_read_caption_falls_back_for_non_utf8(tmp_path):
    text(tmp_path / "a.txt", "caf\xe9, na\xefve\n".encode("cp1252"))
    text(tmp_path / "b.txt", b"\xef\xbb\xbfsks, dog")
    text(tmp_path / "c.txt", "sks, m\u00fcnchen".encode("utf-16"))
    assert read_caption(tmp_path / "a.png") == "caf\xe9, na\xefve"
    assert read_caption(tmp_path / "b.txt") == "sks, dog"
    assert read_caption(tmp_path / "c.png") == "sks, m\u00fcnchen"
    assert read_caption(tmp_path / "missing.png") == ""


def test_write_caption_is_atomic_utf8(tmp_path):
    target = write_caption(tmp_path / "a.png", "  caf\xe9, dog \n")
    assert target == tmp_path / "a.txt"
    assert target.read_bytes() == "caf\xe9, dog".encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# ----------------------------------------------------------------------------- items, stats
def make_kohya(root: Path) -> Path:
    img(root / "top.png"); text(root / "top.txt", "Top, Solo")
    img(root / "10_sks dog" / "b.png"); text(root / "10_sks dog" / "b.txt", "sks dog, Solo, solo\nignored")
    img(root / "10_sks dog" / "a.png")
    img(root / "2_other" / "c.png"); text(root / "2_other" / "c.txt", "other")
    img(root / "reg" / "r1.png"); text(root / "reg" / "r1.txt", "a dog")
    img(root / "reg" / "4_dog" / "r2.png")
    img(root / "3_reg" / "r3.png")
    text(root / "10_sks dog" / "broken.png", b"garbage")
    return root


def test_load_items_parses_repeats_reg_and_is_sorted(tmp_path, caplog):
    ds = make_kohya(tmp_path / "k")
    items = load_items(ds)
    got = [(i.path.relative_to(ds).as_posix(), i.repeats, i.is_regularisation, i.caption) for i in items]
    assert got == [
        ("10_sks dog/a.png", 10, False, ""),
        ("10_sks dog/b.png", 10, False, "sks dog, Solo, solo"),
        ("2_other/c.png", 2, False, "other"),
        ("3_reg/r3.png", 3, True, ""),
        ("reg/4_dog/r2.png", 4, True, ""),
        ("reg/r1.png", 1, True, "a dog"),
        ("top.png", 1, False, "Top, Solo"),
    ]
    assert items[0].subset == "10_sks dog" and items[-1].subset == "k" and items[0].size == (16, 16)
    assert "broken.png" in caplog.text


def test_dataset_stats_and_kohya_metadata(tmp_path):
    ds = make_kohya(tmp_path / "k")
    stats = dataset_stats(ds, load_items(ds))
    assert stats.image_count == 4 and stats.reg_image_count == 3
    assert stats.steps_per_epoch == 2 * 10 + 1 * 2 + 1 * 1
    assert stats.samples_per_epoch == 2 * stats.steps_per_epoch
    assert stats.ss_dataset_dirs == {
        "k": {"n_repeats": 1, "img_count": 1},
        "10_sks dog": {"n_repeats": 10, "img_count": 2},
        "2_other": {"n_repeats": 2, "img_count": 1},
    }
    assert stats.ss_reg_dataset_dirs == {"reg": {"n_repeats": 1, "img_count": 1},
                                         "4_dog": {"n_repeats": 4, "img_count": 1},
                                         "3_reg": {"n_repeats": 3, "img_count": 1}}
    assert stats.ss_tag_frequency["10_sks dog"] == {"sks dog": 1, "solo": 2}  # kohya: lower-cased
    assert stats.ss_tag_frequency["k"] == {"top": 1, "solo": 1}
    relative = dataset_stats(Path(os.path.relpath(ds)), load_items(ds))  # same folder, spelled differently
    assert relative.ss_dataset_dirs == stats.ss_dataset_dirs
    # without items every image file counts (the broken one too)
    assert dataset_stats(ds).ss_dataset_dirs["10_sks dog"]["img_count"] == 3
    json.dumps(stats.to_dict())


def test_list_datasets(tmp_path, ws):
    img(tmp_path / "s" / "a.png")
    import_dataset(tmp_path / "s", "beta", ws)
    import_dataset(tmp_path / "s", "Alpha", ws)
    (ws.datasets_dir / ".trash").mkdir()
    assert list_datasets(ws) == ["Alpha", "beta"]


# ----------------------------------------------------------------------------- bulk captions
def caption_set(root: Path) -> Path:
    img(root / "a.png"); text(root / "a.txt", "dog, grass, Dog")
    img(root / "b.png"); text(root / "b.txt", "sks, dog")
    img(root / "c.png"); text(root / "c.txt", "cat,   sks")
    img(root / "d.png")
    img(root / "reg" / "r.png"); text(root / "reg" / "r.txt", "dog")
    return root


def caps(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.txt"))}


def test_add_trigger_word(tmp_path):
    ds = caption_set(tmp_path / "ds")
    assert add_trigger_word(ds, "sks") == 3
    assert caps(ds) == {"a.txt": "sks, dog, grass, Dog", "b.txt": "sks, dog", "c.txt": "sks, cat",
                        "d.txt": "sks", "reg/r.txt": "dog"}
    assert add_trigger_word(ds, "sks") == 0
    with pytest.raises(StudioError, match="comma"):
        add_trigger_word(ds, "a, b")


@pytest.mark.parametrize("caption, expected", [
    ("sks,dog", "sks,dog"),                        # the first tag is the trigger: as it is
    ("a sks shape on white", "a sks shape on white"),  # a whole word of the first tag
    ("sksy dog", "sks, sksy dog"),                 # not a whole word
    ("dog, sks", "sks, dog"),                      # a later tag moves to the front
    ("dog", "sks, dog"),
    ("", "sks"),
])
def test_one_trigger_word_rule_for_the_bulk_edit_and_the_trainer(caption, expected, tmp_path):
    from studio.datasets import caption_with_trigger
    from tests.conftest import demo_config
    from trainers.trainer import AdapterTrainer

    assert caption_with_trigger(caption, "sks") == expected
    config = demo_config()
    config.dataset.trigger_word, config.dataset.instance_prompt = "sks", ""
    trainer = AdapterTrainer(tmp_path, config)
    assert trainer.caption(caption) == expected
    (tmp_path / "ds").mkdir()
    Image.new("RGB", (64, 64), "white").save(tmp_path / "ds" / "a.png")
    (tmp_path / "ds" / "a.txt").write_text(caption)
    add_trigger_word(tmp_path / "ds", "sks")
    assert (tmp_path / "ds" / "a.txt").read_text() == expected


def test_remove_tag_is_exact(tmp_path):
    ds = caption_set(tmp_path / "ds")
    before = caps(ds)
    assert remove_tag(ds, "dog") == 2
    after = caps(ds)
    assert after["a.txt"] == "grass, Dog" and after["b.txt"] == "sks"
    assert after["c.txt"] == before["c.txt"] and after["reg/r.txt"] == "dog"
    assert remove_tag(ds, "dog", include_regularisation=True) == 1
    assert caps(ds)["reg/r.txt"] == ""


def test_find_replace_plain_and_regex(tmp_path):
    ds = caption_set(tmp_path / "ds")
    assert find_replace(ds, "dog", "puppy") == 2
    assert caps(ds)["a.txt"] == "puppy, grass, Dog"
    assert find_replace(ds, "DOG", "hound", case_sensitive=False) == 1
    assert caps(ds)["a.txt"] == "puppy, grass, hound"
    assert find_replace(ds, r"(\w+),\s+sks", r"sks, \1", regex=True) == 1
    assert caps(ds)["c.txt"] == "sks, cat"
    assert find_replace(ds, ".", "!") == 0  # plain text: '.' is not a wildcard
    before = caps(ds)
    with pytest.raises(StudioError, match="Invalid regular expression"):
        find_replace(ds, "(unclosed", "x", regex=True)
    with pytest.raises(StudioError, match="Invalid replacement"):
        find_replace(ds, "sks", r"\3", regex=True)
    assert caps(ds) == before


def test_prefix_suffix_and_tag_frequency(tmp_path):
    ds = caption_set(tmp_path / "ds")
    assert tag_frequency(ds) == {"dog": 2, "sks": 2, "Dog": 1, "cat": 1, "grass": 1}
    assert add_prefix(ds, "photo") == 4
    assert add_prefix(ds, "photo") == 0
    assert add_suffix(ds, "hd", separator=" ") == 4
    got = caps(ds)
    assert got["b.txt"] == "photo, sks, dog hd" and got["d.txt"] == "photo hd"
    assert got["reg/r.txt"] == "dog"
    assert tag_frequency(ds)["dog"] == 1  # "dog hd" in b.txt is now another tag
    assert tag_frequency(ds, include_regularisation=True)["dog"] == 2
