"""Models by name (studio.models.hub) against a stand-in Hugging Face Hub and CivitAI on the
loopback (tests/hub_server.py): pulled through a dropped connection and then used offline,
LoRAs into the library byte for byte, wrong hashes, pickles and unknown names refused in one
line leaving nothing behind, captioners fetched and used by name from the Datasets tab."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from studio.errors import StudioError
from studio.models import hub
from studio.models.builtin import BUILTIN_DIR
from studio.models.families import BUILTIN_MODELS
from studio.workspace import Workspace
from tests.conftest import ROOT
from tests.hub_server import CivitaiFile, StandIn, sha256_hex
from tests.test_captioning import florence2_folder, image_to_text_folders, tagger_folder  # noqa: F401 (fixtures)
from toyworld import world

REPO = "studio/tiny-sd"
#: huggingface_hub reads a download in 10 MiB chunks and resumes from the last whole one.
HUB_CHUNK = 10 * 1024 * 1024


def _served_pipeline(folder: Path) -> Path:
    """The built-in model's diffusers folder, its UNet file padded past two of huggingface_hub's
    read chunks (12 MiB of header metadata, same tensors), so that a connection cut after
    11 MiB is resumed with a Range request, plus files a pull must leave alone: a pickle and
    an fp16 variant of the UNet, a root checkpoint, the toy captioner, notes."""
    shutil.copytree(BUILTIN_DIR, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    raw = unet.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    header["__metadata__"] = {**header.get("__metadata__", {}), "padding": "x" * (12 * 1024 * 1024)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    unet.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"weight": [1.0]}))
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(raw)
    (folder / "v1-5-pruned.safetensors").write_bytes(raw)
    return folder


@pytest.fixture
def site(monkeypatch, tmp_path):
    """The stand-in, serving; HF_ENDPOINT and LORA_STUDIO_CIVITAI_ENDPOINT point at it and this
    process may reach it (the suite runs with HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    stand_in = StandIn()
    with stand_in.serving():
        monkeypatch.setenv("HF_ENDPOINT", stand_in.hub_url)
        monkeypatch.setenv(hub.CIVITAI_ENDPOINT_ENV, stand_in.hub_url)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", hub.CIVITAI_TOKEN_ENV):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield stand_in


def _leftovers(ws: Workspace) -> list[str]:
    """The files in the workspace, and any staging folder left."""
    return sorted(p.relative_to(ws.root).as_posix() for p in ws.root.rglob("*")
                  if p.is_file() or p.name == hub.STAGING_DIR)


def _cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _lora_bytes(tmp_path: Path) -> bytes:
    from tests.test_ui_mixing import _lora_file

    return _lora_file(tmp_path / "made.safetensors", rank=2, seed=5, trigger="sks").read_bytes()


# --------------------------------------------------------------------------- names
def test_names_parse_and_paths_are_no_names(tmp_path, monkeypatch):
    parsed = hub.parse_name("org/model-1.0@v2")
    assert (parsed.source, parsed.repo, parsed.revision, parsed.key) == ("huggingface", "org/model-1.0", "v2",
                                                                         "org/model-1.0@v2")
    assert hub.parse_name("org/model@main").key == "org/model"  # the default branch is the plain name
    single = hub.parse_name("org/repo/sub/dir/file.safetensors")
    assert (single.repo, single.file) == ("org/repo", "sub/dir/file.safetensors")
    assert hub.parse_name("CivitAI:123").key == "civitai:123"
    url = hub.parse_name("https://example.com/a/b.safetensors#sha256=" + "A" * 64)
    assert (url.url, url.sha256) == ("https://example.com/a/b.safetensors", "a" * 64)
    for not_a_name in ("builtin", "", "/abs/path", "./rel/x", "models/x.safetensors", "no/such/folder", "a/../b"):
        assert hub.parse_name(not_a_name) is None, not_a_name
    with pytest.raises(StudioError, match="use https"):
        hub.parse_name("http://example.com/x.safetensors")
    with pytest.raises(StudioError, match="sha256="):
        hub.parse_name("https://example.com/x.safetensors#md5=1")
    existing = tmp_path / "org" / "name"
    existing.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not hub.is_model_name("org/name")  # a folder that is there is a path, not a name
    assert hub.is_model_name("org/other")


def test_an_unpulled_name_says_how_to_pull_it(workspace):
    from studio.models import resolve_model

    with pytest.raises(StudioError, match=r"not pulled into .*lora-studio models pull org/name") as caught:
        resolve_model("org/name", workspace=workspace)
    assert "\n" not in str(caught.value)
    with pytest.raises(StudioError, match="not found: use 'builtin'"):
        resolve_model("models/missing.safetensors", workspace=workspace)


# --------------------------------------------------------------------------- the road: pull, then offline
@pytest.mark.slow(seconds=50)
def test_a_repo_pulled_through_a_dropped_connection_generates_offline_as_the_served_files(site, tmp_path):
    served = _served_pipeline(tmp_path / "served")
    site.add_repo(REPO, served)
    unet_sha = sha256_hex((served / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    site.drop_once[unet_sha] = HUB_CHUNK + 1024 * 1024
    ws = tmp_path / "ws"
    pulled = subprocess.run([sys.executable, "-m", "studio", "models", "pull", REPO, "--workspace", str(ws)],
                            capture_output=True, text=True, cwd=tmp_path,
                            env=_cli_env(HF_ENDPOINT=site.hub_url, HF_HUB_CACHE=str(tmp_path / "hf-cache")))
    assert pulled.returncode == 0, pulled.stderr
    assert "Traceback" not in pulled.stderr and "pulling studio/tiny-sd [" in pulled.stderr  # the progress line
    folder = ws / "models" / "studio--tiny-sd"
    assert pulled.stdout.startswith(f"pulled: {REPO} -> {folder} (a diffusers base model, ")
    # cut after 11 MiB, resumed from the last whole 10 MiB chunk with a Range request
    ranges = [r[3] for r in site.requested("storage", unet_sha)]
    assert ranges == [None, f"bytes={HUB_CHUNK}-"]
    # only what the pipeline loads: no pickle, variant, root checkpoint, captioner or notes
    fetched = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert fetched == sorted(_pipeline_files())
    for path in fetched:
        assert (folder / path).read_bytes() == (served / path).read_bytes(), path
    index = json.loads((ws / "models" / "index.json").read_text())["models"][REPO]
    assert index["path"] == "models/studio--tiny-sd" and index["revision"] == site.repos[REPO].commit
    assert index["sha256"]["unet/diffusion_pytorch_model.safetensors"] == unet_sha
    assert not (ws / "models" / ".pulling").exists()

    # the name is found in the index, offline: the stand-in hears nothing more
    heard = len(site.requests)
    offline = _cli_env(HF_HUB_OFFLINE="1", HF_ENDPOINT=site.hub_url)
    args = ["--prompt", "a purple star on a white background", "--steps", "4", "--seed", "3"]
    runs = {}
    for label, model in (("by name", REPO), ("served files", str(served))):
        out = tmp_path / f"{label}.png"
        done = subprocess.run([sys.executable, "-m", "studio", "generate", "--model", model, *args, "--out", str(out),
                               "--workspace", str(ws)], capture_output=True, text=True, cwd=tmp_path, env=offline)
        assert done.returncode == 0, done.stderr
        runs[label] = np.asarray(Image.open(out))
    assert runs["by name"].std() > 0 and np.array_equal(runs["by name"], runs["served files"])
    assert len(site.requests) == heard
    assert Image.open(tmp_path / "by name.png").info["parameters"].endswith(f"Model: {REPO}")


@pytest.mark.slow(seconds=10)
def test_the_train_and_generate_fields_offer_and_pull_names(site, workspace, tmp_path):
    from studio.config import TrainConfig
    from studio.jobs.runs import check_training
    from ui import models_view as mv
    from ui.train_tab import model_choices

    site.add_repo(REPO, BUILTIN_DIR)
    offered = model_choices(type("S", (), {"workspace": workspace})())
    assert offered[0] == "builtin" and "stabilityai/stable-diffusion-xl-base-1.0" in offered and REPO not in offered
    shares = []
    note = mv.pull_for_field(workspace, REPO, "base model", lambda share, desc: shares.append((share, desc)))
    assert note.startswith("Pulled: models/studio--tiny-sd") and shares[-1][0] == 1.0
    assert "Pulling studio/tiny-sd" in shares[-1][1]
    assert mv.pull_for_field(workspace, "builtin", "base model", None) is None
    offered = model_choices(type("S", (), {"workspace": workspace})())
    pulled = offered[len(BUILTIN_MODELS)]  # after the built-in models
    assert pulled == REPO and str(workspace.models_dir / "studio--tiny-sd") not in offered
    config = TrainConfig(base_model=REPO)
    assert not [p for p in check_training(config, workspace).problems if p.field == "base_model"]
    assert mv.pull_for_field(workspace, REPO, "base model", None).startswith("Pulled before")
    with pytest.raises(StudioError, match="pulled as a diffusers base model"):
        mv.pull_for_field(workspace, REPO, "captioner", None)


# --------------------------------------------------------------------------- CivitAI
@pytest.mark.slow(seconds=15)
def test_civitai_lora_lands_in_the_library_byte_for_byte(site, workspace, tmp_path, monkeypatch, capsys):
    from studio.adapters.library import find_adapter, list_adapters
    from studio.cli import main
    from studio.models import resolve_model

    data = _lora_bytes(tmp_path)
    site.token = "secret"
    site.add_civitai(4242, "LORA", [CivitaiFile("star style (v2).safetensors", data)])
    site.drop_once[sha256_hex(data)] = len(data) // 2

    with pytest.raises(StudioError, match=f"needs a login. Set {hub.CIVITAI_TOKEN_ENV}"):
        hub.pull("civitai:4242", workspace)
    assert _leftovers(workspace) == []

    monkeypatch.setenv(hub.CIVITAI_TOKEN_ENV, "secret")
    entry, fetched = hub.pull("civitai:4242", workspace)
    assert fetched and entry.kind == "adapter" and entry.path == "adapters/star style _v2.safetensors"
    assert entry.location(workspace).read_bytes() == data
    assert entry.sha256 == {"star style (v2).safetensors": sha256_hex(data)}
    assert list_adapters(workspace) == [entry.location(workspace)]
    assert find_adapter(workspace, "star style _v2") == entry.location(workspace)
    storage = site.requested("storage", sha256_hex(data))
    assert [r[3] for r in storage][-2:] == [None, f"bytes={len(data) // 2}-"]  # resumed where it was cut
    assert all(r[4] is None for r in storage)  # the token stays with CivitAI, not its storage
    assert site.requested("hub", "/api/download/models/4242")[-1][4] == "Bearer secret"

    count = len(site.requests)
    assert hub.pull("civitai:4242", workspace) == (entry, False) and len(site.requests) == count
    with pytest.raises(StudioError, match="pulled as an adapter"):
        resolve_model("civitai:4242", workspace=workspace)
    capsys.readouterr()
    assert main(["models", "list", "--workspace", str(workspace.root)]) == 0
    listing = capsys.readouterr().out
    assert "civitai:4242  ->  adapters/star style _v2.safetensors" in listing
    assert "  SmilingWolf/wd-v1-4-moat-tagger-v2  [captioner]" in listing


def test_an_address_with_its_hash(site, workspace, tmp_path):
    data = _lora_bytes(tmp_path)
    site.add_civitai(1, "LORA", [CivitaiFile("x.safetensors", data)])  # puts the bytes in storage
    url = f"{site.storage_url}/blobs/{sha256_hex(data)}?name=from-url.safetensors"
    with pytest.raises(StudioError, match="sha256 is .* but the source gives 0000"):
        hub.pull(url + "#sha256=" + "0" * 64, workspace)
    assert _leftovers(workspace) == []
    entry, _ = hub.pull(url + "#sha256=" + sha256_hex(data), workspace)
    assert entry.path == "adapters/from-url.safetensors" and entry.location(workspace).read_bytes() == data


# --------------------------------------------------------------------------- refusals: one line, nothing kept
def test_a_wrong_advertised_hash_keeps_nothing(site, workspace, tmp_path, capsys):
    from studio.cli import main

    site.add_repo(REPO, BUILTIN_DIR)
    site.wrong_sha256.add(sha256_hex((BUILTIN_DIR / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()))
    data = _lora_bytes(tmp_path)
    site.add_civitai(7, "LoCon", [CivitaiFile("c.safetensors", data)])
    site.wrong_sha256.add(sha256_hex(data))
    capsys.readouterr()
    for name, message in ((REPO, "vae/diffusion_pytorch_model.safetensors does not match the sha256"),
                          ("civitai:7", "the file's sha256 is")):
        assert main(["models", "pull", name, "--quiet", "--workspace", str(workspace.root)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "nothing was kept" in err, err
    assert _leftovers(workspace) == []


def test_pickles_are_refused(site, workspace):
    site.add_repo("org/pickled", {"model.safetensors": pickle.dumps({"a": 1}), "model.ckpt": b"x"})
    index = (BUILTIN_DIR / "model_index.json").read_bytes()
    site.add_repo("org/bin-only", {"model_index.json": index, "unet/config.json": b"{}",
                                   "unet/diffusion_pytorch_model.bin": b"x", "vae/config.json": b"{}",
                                   "vae/diffusion_pytorch_model.safetensors": b"x" * 16})
    site.add_civitai(9, "Checkpoint", [CivitaiFile("old.ckpt", b"x", format="PickleTensor")])

    with pytest.raises(StudioError, match=r"is a pickle \(.ckpt\).* not pulled"):
        hub.pull("org/pickled/model.ckpt", workspace)
    assert site.requests == []  # refused by its name, before any request
    with pytest.raises(StudioError, match="is a pickle, which can run code"):
        hub.pull("org/pickled/model.safetensors", workspace)  # refused by its bytes
    before = len(site.requests)
    with pytest.raises(StudioError, match=r"no plain \.safetensors weights for unet/ \(diffusion_pytorch_model.bin\)"):
        hub.pull("org/bin-only", workspace)
    assert not [r for r in site.requests[before:] if r[0] == "storage"]  # no weight was downloaded
    with pytest.raises(StudioError, match="offers old.ckpt, no .safetensors file"):
        hub.pull("civitai:9", workspace)
    assert not site.requested("hub", "/api/download/")
    assert _leftovers(workspace) == []


@pytest.mark.slow(seconds=8)
def test_unknown_names_and_failures_are_one_line(site, workspace, tmp_path, monkeypatch):
    site.add_repo("org/private", BUILTIN_DIR, private=True)
    site.token = "hf-secret"
    done = subprocess.run([sys.executable, "-m", "studio", "models", "pull", "nobody/nothing", "--workspace",
                           str(workspace.root)], capture_output=True, text=True, cwd=tmp_path,
                          env=_cli_env(HF_ENDPOINT=site.hub_url))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "No model nobody/nothing on" in done.stderr, done.stderr

    cases = [("civitai:999", "does not exist (404"), ("org/private", "401): check the name; if it is private or gated, "
                                                                     "set HF_TOKEN"),
             (f"{REPO}@v9", f"No model {REPO} on"), ("org/private/unet/none.safetensors", "401")]
    for name, message in cases:
        with pytest.raises(StudioError, match=re.escape(message)) as caught:
            hub.pull(name, workspace)
        assert "\n" not in str(caught.value)
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    assert hub.pull("org/private", workspace)[1]
    with pytest.raises(StudioError, match="has no revision 'v9'"):
        hub.pull("org/private@v9", workspace)
    with pytest.raises(StudioError, match="has no file unet/none.safetensors"):
        hub.pull("org/private/unet/none.safetensors", workspace)

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StudioError, match="HF_HUB_OFFLINE is set"):
        hub.pull("org/other", workspace)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    site.add_repo(REPO, BUILTIN_DIR)
    with pytest.raises(StudioError, match="needs 0.01 GB but the workspace's disk has 0.00 GB free"):
        hub.pull(REPO, workspace)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    closed = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv(hub.CIVITAI_ENDPOINT_ENV, closed)
    with pytest.raises(StudioError, match="Could not download civitai:5 on .* nothing was kept"):
        hub.pull("civitai:5", workspace)
    with pytest.raises(StudioError, match="is not a model name"):
        hub.pull("not a name", workspace)
    entries = hub.read_index(workspace)
    assert list(entries) == ["org/private"] and _leftovers(workspace) == sorted(
        ["models/index.json", *(f"models/org--private/{p}" for p in _pipeline_files())])


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pipeline_files() -> list[str]:
    return ["model_index.json"] + [p.relative_to(BUILTIN_DIR).as_posix() for p in BUILTIN_DIR.rglob("*")
                                   if p.is_file() and p.parent.name in ("scheduler", "text_encoder", "tokenizer",
                                                                        "unet", "vae")]


# --------------------------------------------------------------------------- captioners by name
def _pictures(folder: Path) -> Path:
    folder.mkdir()
    for i, (shape, colour, background) in enumerate([("circle", "red", "blue"), ("square", "yellow", "black")]):
        world.render(shape, colour, background).save(folder / f"{i}.png")
    return folder


def _caption_by_name(site, workspace, tmp_path, name: str, model_folder: Path, extra: dict[str, bytes]):
    """Serve `model_folder` (plus `extra` files a pull must leave alone) as `name`; caption
    through the Datasets tab's action by name, and compare with the folder used directly."""
    from studio.datasets import read_caption
    from studio.datasets.captioning import caption_dataset
    from ui import datasets_view as dv

    files = {p.relative_to(model_folder).as_posix(): p.read_bytes() for p in model_folder.rglob("*") if p.is_file()}
    site.add_repo(name, {**files, **extra})
    by_name, direct = _pictures(tmp_path / "by-name"), _pictures(tmp_path / "direct")
    shares = []
    note = dv.auto_caption(by_name, name, "overwrite", 0.35, False, "", lambda share, desc: shares.append(desc),
                           workspace=workspace)
    assert "2 caption file(s) written" in note and any(d.startswith(f"Pulling {name}") for d in shares)
    caption_dataset(direct, model_folder, mode="overwrite", threshold=0.35 if "wd14" in name else None)
    captions = [read_caption(by_name / f"{i}.png") for i in range(2)]
    assert all(captions) and captions == [read_caption(direct / f"{i}.png") for i in range(2)]
    pulled = workspace.captioners_dir / name.replace("/", "--")
    assert sorted(p.name for p in pulled.iterdir()) == sorted(files)  # none of `extra`
    return pulled


def test_blip_by_name_in_the_datasets_tab(site, workspace, tmp_path, image_to_text_folders):  # noqa: F811
    _caption_by_name(site, workspace, tmp_path, "test/tiny-blip", image_to_text_folders["blip"],
                     {"pytorch_model.bin": pickle.dumps({}), "tf_model.h5": b"h5", "README.md": b"# BLIP"})


def test_florence2_by_name_in_the_datasets_tab(site, workspace, tmp_path, florence2_folder):  # noqa: F811
    _caption_by_name(site, workspace, tmp_path, "test/tiny-florence-2", florence2_folder,
                     {"modeling_florence2.py": b"raise SystemExit", "model.fp16.safetensors": b"x"})


def test_wd14_tagger_by_name_in_the_datasets_tab(site, workspace, tmp_path, tagger_folder):  # noqa: F811
    from studio.datasets.captioning import load_captioner

    pulled = _caption_by_name(site, workspace, tmp_path, "test/tiny-wd14", tagger_folder,
                              {"model.safetensors": b"timm weights", "config.json": b"{}", "sample.png": b"png"})
    site.repos.clear()  # gone: the name is found offline
    assert load_captioner("test/tiny-wd14", workspace=workspace).name == str(pulled)
