"""Shared fixtures: offline, fixed thread count, a demo training run trained once."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see studio/openmp.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# One thread: tiny models gain nothing from two, and a busy 2-core machine makes two
# threads up to 50x slower (measured); it also keeps float reductions stable.
torch.set_num_threads(1)


def _expected_seconds(item) -> float:
    slow = item.get_closest_marker("slow")
    return slow.kwargs.get("seconds", 10) if slow else 0


def _shared_fixture_groups(items) -> dict:
    """item -> the id of its group: tests joined, directly or through others, by an instance
    of a module- or class-scoped fixture (a trained run, a built model). xdist's loadgroup
    runs a group on one worker, so each such fixture is built once, not once per worker."""
    parent = {}

    def find(key):
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for item in items:
        keys = [item.nodeid]
        for name in item.fixturenames:
            definitions = item._fixtureinfo.name2fixturedefs.get(name)
            if definitions and definitions[-1].scope in ("module", "class"):
                callspec = getattr(item, "callspec", None)
                index = callspec.indices.get(name) if callspec else None
                keys.append(f"{item.module.__name__}:{name}[{index}]")
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
    return {item: find(item.nodeid) for item in items}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items):
    """Longest first, each followed by a quick test, in units that share a module-scoped
    fixture (one xdist_group each; pyproject.toml runs `--dist loadgroup` in collection
    order). Every worker starts on the longest units, so the minutes-long trainings start at
    once on separate workers and the quick tests fill in around them."""
    for item in items:  # the shared trained run takes longer than a fast lane has
        if "trained_demo" in item.fixturenames and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow(seconds=5))
    groups = _shared_fixture_groups(items)
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(groups[item], []).append(item)
    for group, members in units.items():
        if len(members) > 1:
            for item in members:
                item.add_marker(pytest.mark.xdist_group(group.replace("@", "_")))
    ranked = sorted(units.values(), key=lambda unit: sum(map(_expected_seconds, unit)), reverse=True)
    slow = [unit for unit in ranked if sum(map(_expected_seconds, unit))]
    quick = ranked[len(slow):]
    paired = [unit for pair in zip(slow, quick) for unit in pair]
    items[:] = [item for unit in paired + slow[len(quick):] + quick[len(slow):] for item in unit]


def demo_config(**training):
    """The tiny-demo preset, shortened for tests of the training machinery: a plain rank-8
    attention LoRA without prior preservation, as the tests below expect. (What the preset
    itself teaches is tests/test_fidelity.py's job.)"""
    from studio.config import load_config, network_config

    config = load_config(ROOT / "presets" / "tiny-demo.toml")
    config.network = network_config(rank=8, alpha=8.0)
    config.dataset.num_class_images = 0
    config.training.lr_scheduler = "constant"
    config.training.min_snr_gamma = None
    config.training.learning_rate = 1e-3
    config.training.max_steps = training.pop("max_steps", 60)
    config.checkpoints.every_n_steps = training.pop("every_n_steps", 0)
    config.sampling.every_n_steps = 0
    config.sampling.prompts = ["a sks star on a white background"]
    config.sampling.steps = 5
    for key, value in training.items():
        setattr(config.training, key, value)
    return config


@pytest.fixture
def workspace(tmp_path):
    from studio.workspace import Workspace

    return Workspace.open(tmp_path / "ws")


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """One short demo training run shared by the tests that need a trained adapter."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    workspace = Workspace.open(tmp_path_factory.mktemp("trained") / "ws")
    run_dir = create_run(demo_config(max_steps=80), workspace)
    trainer = AdapterTrainer(run_dir, show_progress=False)
    adapter = trainer.run()
    return {"workspace": workspace, "run_dir": run_dir, "adapter": adapter, "trainer": trainer}


def run_cli(*args, cwd=ROOT, env=None, timeout=600):
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "studio", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
