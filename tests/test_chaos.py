"""Chaos: kill -9 a training worker at random moments, 20 times; every resume works, the
final adapter equals an uninterrupted run, and no corrupt or temporary file is left."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, demo_config

KILLS = 20


def _worker(run_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainers", str(run_dir), "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.mark.slow(seconds=110)
def test_twenty_kills_resume_to_the_same_adapter(tmp_path):
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.checkpoints import list_checkpoints, load_checkpoint

    config = demo_config(max_steps=60, every_n_steps=2)  # frequent checkpoints: kills land in writes
    config.checkpoints.keep_last = 2
    config.sampling.prompts = []
    config.training.num_threads = 1

    reference = _worker(create_run(config, Workspace.open(tmp_path / "reference")))
    reference_adapter = reference.communicate(timeout=600)[0].strip().splitlines()[-1]

    run_dir = create_run(config, Workspace.open(tmp_path / "chaos"))
    rng = random.Random(1234)
    kills = 0
    while kills < KILLS:
        proc = _worker(run_dir)
        # Most kills wait for real progress (a new checkpoint); some strike during start-up.
        deadline = time.time() + rng.uniform(0.5, 3.0) if rng.random() < 0.3 else time.time() + 120
        before = len(list_checkpoints(run_dir)) and list_checkpoints(run_dir)[-1].name
        while time.time() < deadline and proc.poll() is None:
            latest = list_checkpoints(run_dir)
            if rng.random() >= 0.3 and latest and latest[-1].name != before:
                # within about one checkpoint interval (2 steps): longer, a fast machine ran a
                # fifth of the run per life and the 60 steps ended after 6 kills
                time.sleep(rng.uniform(0, 0.15))
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            break  # finished before this kill: the remaining kills are moot
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        for checkpoint in list_checkpoints(run_dir):
            load_checkpoint(checkpoint)  # every checkpoint on disk is whole
    final = _worker(run_dir)
    out = final.communicate(timeout=600)[0]
    assert final.returncode == 0, out
    assert kills >= 10, f"only {kills} kills landed before the run finished"

    a, b = load_file(reference_adapter), load_file(out.strip().splitlines()[-1])
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    leftovers = [p for p in (tmp_path / "chaos").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
