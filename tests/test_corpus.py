"""The bad-input corpus, built here (nothing binary is committed): broken and odd images,
captions, zips, adapter files, configs and prompts. Each gets its clear message from the
CLI (exit 2 and one line for errors; the report for `dataset check`) and from the running
server's handlers (dataset import, library import, settings check, generate), the server
keeps answering, and no input file is changed."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import demo_config
from tests.test_datasets import fake_png
from tests.live_server import ROOT, Api, running_server

pytestmark = pytest.mark.slow

CAPTION_LIMIT = 1024 * 1024
UPLOAD_LIMIT_MB = 8
MIX_CAP = 16
GRID_CAP = 100


# ----------------------------------------------------------------------------- the corpus
def _png(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save)
    return buf.getvalue()


def _jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save)
    return buf.getvalue()


def _noise(size=(64, 64)) -> Image.Image:
    return Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))


def _images(folder: Path) -> None:
    folder.mkdir(parents=True)
    rotated = Image.new("RGB", (32, 16), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    alpha = Image.new("RGBA", (32, 32), (0, 0, 255, 255))
    alpha.paste((0, 0, 255, 90), (0, 0, 16, 32))
    truncated = _png(_noise())
    files = {
        "zero.png": b"",
        "truncated.png": truncated[: len(truncated) // 2],
        "garbage.jpg": os.urandom(3000),
        "bomb.png": fake_png(60_000, 60_000),
        "deep16.png": _png(Image.new("I;16", (32, 32), 40_000)),
        "cmyk.jpg": _jpeg(Image.new("CMYK", (32, 32), (0, 200, 200, 0))),
        "palette.png": _png(Image.new("RGB", (32, 32), (10, 200, 10)).convert("P")),
        "alpha.png": _png(alpha),
        "rotated.jpg": _jpeg(rotated, exif=exif.tobytes()),
        "Case.png": _png(Image.new("RGB", (32, 32), (1, 2, 3))),
        "case.png": _png(Image.new("RGB", (32, 32), (3, 2, 1))),
        "huge.png": _png(Image.new("RGB", (32, 32), (9, 9, 9))),
        "huge.txt": b"tag, " * (CAPTION_LIMIT // 5 + 10),
        "long.png": _png(Image.new("RGB", (32, 32), (8, 8, 8))),
        "long.txt": ("word " * 300).encode(),
        "latin.png": _png(Image.new("RGB", (32, 32), (7, 7, 7))),
        "latin.txt": "café, naïve, crème brûlée".encode("cp1252"),
        "fake.png": b"just some text, not a picture\n",
        "fake.txt": b"the caption of a fake picture",
        "page.webp": b"<html><body>a web page saved with the wrong name</body></html>",
        "doc.pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _zips(folder: Path) -> None:
    ok = _png(Image.new("RGB", (32, 32), (0, 120, 0)))
    with zipfile.ZipFile(folder / "unsafe.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.png", ok)
        zf.writestr("../evil-dots.png", ok)
        zf.writestr("/abs/evil-abs.png", ok)
        link = zipfile.ZipInfo("evil-link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("flat.png", b"\0" * (4 * 1024**2))  # ratio ~1000:1
    with zipfile.ZipFile(folder / "declared.zip", "w", zipfile.ZIP_STORED) as zf:
        for index in range(3):
            zf.writestr(f"big{index}.png", ok)
    data = bytearray((folder / "declared.zip").read_bytes())
    at = data.find(b"PK\x01\x02")
    while at != -1:  # central directory: each member now claims ~4 GiB uncompressed
        data[at + 24: at + 28] = struct.pack("<I", 0xFFFFFFFE)
        at = data.find(b"PK\x01\x02", at + 4)
    (folder / "declared.zip").write_bytes(bytes(data))
    (folder / "garbage.zip").write_bytes(b"PK\x03\x04" + os.urandom(500))

    # members that cannot be read, each in its own way; ok.png must still be imported
    with zipfile.ZipFile(folder / "damaged.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.png", ok)
        for name in ("badblock.png", "badcrc.png", "deflate64.png", "ppmd.png", "zstd.png"):
            zf.writestr(name, _png(_noise()))
        for name in ("bzip2.png", "lzma.png"):
            zf.writestr(name, os.urandom(3000), zipfile.ZIP_STORED)
    _patch_member(folder / "damaged.zip", "badblock.png", first_data_byte=0x07)  # deflate block type 3: invalid
    _patch_member(folder / "damaged.zip", "badcrc.png", crc=0x12345678)
    for name, method in (("deflate64.png", 9), ("ppmd.png", 98), ("zstd.png", 93), ("bzip2.png", 12),
                         ("lzma.png", 14)):
        _patch_member(folder / "damaged.zip", name, method=method)

    with zipfile.ZipFile(folder / "longnames.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for name in LONG_NAMES_KEPT + LONG_NAMES_SKIPPED:
            zf.writestr(name, ok)

    with zipfile.ZipFile(folder / "toomany.zip", "w", zipfile.ZIP_STORED) as zf:
        tiny = _png(Image.new("RGB", (8, 8), (1, 1, 1)))
        for index in range(IMPORT_CAP + 1):
            zf.writestr(f"{index:05d}.png", tiny)


def _patch_member(path: Path, member: str, *, method: int | None = None, crc: int | None = None,
                  first_data_byte: int | None = None) -> None:
    """Rewrite one member's headers (compression method, CRC) or its first data byte."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    data = bytearray(path.read_bytes())
    local = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[local + 26: local + 30])
    central = data.find(b"PK\x01\x02" + data[local + 4: local + 6])  # same version-needed field
    while data[central + 46: central + 46 + len(member)] != member.encode():
        central = data.find(b"PK\x01\x02", central + 4)
    if method is not None:
        data[local + 8: local + 10] = data[central + 10: central + 12] = struct.pack("<H", method)
    if crc is not None:
        data[local + 14: local + 18] = data[central + 16: central + 20] = struct.pack("<I", crc)
    if first_data_byte is not None:
        data[local + 30 + name_len + extra_len] = first_data_byte
    path.write_bytes(bytes(data))


def _special(folder: Path) -> None:
    """Things in a folder that are not files: reading a FIFO would block forever."""
    import socket

    folder.mkdir(parents=True)
    (folder / "ok.png").write_bytes(_png(Image.new("RGB", (32, 32), (0, 90, 0))))
    os.mkfifo(folder / "fifo.png")
    os.mkfifo(folder / "fifo.txt")
    os.mkfifo(folder / "fifo.zip")
    os.symlink(folder / "fifo.png", folder / "link-to-fifo.jpg")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "socket.png"))
    (folder / "dir.toml").mkdir()
    (folder / "dir.safetensors").mkdir()
    (folder / "dir.zip").mkdir()


def _numbers(folder: Path) -> None:
    """Datasets whose folder names carry absurd repeat counts."""
    image = _png(Image.new("RGB", (32, 32), (5, 5, 200)))
    for name in REPEAT_FOLDERS:
        (folder / "repeats" / name).mkdir(parents=True)
        (folder / "repeats" / name / "star.png").write_bytes(image)


def _adapters(folder: Path, good: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True)
    tensors = load_file(good)
    with safe_open(good, "pt") as handle:
        metadata = handle.metadata()
    up = next(k for k in sorted(tensors) if k.endswith("lora_up.weight"))
    down = up.replace("lora_up", "lora_down")
    save_file({**tensors, up: torch.full_like(tensors[up], float("nan"))}, folder / "nans.safetensors", metadata)
    rank, width = tensors[down].shape
    save_file({**tensors, down: torch.zeros(rank + 3, width)}, folder / "ranks.safetensors", metadata)
    save_file({**tensors, down: torch.zeros(rank, width + 5)}, folder / "othermodel.safetensors", metadata)
    data = good.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "pickled.safetensors").write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
    torch.save({"w": torch.zeros(2)}, folder / "torchzip.safetensors")
    (folder / "hugeheader.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    (folder / "notjson.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    header = json.dumps({"a": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (folder / "badentry.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    tensor = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    for name, header in {
        "metalist": {"__metadata__": ["ss_network_dim", "8"], "a": tensor},
        "metastring": {"__metadata__": "ss_network_dim=8", "a": tensor},
        "metanested": {"__metadata__": {"ss_network_dim": {"value": 8}}, "a": tensor},
        "shapesize": {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4]}},
        "floatoffsets": {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.5]}},
    }.items():
        raw = json.dumps(header).encode()
        (folder / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    (folder / "text.safetensors").write_bytes(b"This is a README, saved under the wrong name.\n" * 3)


CONFIGS = {
    "wrongtype.toml": ('[network]\nrank = "eight"\n', "network.rank: Input should be a valid integer"),
    "range.toml": ("[training]\nlearning_rate = 5.0\n",
                   "training.learning_rate: Input should be less than or equal to 1"),
    "multiple.toml": ("[dataset]\nresolution = 65\n", "dataset.resolution: Input should be a multiple of 8"),
    "typo.toml": ("[training]\nlearnin_rate = 0.1\n", "training.learnin_rate: Extra inputs are not permitted"),
    "broken.toml": ('name = "unclosed\n', "is not valid TOML"),
    "latin.toml": ('name = "caf\xe9"\n'.encode("latin-1"), "is not valid TOML"),
    "badname.toml": ('name = "../evil"\n', "Invalid adapter name '../evil'"),
    "tlora.toml": ('[network]\ntype = "tlora"\nrank = 4\ntlora_min_rank = 8\n', "must not exceed rank (4)"),
    "infdecay.toml": ("[training]\nweight_decay = inf\n", "training.weight_decay: Input should be a finite number"),
    "nansteps.toml": ("[training]\nmax_steps = nan\n", "training.max_steps: Input should be a finite number"),
    "hugedecay.toml": ("[training]\nweight_decay = 1e300\n", "training.weight_decay: Input should be less than"),
    "nanepsilon.toml": ("[training]\nadam_epsilon = nan\n", "training.adam_epsilon: Input should be a finite number"),
    "negseed.toml": ("[sampling]\nseed = -1\n", "sampling.seed: Input should be greater than or equal to 0"),
    "badset.toml": ('[dataset]\nname = "../x"\n', "dataset.name: Invalid dataset name '../x'"),
    "several.toml": ("[training]\nmax_steps = -5\nlearning_rate = inf\n[dataset]\nresolution = 65\n",
                     "dataset.resolution: Input should be a multiple of 8; training.max_steps: Input should be "
                     "greater than or equal to 1; training.learning_rate: Input should be a finite number"),
}

ADAPTER_ERRORS = {
    "pickled.safetensors": "is a pickle (pickle stream) although its name ends in .safetensors",
    "torchzip.safetensors": "is a pickle (torch zip archive)",
    "hugeheader.safetensors": "its header claims 1099511627776 bytes",
    "notjson.safetensors": "its header is not valid JSON",
    "badentry.safetensors": "the entry for tensor 'a' is malformed",
    "truncated.safetensors": "is truncated",
    "nans.safetensors": "contains NaN or infinite values",
    "ranks.safetensors": "the ranks of lora_down and lora_up differ",
    "metalist.safetensors": "its __metadata__ must be a JSON object of text values, but it is a list",
    "metastring.safetensors": "its __metadata__ must be a JSON object of text values, but it is a string",
    "metanested.safetensors": "but it is an object with values that are not text",
    "shapesize.safetensors": "the entry for tensor 'a' is malformed",
    "floatoffsets.safetensors": "the entry for tensor 'a' is malformed",
    "text.safetensors": "is not a valid safetensors file: its header cannot be read",
}

# what `dataset check` (and the page's problem table) says about each imported file
IMAGE_FINDINGS = {
    "deep16.png": "16-bit grayscale -> 8-bit RGB",
    "cmyk.jpg": "CMYK -> RGB",
    "palette.png": "palette -> RGB",
    "alpha.png": "RGBA with transparency -> RGB (alpha composited on white)",
    "rotated.jpg": "EXIF orientation 6 applied (rotated 90° clockwise)",
    "long.txt": "1499 characters; the text encoder sees at most 225 tokens",
    "latin.txt": "not UTF-8; read as cp1252",
}
IMPORT_SKIPS = {  # file -> why the import skipped it (images are decoded as training will)
    "huge.txt": f"over the {CAPTION_LIMIT}-byte limit",
    "case.png": "name differs only by case from 'Case.png'",
    "zero.png": "is empty (0 bytes)",
    "truncated.png": "is truncated",
    "garbage.jpg": "is not an image PIL can read",
    "bomb.png": "decompression bomb",
    "fake.png": "fake.png is not an image PIL can read (damaged, or not really .png)",
    "fake.txt": "its image was skipped, so the caption was too",
    "page.webp": "page.webp is not an image PIL can read",
    "doc.pdf": "not an image (.bmp .jpeg .jpg .png .webp) or .txt caption",
}
DAMAGED_MEMBERS = {  # member of damaged.zip -> why it is skipped
    "badblock.png": "cannot be unpacked (error: Error -3 while decompressing data: invalid block type)",
    "badcrc.png": "cannot be unpacked (BadZipFile: Bad CRC-32",
    "deflate64.png": "compressed with Deflate64 (as Windows writes large zips), which cannot be unpacked here",
    "ppmd.png": "compressed with PPMd",
    "zstd.png": "compressed with Zstandard",
    "bzip2.png": "cannot be unpacked (OSError: Invalid data stream)",
    "lzma.png": "cannot be unpacked (",
}
LONG_NAMES_KEPT = ["a" * 246 + ".png", "b" * 251 + ".png", "é" * 125 + ".png", "c" * 255 + "/x.png"]
LONG_NAMES_SKIPPED = ["d" * 252 + ".png", "e" * 300 + "/x.png"]
IMPORT_CAP = 10_000
REPEAT_FOLDERS = ["100000000000000000000_star", "1001_star"]
ZIP_SKIPS = ["path with '..' in the zip", "absolute path in the zip", "symbolic link in the zip",
             "looks like a zip bomb"]


def _sha256(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _tree(folder: Path) -> dict[str, str]:
    """Every file's checksum and every folder (as "dir") under `folder`: what "unchanged"
    means, stray empty folders included. Temporary Gradio and log files are not ours."""
    return {**{p.relative_to(folder).as_posix(): "dir" for p in folder.rglob("*") if p.is_dir()},
            **{k: v for k, v in _sha256(folder).items() if not k.endswith(".log")}}


@contextlib.contextmanager
def unchanged(*folders: Path):
    """The block must leave every file and folder under `folders` as it was."""
    before = [_tree(f) if f.exists() else None for f in folders]
    yield
    for folder, old in zip(folders, before):
        new = _tree(folder) if folder.exists() else None
        assert new == old, (folder, sorted(set(new or {}) ^ set(old or {})) or "a file's content changed")


def _train_good(workspace: Path) -> None:
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=4)
    config.name = "good"
    config.sampling.prompts = []
    config.training.num_threads = 1
    AdapterTrainer(create_run(config, Workspace.open(workspace)), show_progress=False).run()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from studio.workspace import Workspace

    base = tmp_path_factory.mktemp("corpus")
    workspace, corpus, cli_ws = base / "ws", base / "corpus", base / "cli-ws"
    # a low upload limit, so that going over it costs little
    with running_server(workspace, meanwhile=lambda: _train_good(workspace),
                        env={"LORA_STUDIO_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB)}) as live:
        good = workspace / "adapters" / "good.safetensors"
        _images(corpus / "images")
        _zips(corpus)
        _special(corpus / "special")
        _numbers(corpus)
        _adapters(corpus / "adapters", good)
        for index in range(MIX_CAP + 1):  # one more distinct adapter than a mix may hold
            shutil.copyfile(good, workspace / "adapters" / f"m{index:02d}.safetensors")
        for name, (text, _) in CONFIGS.items():
            (corpus / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        Workspace.open(cli_ws)  # every folder exists from the start, whichever test runs first
        shutil.copyfile(good, cli_ws / "adapters" / "good.safetensors")
        before = _sha256(corpus)
        api = Api(live.url)
        yield {"live": live, "ws": workspace, "corpus": corpus, "cli_ws": cli_ws, "api": api, "before": before,
               "base": base}
        api.close()


# ----------------------------------------------------------------------------- helpers
def cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (the real entry point; a few cases also run as processes below)."""
    from studio.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as refused:  # argparse refuses bad arguments this way
        rc = refused.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def cli_error(capsys, expected: str, *args) -> None:
    rc, out, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 2, (args, rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (args, err)
    assert expected in lines[0], (args, lines[0])


def handled(result, expected: str) -> None:
    """The handler showed `expected` as a warning (friendly), left the page as it was, and
    nothing unexpected happened."""
    assert expected in result.warning_text, (expected, result)
    assert result.skipped, result.output
    assert all(title == "Cannot do that" for title, _ in result.warnings), result.warnings


def upload_all(api: Api, paths) -> list[dict]:
    return [api.upload(p) for p in paths]


# ----------------------------------------------------------------------------- images and captions
def test_images_and_captions(env, capsys):
    corpus, api, images = env["corpus"], env["api"], env["corpus"] / "images"

    rc, out, err = cli(capsys, "dataset", "import", images, "--name", "bad", "--workspace", env["cli_ws"])
    assert rc == 0 and not err, err
    for name, reason in IMPORT_SKIPS.items():
        assert f"skipped {images / name}: " in out and reason in out, (name, out)
    rc, out, err = cli(capsys, "dataset", "check", "bad", "--json", "--workspace", env["cli_ws"])
    assert rc == 0, err
    issues = json.loads(out)["issues"]
    for name, finding in IMAGE_FINDINGS.items():
        assert any(i["path"] == name and finding in i["message"] for i in issues), (name, finding, issues)

    imported = env["cli_ws"] / "datasets" / "bad"
    assert not (imported / "fake.png").exists() and not (imported / "fake.txt").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in imported.rglob("*") if p.is_file()} == {oct(0o666 & ~umask)}

    files = upload_all(api, sorted(p for p in images.iterdir()))
    result = api.call("import_dataset", {"ds-new-name": "bad", "ds-upload": files})
    assert result.error is None, result
    shown = json.dumps(result.output, ensure_ascii=False)
    assert f"Skipped {len(IMPORT_SKIPS)} file(s)" in result.warning_text
    for name, reason in {**IMPORT_SKIPS, **IMAGE_FINDINGS}.items():
        assert reason in shown, (name, reason)
    for name in IMPORT_SKIPS:  # by the name uploaded, not the server's temporary copy
        assert f"skipped `{name}`: " in shown, name  # the page's note is Markdown
    assert str(Path(files[0]["path"]).parent.parent) not in shown


# ----------------------------------------------------------------------------- zips
def test_zips(env, capsys):
    corpus, api, ws, cli_ws = env["corpus"], env["api"], env["ws"], env["cli_ws"]
    rc, out, err = cli(capsys, "dataset", "import", corpus / "unsafe.zip", "--name", "zipped", "--workspace", cli_ws)
    assert rc == 0 and "Imported 1 images" in out, (out, err)
    for reason in ZIP_SKIPS:
        assert reason in out, (reason, out)
    cli_error(capsys, "would unpack to 12.00 GiB", "dataset", "import", corpus / "declared.zip", "--name", "d",
              "--workspace", cli_ws)
    cli_error(capsys, "is not a readable zip file", "dataset", "import", corpus / "garbage.zip", "--name", "g",
              "--workspace", cli_ws)

    result = api.call("import_dataset", {"ds-new-name": "zipped",
                                         "ds-upload": upload_all(api, [corpus / "unsafe.zip"])})
    assert result.error is None and "Skipped 4 file(s)" in result.warning_text, result
    for reason in ZIP_SKIPS:
        assert reason in json.dumps(result.output), reason
    for name, expected in (("declared.zip", "would unpack to 12.00 GiB"),
                           ("garbage.zip", "is not a readable zip file")):
        result = api.call("import_dataset", {"ds-new-name": "z2", "ds-upload": upload_all(api, [corpus / name])})
        handled(result, expected)
    # nothing was written outside the datasets, or for the refused members
    for root in (ws, cli_ws, env["base"]):
        assert not [p for p in root.rglob("evil*")], list(root.rglob("evil*"))
    assert sorted(p.name for p in (ws / "datasets" / "zipped").iterdir()) == ["ok.png"]
    assert not (ws / "datasets" / "z2").exists()


# ----------------------------------------------------------------------------- adapters
def test_adapter_files(env, capsys):
    folder, api, ws = env["corpus"] / "adapters", env["api"], env["ws"]
    for name, expected in ADAPTER_ERRORS.items():
        cli_error(capsys, expected, "inspect", folder / name)
        uploaded = api.upload(folder / name)
        result = api.call("import_adapter", {"lib-upload": uploaded, "lib-new-name": ""})
        handled(result, expected)
        assert uploaded["path"] not in result.warning_text, result.warning_text
        assert not (ws / "adapters" / name).exists()

    # right format, wrong model: the library takes it; using it says which file and why
    result = api.call("import_adapter", {"lib-upload": api.upload(folder / "othermodel.safetensors"),
                                         "lib-new-name": ""})
    assert result.error is None and not result.warnings, result
    expected = "othermodel.safetensors does not fit this SD 1.5 base model"
    handled(api.call("generate", {"gen-prompt": "a star <lora:othermodel:1>", "gen-steps": 1}), expected)
    handled(api.call("generate", {"gen-prompt": "a star", "gen-steps": 1, "gen-adapter-1": "othermodel"}), expected)
    cli_error(capsys, expected, "generate", "--prompt", "a star", "--steps", "1", "--adapter",
              folder / "othermodel.safetensors", "--out", env["base"] / "never.png")
    assert not (env["base"] / "never.png").exists()


# ----------------------------------------------------------------------------- configs
def test_configs(env, capsys):
    for name, (_, expected) in CONFIGS.items():
        cli_error(capsys, expected, "train", env["corpus"] / name, "--workspace", env["cli_ws"])
    assert not list((env["cli_ws"] / "runs").glob("*"))

    api = env["api"]
    assert api.call("check_settings").infos  # the page's own values are valid: the cases below are what fails
    handled(api.call("check_settings", {"train-name": "../evil"}), "Invalid adapter name '../evil'")
    handled(api.call("check_settings", {"train-dataset-resolution": 65}), "Input should be a multiple of 8")
    handled(api.call("check_settings", {"train-network-type": "tlora", "train-network-tlora-min-rank": 32}),
            "tlora_min_rank (32) must not exceed rank (16)")  # the preset's rank
    handled(api.call("check_settings", {"train-dataset": None}), "Pick a dataset")
    handled(api.call("check_settings", {"train-training-base-weights": "nf4"}),
            "No CUDA GPU on this machine: training.base_weights = 'nf4'")
    # out of the field's range or of the wrong type: named by the field's label, every problem at once
    handled(api.call("check_settings", {"train-training-learning-rate": 5}),
            "Learning rate: Input should be less than or equal to 1")
    handled(api.call("check_settings", {"train-network-rank": "eight"}), "Rank: Input should be a valid integer")
    for value, expected in ((-5, "Steps: Input should be greater than or equal to 1"),
                            (float("nan"), "Steps: Input should be a finite number"),
                            (2.5, "Steps: Input should be a valid integer")):
        handled(api.call("check_settings", {"train-training-max-steps": value}), expected)
    handled(api.call("check_settings", {"train-training-weight-decay": float("inf")}),
            "Training › Weight decay: Input should be a finite number")
    result = api.call("check_settings", {"train-training-max-steps": -5, "train-dataset-resolution": 65,
                                         "train-training-adam-epsilon": float("nan")})
    handled(result, "Settings: Resolution: Input should be a multiple of 8; Steps: Input should be greater than or "
                    "equal to 1; Training › Adam epsilon: Input should be a finite number. Fix these 3 values")
    assert len(result.warnings) == 1 and "training." not in result.warning_text, result.warnings


# ----------------------------------------------------------------------------- prompts
PROMPT_ERRORS = {
    "a star <lora:nope:1>": "No adapter named 'nope'",
    "a star <lora:good:abc>": "the weight 'abc' is not a number",
    "a star <lora:good:0.5": "broken <lora:...> tag",
    "a star <lora::1>": "broken <lora:...> tag",
    "a star <lora:good:nan>": "the weight 'nan' is not a finite number",
    "a star <lora:good:1e999>": "the weight '1e999' is not a finite number",
}


def test_prompts_and_generate_settings(env, capsys):
    api, out = env["api"], env["base"] / "never.png"
    for prompt, expected in PROMPT_ERRORS.items():
        cli_error(capsys, expected, "generate", "--prompt", prompt, "--out", out, "--workspace", env["cli_ws"])
        handled(api.call("generate", {"gen-prompt": prompt, "gen-steps": 1}), expected)
    cli_error(capsys, "not a finite number", "generate", "--prompt", "x", "--adapter", "good.safetensors:inf",
              "--out", out)
    cli_error(capsys, "seed must be a whole number between 0 and", "generate", "--prompt", "x", "--seed", "-5",
              "--out", out)
    assert not out.exists()

    cases = [
        ({"gen-prompt": "a star <lora:good:1>", "gen-adapter-1": "good"}, "is used twice"),
        ({"gen-size": "huge"}, "Size 'huge' is not WIDTH x HEIGHT"),
        ({"gen-size": "60 x 64"}, "width and height must be multiples of 8"),
        ({"gen-cfg": float("nan")}, "CFG scale: nan is not a finite number from 0 to 100"),
        ({"gen-seed": 1e30}, "Seed: 1e+30 is not a whole number from -1 to"),
        ({"gen-adapter-1": "good", "gen-weight-1": float("nan")}, "Adapter 1 · Weight: nan is not a finite number"),
        ({"gen-adapter-1": "good", "gen-weight-1": float("inf")}, "Adapter 1 · Weight: inf is not a finite number"),
        ({"gen-steps": float("nan")}, "Steps: nan is not a whole number from 1 to 500"),
        ({"gen-steps": -5}, "Steps: -5 is not a whole number from 1 to 500"),
        ({"gen-steps": "abc"}, "Steps: 'abc' is not a number"),
        ({"gen-steps": None}, "Steps: empty; give a number"),
        ({"gen-count": 1e9}, "Images: 1000000000.0 is not a whole number from 1 to 64"),
        ({"gen-cfg": float("inf"), "gen-steps": 0, "gen-seed": 0.5},
         "Steps: 0 is not a whole number from 1 to 500; CFG scale: inf is not a finite number from 0 to 100; "
         "Seed: 0.5 is not a whole number from -1 to 9223372036854775807. Fix these 3 fields"),
        ({"gen-prompt": "   "}, "Write a prompt first"),
        ({"gen-model": "/nonexistent/model"}, "Base model '/nonexistent/model' not found"),
    ]
    for values, expected in cases:
        result = api.call("generate", {"gen-prompt": "a star", "gen-steps": 1, **values})
        handled(result, expected)
        assert len(result.warnings) == 1, result.warnings
    cli_error(capsys, "argument --guidance: 'nan' is not a finite number", "generate", "--prompt", "x",
              "--guidance", "nan", "--out", out)
    cli_error(capsys, "steps must be between 1 and 500 (got -5)", "generate", "--prompt", "x", "--steps", "-5",
              "--out", out)
    assert not out.exists()


# ----------------------------------------------------------------------------- damaged zips, long names
def test_zip_members_that_cannot_be_read(env, capsys):
    corpus, api, ws, cli_ws = env["corpus"], env["api"], env["ws"], env["cli_ws"]
    rc, out, err = cli(capsys, "dataset", "import", corpus / "damaged.zip", "--name", "damaged", "--workspace", cli_ws)
    assert rc == 0 and not err and "Imported 1 images" in out, (out, err)
    for member, reason in DAMAGED_MEMBERS.items():
        assert f"skipped damaged.zip:{member}: {reason}" in out, (member, out)
    result = api.call("import_dataset", {"ds-new-name": "damaged",
                                         "ds-upload": upload_all(api, [corpus / "damaged.zip"])})
    assert result.error is None and f"Skipped {len(DAMAGED_MEMBERS)} file(s)" in result.warning_text, result
    for member, reason in DAMAGED_MEMBERS.items():
        assert f"skipped `damaged.zip:{member}`: {reason}" in json.dumps(result.output, ensure_ascii=False), member
    for root in (ws, cli_ws):
        assert sorted(p.name for p in (root / "datasets" / "damaged").rglob("*")) == ["ok.png"]


def test_names_at_the_file_system_limit(env, capsys):
    corpus, api, ws, cli_ws = env["corpus"], env["api"], env["ws"], env["cli_ws"]
    rc, out, err = cli(capsys, "dataset", "import", corpus / "longnames.zip", "--name", "long", "--workspace", cli_ws)
    assert rc == 0 and not err and f"Imported {len(LONG_NAMES_KEPT)} images" in out, (out, err)
    result = api.call("import_dataset", {"ds-new-name": "long",
                                         "ds-upload": upload_all(api, [corpus / "longnames.zip"])})
    assert result.error is None and f"Skipped {len(LONG_NAMES_SKIPPED)} file(s)" in result.warning_text, result
    for text, quote in ((out, ""), (json.dumps(result.output, ensure_ascii=False), "`")):  # CLI, page (Markdown)
        for name in LONG_NAMES_SKIPPED:
            assert f"skipped {quote}longnames.zip:{name}{quote}: a name of " in text, name
            assert "over the file system's limit" in text
    for root in (ws, cli_ws):
        folder = root / "datasets" / "long"
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == sorted(LONG_NAMES_KEPT)
        assert not list(folder.rglob(".*")), "temporary files left behind"


# ----------------------------------------------------------------------------- special files, folders as files
def _run(args: list, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m studio ARGS` as a process, so that a hang fails the test instead of stopping it."""
    process_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "studio", *map(str, args)], cwd=ROOT, env=process_env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.args, proc.stderr)
    assert expected in lines[0], (proc.args, lines[0])


def test_special_files_and_folders_where_files_belong(env):
    special, api, ws, cli_ws, base = env["corpus"] / "special", env["api"], env["ws"], env["cli_ws"], env["base"]
    good = cli_ws / "adapters" / "good.safetensors"
    skipped = {"fifo.png": "not a regular file", "fifo.txt": "not a regular file", "fifo.zip": "not a regular file",
               "link-to-fifo.jpg": "not a regular file", "socket.png": "not a regular file"}
    with unchanged(special, cli_ws / "adapters", cli_ws / "runs"):
        proc = _run(["dataset", "import", special, "--name", "special", "--workspace", cli_ws])
        assert proc.returncode == 0 and "Imported 1 images" in proc.stdout, (proc.stdout, proc.stderr)
        for name, reason in skipped.items():
            assert f"skipped {special / name}: {reason}" in proc.stdout, name
        proc = _run(["dataset", "check", special, "--json"])
        issues = {i["path"]: i["message"] for i in json.loads(proc.stdout)["issues"]}
        assert "not a regular file" in issues["fifo.png"] and "not a regular file" in issues["socket.png"], issues
        cases = [
            (["dataset", "import", special / "fifo.zip", "--name", "fz", "--workspace", cli_ws],
             f"Zip file {special / 'fifo.zip'} is not a regular file"),
            (["train", special / "dir.toml", "--workspace", cli_ws], f"Config {special / 'dir.toml'} is a folder"),
            (["train", special / "fifo.txt", "--workspace", cli_ws], "is not a regular file (a pipe"),
            (["inspect", special / "fifo.png"], "is not a regular file (a pipe"),
            (["generate", "--prompt", "x", "--out", special / "dir.toml"], "dir.toml is a folder; give the name of a file"),
            (["resize", good, "--rank", "1", "--out", special / "dir.safetensors"], "dir.safetensors is a folder"),
            (["bake", good, "--out", special / "dir.toml"], "dir.toml is a folder"),
            (["grid", "--prompt", "x", "--x", "seed=1", "--out", special], "special is a folder"),
            (["generate", "--prompt", "x", "--out", special / "ok.png" / "x.png"], "ok.png is a file, not a folder"),
        ]
        for args, expected in cases:
            _one_line_error(_run(args), expected)
        assert not (cli_ws / "datasets" / "fz").exists()

    with unchanged(special):
        result = api.call("import_dataset", {"ds-new-name": "special", "…or a folder on this computer": str(special)})
        assert result.error is None and f"Skipped {len(skipped)} file(s)" in result.warning_text, result
        for name, reason in skipped.items():
            assert f"skipped `{special / name}`: {reason}" in json.dumps(result.output), name
        handled(api.call("import_dataset", {"ds-new-name": "fz", "…or a folder on this computer":
                                            str(special / "fifo.zip")}), "is not a regular file")
        assert not (ws / "datasets" / "fz").exists()
        handled(api.call("check_settings", {"train-base-model": str(special / "fifo.png")}),
                "fifo.png is not a regular file (a pipe")


# ----------------------------------------------------------------------------- absurd numbers
def test_absurd_numbers(env, capsys):
    corpus, api, ws, cli_ws = env["corpus"], env["api"], env["ws"], env["cli_ws"]
    good = cli_ws / "adapters" / "good.safetensors"
    rc, out, err = cli(capsys, "dataset", "check", corpus / "repeats", "--json")
    messages = {i["path"]: i["message"] for i in json.loads(out)["issues"]}
    assert "repeat count 100000000000000000000 is over the limit of 1000" in messages[REPEAT_FOLDERS[0]], messages
    assert "repeat count 1001 is over the limit of 1000" in messages[REPEAT_FOLDERS[1]], messages
    rc, out, err = cli(capsys, "dataset", "import", corpus / "repeats", "--name", "repeats", "--workspace", cli_ws)
    assert rc == 0, err
    config = env["base"] / "repeats.toml"
    config.write_text('[dataset]\nname = "repeats"\n')
    with unchanged(cli_ws / "runs"):
        cli_error(capsys, "'repeats' has no training image that can be read", "train", config, "--workspace", cli_ws)

    out_file = env["base"] / "never.safetensors"
    for args, expected in [
        (["--sv-ratio", "nan"], "argument --sv-ratio: 'nan' is not a finite number"),
        (["--sv-ratio", "inf"], "argument --sv-ratio: 'inf' is not a finite number"),
        (["--sv-fro=-inf"], "argument --sv-fro: '-inf' is not a finite number"),
        (["--sv-cumulative", "2"], "--sv-cumulative must be in (0, 1] (got 2.0)"),
        (["--sv-ratio", "0.5"], "--sv-ratio must be a finite number of at least 1 (got 0.5)"),
        (["--rank", "0"], "--rank must be at least 1 (got 0)"),
    ]:
        cli_error(capsys, expected, "resize", good, "--out", out_file, *args)
    assert not out_file.exists()

    result = api.call("import_dataset", {"ds-new-name": "repeats", "…or a folder on this computer":
                                         str(corpus / "repeats")})
    assert result.error is None and "repeat count 100000000000000000000 is over the limit" in json.dumps(result.output)
    with unchanged(ws / "runs", ws / "adapters"):
        handled(api.call("check_settings", {"train-dataset": "repeats"}), "'repeats' has no training image that can be read")
        for value, expected in ((float("nan"), "Give the value X for sv-ratio"),
                                (0.5, "--sv-ratio must be a finite number of at least 1")):
            handled(api.call("resize", {"lib-resize-source": "good", "lib-resize-rule": "sv_ratio",
                                        "lib-resize-value": value}), expected)


# ----------------------------------------------------------------------------- unbounded requests
def test_caps_on_work_per_request(env, capsys, monkeypatch):
    corpus, api, ws, cli_ws, base = env["corpus"], env["api"], env["ws"], env["cli_ws"], env["base"]
    good = cli_ws / "adapters" / "good.safetensors"
    many = [f"{good}:0.1"] * (MIX_CAP + 1)
    mix_refused = (f"mixes {MIX_CAP + 1} adapters, over the cap of {MIX_CAP} adapters per mix; use fewer adapters, "
                   f"or bake some of them into one with `lora-studio bake`, or raise the cap with the environment "
                   f"variable LORA_STUDIO_MAX_MIX_ADAPTERS={MIX_CAP + 1}")
    seeds = ",".join(str(i) for i in range(GRID_CAP + 1))
    with unchanged(corpus, cli_ws, base / "outputs"):
        cli_error(capsys, mix_refused, "generate", "--prompt", "x", *(a for m in many for a in ("--adapter", m)),
                  "--out", base / "outputs" / "x.png")
        cli_error(capsys, f"This mix has {MIX_CAP + 1} adapters, over the cap of {MIX_CAP}", "bake", *many,
                  "--out", base / "outputs" / "x.safetensors")
        cli_error(capsys, f"This grid has {GRID_CAP + 1} cells, over the cap of {GRID_CAP} grid cells; use fewer "
                          "values on the axes, or raise the cap with the environment variable "
                          f"LORA_STUDIO_MAX_GRID_CELLS={GRID_CAP + 1}",
                  "grid", "--prompt", "x", "--x", f"seed={seeds}", "--out", base / "outputs" / "grid.png")
        cli_error(capsys, "This grid has 110 cells (11 x 10), over the cap", "grid", "--prompt", "x", "--adapter",
                  good, "--x", "adapter0=" + ",".join(["0.1"] * 11), "--y", "seed=" + ",".join(["1"] * 10),
                  "--out", base / "outputs" / "grid.png")
        cli_error(capsys, f"This import has {IMPORT_CAP + 1} images, over the cap of {IMPORT_CAP} images per import; "
                          "import the images in several parts (mode 'add'), or raise the cap with the environment "
                          f"variable LORA_STUDIO_MAX_IMPORT_IMAGES={IMPORT_CAP + 1}",
                  "dataset", "import", corpus / "toomany.zip", "--name", "many", "--workspace", cli_ws)
        # the setting changes the cap; a setting that is not a number says so
        monkeypatch.setenv("LORA_STUDIO_MAX_MIX_ADAPTERS", "1")
        cli_error(capsys, "This mix has 2 adapters, over the cap of 1 adapters per mix", "bake", *many[:2],
                  "--out", base / "outputs" / "x.safetensors")
        monkeypatch.setenv("LORA_STUDIO_MAX_MIX_ADAPTERS", "lots")
        cli_error(capsys, "LORA_STUDIO_MAX_MIX_ADAPTERS='lots' is not a whole number", "bake", good,
                  "--out", base / "outputs" / "x.safetensors")

    tags = " ".join(f"<lora:m{i:02d}:0.1>" for i in range(MIX_CAP + 1))
    with unchanged(ws / "adapters", ws / "datasets", ws / "outputs"):
        handled(api.call("generate", {"gen-prompt": f"a star {tags}", "gen-steps": 1}), mix_refused)
        grid = {"gen-prompt": "a star", "gen-steps": 1, "gen-adapter-1": "good"}
        handled(api.call("grid", {**grid, "gen-grid-x": "seed", "gen-grid-x-values": seeds}),
                f"This grid has {GRID_CAP + 1} cells, over the cap of {GRID_CAP} grid cells")
        handled(api.call("grid", {**grid, "gen-grid-x": "adapter0", "gen-grid-x-values": ",".join(["0.5"] * 11),
                                  "gen-grid-y": "seed", "gen-grid-y-values": ",".join(["3"] * 10)}),
                "This grid has 110 cells (11 x 10), over the cap")
        handled(api.call("import_dataset", {"ds-new-name": "many",
                                            "ds-upload": upload_all(api, [corpus / "toomany.zip"])}),
                f"This import has {IMPORT_CAP + 1} images, over the cap of {IMPORT_CAP} images per import")


# ----------------------------------------------------------------------------- nothing left behind
def test_refused_work_creates_nothing(env, capsys):
    corpus, api, ws, cli_ws, base = env["corpus"], env["api"], env["ws"], env["cli_ws"], env["base"]
    fresh = base / "fresh-workspace"
    for name in ("badset.toml", "wrongtype.toml", "infdecay.toml"):
        cli_error(capsys, CONFIGS[name][1], "train", corpus / name, "--workspace", fresh)
    missing = base / "missing-dataset.toml"
    missing.write_text('[dataset]\nname = "nope"\n')
    cli_error(capsys, "'nope' does not exist; import one", "train", missing, "--workspace", fresh)
    assert not fresh.exists()
    with unchanged(cli_ws / "datasets"):
        for source, name in ((corpus / "garbage.zip", "g"), (corpus / "declared.zip", "d"),
                             (corpus / "images" / "doc.pdf", "pdf"), (corpus / "images" / "fake.png", "fake")):
            rc, out, err = cli(capsys, "dataset", "import", source, "--name", name, "--workspace", cli_ws)
            assert (rc, err.count("\n")) == (2, 1) or (rc == 0 and "Imported 0 images" in out), (source, out, err)
    with unchanged(ws / "datasets"):
        for name in ("doc.pdf", "fake.png"):
            result = api.call("import_dataset", {"ds-new-name": "nothing",
                                                 "ds-upload": upload_all(api, [corpus / "images" / name])})
            assert "Imported 0 image(s)" in json.dumps(result.output), result


def test_upload_over_the_limit_gets_a_message(env):
    big = env["base"] / "big.png"
    big.write_bytes(os.urandom((UPLOAD_LIMIT_MB + 1) * 1024**2))
    with open(big, "rb") as handle:
        response = httpx.post(env["live"].url + "/gradio_api/upload", files={"files": ("big.png", handle)},
                              timeout=60)
    assert response.status_code == 413, response
    assert f"over the upload limit of {UPLOAD_LIMIT_MB} MiB" in response.text and "LORA_STUDIO_MAX_UPLOAD_MB" in \
        response.text, response.text
    assert httpx.get(env["live"].url + "/", timeout=10).status_code == 200


def test_closed_pipe_ends_quietly(env):
    good, cli_ws = env["cli_ws"] / "adapters" / "good.safetensors", env["cli_ws"]
    python = f'"{sys.executable}" -m studio'
    for command in (f'{python} inspect "{good}" | true', f'{python} inspect "{good}" --json | head -c 1',
                    f'{python} dataset check "{ROOT / "assets" / "demo-dataset"}" --json --workspace "{cli_ws}" | true'):
        proc = subprocess.run(["bash", "-c", command + "; exit ${PIPESTATUS[0]}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.stderr == "" and proc.returncode in (0, 141), (command, proc.returncode, proc.stderr)


# ----------------------------------------------------------------------------- as real processes
def test_cli_processes_print_one_line(env):
    """A few cases as real `python -m studio` processes: exit 2, one line on stderr, nothing else."""
    corpus = env["corpus"]
    cases = [
        (["inspect", corpus / "adapters" / "pickled.safetensors"], "is a pickle"),
        (["dataset", "import", corpus / "declared.zip", "--name", "p", "--workspace", env["cli_ws"]], "would unpack"),
        (["train", corpus / "wrongtype.toml", "--workspace", env["cli_ws"]], "valid integer"),
        (["generate", "--prompt", "<lora:good:nan>", "--out", env["base"] / "p.png", "--workspace", env["cli_ws"]],
         "not a finite number"),
    ]
    process_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [(subprocess.Popen([sys.executable, "-m", "studio", *map(str, args)], cwd=ROOT, env=process_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), expected)
             for args, expected in cases]
    for proc, expected in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (proc.args, out, err)
        assert out == "" and len(err.strip().splitlines()) == 1 and expected in err, (proc.args, err)


# ----------------------------------------------------------------------------- afterwards
def test_nothing_changed_and_server_still_answers(env):
    live, api = env["live"], env["api"]
    assert _sha256(env["corpus"]) == env["before"]
    assert live.alive()
    assert httpx.get(live.url + "/", timeout=10).status_code == 200
    result = api.call("generate", {"gen-prompt": "a sks star <lora:good:0.7>", "gen-steps": 2, "gen-seed": 5})
    assert result.error is None and not result.warnings and result.output[0], result
    log = live.log_text()
    assert "unexpected error in" not in log and "Traceback" not in log, log[-3000:]
