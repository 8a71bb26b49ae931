"""Training a mixture's gates is a run like any other: members frozen, gates learn from the
members' own pictures with the diffusion loss (the validation loss drops), a worker killed
-9 resumes to exactly the uninterrupted gates, and the engine draws with what was trained."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from tests.conftest import ROOT, demo_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A LoRA and a LoHa trained a few steps on the demo pictures (trigger "sks")."""
    from toyworld.fidelity import train
    from studio.workspace import Workspace

    torch.manual_seed(0)  # the members' random init
    workspace = Workspace.open(tmp_path_factory.mktemp("mixtrain") / "ws")
    plain = dict(steps=6, prior_preservation=False, learning_rate=5e-3, rank=4, alpha=4.0)
    train(workspace, name="a", type="lora", **plain)
    train(workspace, name="b", type="loha", **plain)
    return workspace


def mixture_config(name: str, gate: str, steps: int):
    config = demo_config(max_steps=steps, every_n_steps=4)
    config.name = name
    config.dataset.path = None  # default: the members' own pictures
    config.dataset.trigger_word = ""
    config.dataset.validation_split = 0.25
    config.training.validate_every_n_steps = 4
    config.training.learning_rate = 0.05
    config.training.num_threads = 1
    config.sampling.prompts = []
    config.mixture.members = ["a", "b"]
    config.mixture.gate = gate
    config.mixture.bands = 2
    return config


def _events(run_dir):
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow(seconds=45)
def test_gates_learn_and_a_killed_run_resumes_to_the_same_gates(workspace):
    from studio.adapters.mixtures.file import load_mixture
    from studio.jobs.runs import create_run
    from trainers.run import train_run

    config = mixture_config("mix", "block_timestep", steps=12)
    reference_run = create_run(config, workspace)
    reference = load_mixture(train_run(reference_run, show_progress=False))
    losses = [e["loss"] for e in _events(reference_run) if e["type"] == "validation"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses
    folder = workspace.dataset_dir("mix-members")
    captions = [p.read_text().strip() for p in sorted(folder.rglob("*.txt"))]
    assert sorted(p.name for p in folder.iterdir()) == ["1_a", "1_b"] and all(c.startswith("a sks") for c in captions)

    run_dir = create_run(config, workspace)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "trainers", str(run_dir), "--quiet"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any(e["type"] == "checkpoint" for e in _events(run_dir)) and time.time() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert not any(e["type"] == "done" for e in _events(run_dir))
    resumed = load_mixture(train_run(run_dir, show_progress=False))
    assert any(e["type"] == "resume" for e in _events(run_dir))
    assert reference.tensors.keys() == resumed.tensors.keys()
    assert max(float((reference.tensors[k] - resumed.tensors[k]).abs().max()) for k in reference.tensors) <= 1e-6
    bands = reference.tensors["gate.bands"]
    assert (bands - 1).abs().max() > 1e-3  # the gates moved from the plain sum
    assert torch.equal(reference.tensors["gate.base"], torch.ones(2))  # the text encoders' gate is not trained


@pytest.mark.slow(seconds=30)
def test_prompt_gates_train_and_the_engine_draws_with_them(workspace):
    from studio.adapters.library import find_adapter
    from studio.adapters.mixtures.file import load_mixture
    from studio.generation.engine import AdapterUse, Engine, GenerateRequest, mixture_uses
    from studio.jobs.runs import create_run
    from trainers.run import train_run

    path = train_run(create_run(mixture_config("routed", "prompt", steps=8), workspace), show_progress=False)
    mixture = load_mixture(path)
    assert mixture.tensors["gate.weight"].abs().max() > 1e-3
    assert not mixture.tensors["gate.weight"][:, 0].any()  # BASE row untouched: text encoders at gate 1
    assert mixture.metadata.get("modelspec.trigger_phrase") == "sks"
    engine = Engine()
    pipe = engine.set_mix("builtin", [])
    uses = {prompt: mixture_uses(AdapterUse(path), mixture, pipe, prompt) for prompt in ("a sks shape", "a red circle")}
    assert uses["a sks shape"][0].block_weights != uses["a red circle"][0].block_weights
    request = dict(prompt="a sks shape on a white background", seed=1, steps=6)
    mixed = engine.generate(GenerateRequest(**request, adapters=[AdapterUse(path, 1.0)]))[0]
    plain = engine.generate(GenerateRequest(**request, adapters=[AdapterUse(find_adapter(workspace, n)) for n in "ab"]))[0]
    assert np.abs(np.asarray(mixed, dtype=np.int16) - np.asarray(plain, dtype=np.int16)).max() > 0


@pytest.mark.slow(seconds=10)
def test_a_mixture_run_is_refused_with_the_reason(workspace):
    from studio.config import TrainConfig
    from studio.jobs.runs import create_run

    config = mixture_config("bad", "block", steps=2)
    config.mixture.members = ["a", "nope"]
    with pytest.raises(StudioError, match="No adapter named 'nope'"):
        create_run(config, workspace)
    config.network.train_text_encoder = True
    with pytest.raises(ValueError, match="train_text_encoder"):
        TrainConfig.model_validate(config.model_dump())
