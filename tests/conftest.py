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


def pytest_collection_modifyitems(items):
    """Longest first, each followed by a quick test. pytest-xdist (with --maxschedchunk 1,
    pyproject.toml) starts every worker on two consecutive tests of this order and then
    hands out one at a time, so the minutes-long trainings start at once on separate
    workers and the quick tests fill in around them."""
    ranked = sorted(items, key=_expected_seconds, reverse=True)
    slow = [item for item in ranked if _expected_seconds(item)]
    quick = ranked[len(slow):]
    paired = [item for pair in zip(slow, quick) for item in pair]
    items[:] = paired + slow[len(quick):] + quick[len(slow):]


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
