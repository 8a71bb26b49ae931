"""`pip install .` (not editable) gives a working studio: the wheel holds every module and
every shipped file, and the installed package finds its built-in model and presets with no
checkout around it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from studio.config import load_config
from tests.conftest import ROOT


def _tracked(*folders: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *folders], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tracked files: setuptools builds inside the source tree, and
    two test processes building in the checkout at once broke each other's build/ folder."""
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"
    for name in _tracked():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (path,) = folder.glob("lora_studio-*.whl")
    return path


@pytest.mark.slow(seconds=30)
def test_the_wheel_holds_every_module_and_shipped_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    code = [p for p in _tracked("studio", "trainers", "ui") if p.endswith(".py")]
    assert code and not [p for p in code if p not in names]
    data = {p: "studio/" + p for p in _tracked("assets", "presets")}
    assert data and not [p for p, inside in data.items() if inside not in names]


@pytest.mark.slow(seconds=40)
def test_the_installed_package_generates_and_finds_its_presets(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "LORA_STUDIO_WORKSPACE": str(elsewhere / "ws")}

    def studio(*args, timeout=300):
        return subprocess.run([sys.executable, "-m", "studio", *map(str, args)], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=timeout)

    where = subprocess.run([sys.executable, "-c", "import studio; print(studio.__file__); print(studio.ASSETS_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    module_file, assets = where.stdout.split()
    assert module_file.startswith(str(site)) and assets == str(site / "studio" / "assets")
    done = studio("generate", "--prompt", "a red circle on a white background", "--steps", "2", "--out", "x.png")
    assert done.returncode == 0, done.stderr
    assert (elsewhere / "x.png").stat().st_size > 0
    preset = subprocess.run([sys.executable, "-c", "from studio.config import load_config; "
                             "c = load_config('tiny-demo'); print(c.dataset.path)"],
                            cwd=elsewhere, env=env, capture_output=True, text=True)
    assert preset.returncode == 0, preset.stderr
    assert preset.stdout.strip() == str(site / "studio" / "assets" / "demo-dataset")
    assert load_config("tiny-demo").name == "tiny-demo"  # in a checkout too
