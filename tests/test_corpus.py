"""The bad-input corpus, built here (nothing binary is committed): broken and odd images,
captions, zips, adapter files, configs and prompts. Each gets its clear message from the
CLI (exit 2 and one line for errors; the report for `dataset check`) and from the running
server's handlers (dataset import, library import, settings check, generate), the server
keeps answering, and no input file is changed."""
from __future__ import annotations

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
}

# what `dataset check` (and the page's problem table) says about each file
IMAGE_FINDINGS = {
    "zero.png": "is empty (0 bytes)",
    "truncated.png": "is truncated",
    "garbage.jpg": "is not an image PIL can read",
    "bomb.png": "decompression bomb",
    "deep16.png": "16-bit grayscale -> 8-bit RGB",
    "cmyk.jpg": "CMYK -> RGB",
    "palette.png": "palette -> RGB",
    "alpha.png": "RGBA with transparency -> RGB (alpha composited on white)",
    "rotated.jpg": "EXIF orientation 6 applied (rotated 90° clockwise)",
    "long.txt": "1499 characters; the text encoder sees at most 225 tokens",
    "latin.txt": "not UTF-8; read as cp1252",
}
IMPORT_SKIPS = {  # file -> why the import skipped it
    "huge.txt": f"over the {CAPTION_LIMIT}-byte limit",
    "case.png": "name differs only by case from 'Case.png'",
}
ZIP_SKIPS = ["path with '..' in the zip", "absolute path in the zip", "symbolic link in the zip",
             "looks like a zip bomb"]


def _sha256(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_good(workspace: Path) -> None:
    from studio.runs import create_run
    from studio.workspace import Workspace
    from trainers.lora import Trainer

    config = demo_config(max_steps=4)
    config.name = "good"
    config.sampling.prompts = []
    config.training.num_threads = 1
    Trainer(create_run(config, Workspace.open(workspace)), show_progress=False).run()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    workspace, corpus, cli_ws = base / "ws", base / "corpus", base / "cli-ws"
    with running_server(workspace, meanwhile=lambda: _train_good(workspace)) as live:
        good = workspace / "adapters" / "good.safetensors"
        _images(corpus / "images")
        _zips(corpus)
        _adapters(corpus / "adapters", good)
        for name, (text, _) in CONFIGS.items():
            (corpus / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        (cli_ws / "adapters").mkdir(parents=True)
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
    rc = main([str(a) for a in args])
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

    files = upload_all(api, sorted(p for p in images.iterdir()))
    result = api.call("import_dataset", {"ds-new-name": "bad", "ds-upload": files})
    assert result.error is None, result
    shown = json.dumps(result.output, ensure_ascii=False)
    assert "Skipped 2 file(s)" in result.warning_text
    for name, reason in {**IMPORT_SKIPS, **IMAGE_FINDINGS}.items():
        assert reason in shown, (name, reason)


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
        result = api.call("import_adapter", {"lib-upload": api.upload(folder / name), "lib-new-name": ""})
        handled(result, expected)
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
    # out of the field's range or of the wrong type: Gradio refuses the value before our handler runs
    result = api.call("check_settings", {"train-training-learning-rate": 5})
    assert result.output is None and "greater than maximum value 1.0" in result.error, result
    result = api.call("check_settings", {"train-network-rank": "eight"})
    assert result.output is None and result.error is not None, result


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
        ({"gen-cfg": float("nan")}, "CFG scale must be a number between 0 and 100"),
        ({"gen-seed": 1e30}, "seed must be a whole number between 0 and"),
        ({"gen-adapter-1": "good", "gen-weight-1": float("nan")}, "has weight nan"),
        ({"gen-prompt": "   "}, "Write a prompt first"),
        ({"gen-model": "/nonexistent/model"}, "Base model '/nonexistent/model' not found"),
    ]
    for values, expected in cases:
        handled(api.call("generate", {"gen-prompt": "a star", "gen-steps": 1, **values}), expected)
    # outside the slider's range: Gradio refuses the value before our handler runs
    result = api.call("generate", {"gen-prompt": "a star", "gen-adapter-1": "good", "gen-weight-1": float("inf")})
    assert result.output is None and "Value inf is greater than maximum value 2" in result.error, result


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
    assert "unexpected error in" not in log, log[-3000:]
