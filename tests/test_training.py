"""The end-to-end path on the built-in model: train -> adapter file -> generation."""
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

from tests.conftest import ROOT, demo_config, run_cli


def _fixed_loss(trainer, micro_steps=range(1000, 1024)) -> float:
    """Mean loss over fixed (noise, timestep, example) draws: comparable across training."""
    with torch.no_grad():
        return float(np.mean([trainer.loss(k).item() for k in micro_steps]))


@pytest.mark.slow
def test_training_lowers_loss_and_adapter_changes_generation(trained_demo, tmp_path):
    from studio.adapters import load_adapter
    from studio.generation.engine import AdapterUse, Engine, GenerateRequest

    trainer = trained_demo["trainer"]
    trained_loss = _fixed_loss(trainer)
    # The same draws with the LoRA switched off are the base model's loss.
    unet = trainer.accelerator.unwrap_model(trainer.denoiser)
    unet.disable_adapters()
    base_loss = _fixed_loss(trainer)
    unet.enable_adapters()
    # Same draws with and without the adapter: any drop is signal, not sampling noise.
    # (1.7% on the untrained built-in weights; raise the bar when trained weights ship.)
    assert trained_loss < base_loss * 0.99, (trained_loss, base_loss)

    events = [json.loads(line) for line in (trained_demo["run_dir"] / "events.jsonl").read_text().splitlines()]
    kinds = [e["type"] for e in events]
    # set-up reports its phases (loading, caching n/N) and its disk cache (trainers/cache.py) first
    setup = kinds[:kinds.index("start")]
    assert set(setup) == {"phase", "cache"} and events[0] == {**events[0], "type": "phase", "phase": "loading"}
    assert kinds[-1] == "done" and "progress" in kinds and "sample" in kinds
    assert all(os.path.exists(p) for e in events if e["type"] == "sample" for p in e["paths"])

    adapter = trained_demo["adapter"]
    file = load_adapter(adapter)
    adapted = [n for n, _ in trainer.pipe.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert len(file.modules) == len(adapted) > 0 and file.ranks == [8] and file.alphas == [8.0]
    engine = Engine()
    request = dict(prompt="a sks star on a white background", seed=3, steps=10)
    base = np.asarray(engine.generate(GenerateRequest(**request))[0], dtype=np.int16)
    with_lora = np.asarray(engine.generate(GenerateRequest(**request, adapters=[AdapterUse(adapter, 1.0)]))[0], dtype=np.int16)
    at_zero = np.asarray(engine.generate(GenerateRequest(**request, adapters=[AdapterUse(adapter, 0.0)]))[0], dtype=np.int16)
    base_again = np.asarray(engine.generate(GenerateRequest(**request))[0], dtype=np.int16)
    assert np.abs(with_lora - base).mean() > 2.0
    assert np.array_equal(at_zero, base)
    assert np.array_equal(base_again, base)
    assert engine.pipeline_loads == 1


@pytest.mark.slow(seconds=50)
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    from studio.adapters import load_adapter
    from studio.config import save_config

    # Long enough that the kill always lands mid-run, even on a busy machine.
    config = demo_config(max_steps=150, every_n_steps=10)
    config.sampling.prompts = []
    config_path = tmp_path / "demo.toml"
    save_config(config, config_path)

    full = run_cli("train", config_path, "--workspace", tmp_path / "a", "--quiet")
    assert full.returncode == 0, full.stderr

    ws = tmp_path / "b"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "studio", "train", str(config_path), "--workspace", str(ws),
                             "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:
        logs = list((ws / "runs").glob("*/events.jsonl"))
        lines = logs[0].read_text().splitlines() if logs else []
        if any(json.loads(l)["type"] == "checkpoint" and json.loads(l)["step"] >= 20 for l in lines):
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((ws / "adapters").glob("*.safetensors"))

    resumed = run_cli("train", config_path, "--workspace", ws, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(l) for l in next((ws / "runs").glob("*/events.jsonl")).read_text().splitlines()]
    assert any(e["type"] == "resume" and e["step"] >= 20 for e in events)

    a = load_adapter(full.stdout.strip().splitlines()[-1])
    b = load_adapter(resumed.stdout.strip().splitlines()[-1])
    assert a.modules.keys() == b.modules.keys()
    diff = max(float((a.modules[k].up @ a.modules[k].down.flatten(1) - b.modules[k].up @ b.modules[k].down.flatten(1)).abs().max())
               for k in a.modules)
    assert diff <= 1e-6


@pytest.mark.slow(seconds=8)
def test_bad_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nmax_steps = "many"\n')
    result = run_cli("train", bad, "--workspace", tmp_path / "ws")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "training.max_steps" in result.stderr
    assert "Traceback" not in result.stderr

    missing = run_cli("train", tmp_path / "nope.toml", "--workspace", tmp_path / "ws")
    assert missing.returncode == 2 and "not found" in missing.stderr

    unknown = run_cli("generate", "--prompt", "x", "--out", tmp_path / "o.png", "--steps", "0")
    assert unknown.returncode == 2 and "steps" in unknown.stderr and "Traceback" not in unknown.stderr


def test_disk_full_while_saving_keeps_the_last_checkpoint(workspace, monkeypatch):
    import errno

    from studio.jobs.runs import create_run
    from trainers import checkpoints
    from trainers.checkpoints import list_checkpoints, load_checkpoint
    from trainers.trainer import AdapterTrainer, TrainingFailed

    config = demo_config(max_steps=6, every_n_steps=2)
    config.sampling.prompts = []
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    real_write = checkpoints.atomic_write_bytes

    def fill_disk_after_first(path, data):
        if list_checkpoints(trainer.run_dir):  # the disk fills up after the first checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(checkpoints, "atomic_write_bytes", fill_disk_after_first)
    with pytest.raises(TrainingFailed, match="disk is full.*last checkpoint is intact"):
        trainer.run()
    saved = list_checkpoints(trainer.run_dir)
    assert [p.name for p in saved] == ["step-000002.pt"] and load_checkpoint(saved[0])["step"] == 2
    events = [json.loads(l) for l in (trainer.run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "error" and "disk is full" in events[-1]["message"]


@pytest.mark.slow(seconds=20)
def test_class_images_are_made_before_the_worker_starts(tmp_path):
    """The worker only reads its dataset: the class pictures prior preservation needs are
    drawn by the studio (the queue and `lora-studio train`) before it starts, into the
    workspace's own folder keyed by model, prompt and resolution (never into the dataset),
    and a later run with the same key reuses them."""
    import shutil

    from studio import ASSETS_DIR
    from studio.errors import StudioError
    from studio.jobs.runs import class_image_plan, create_run, prepare_class_images
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    dataset = tmp_path / "ds"
    shutil.copytree(ASSETS_DIR / "demo-dataset", dataset, ignore=shutil.ignore_patterns("reg"))
    before = sorted(p.relative_to(dataset) for p in dataset.rglob("*"))
    config = demo_config(max_steps=2)
    config.dataset.path, config.dataset.class_prompt, config.dataset.num_class_images = str(dataset), "a shape", 3
    config.sampling.steps = 2
    workspace = Workspace.open(tmp_path / "ws")
    run_dir = create_run(config, workspace)
    with pytest.raises(StudioError, match="num_class_images asks for 3"):
        AdapterTrainer(run_dir, show_progress=False).run()

    assert prepare_class_images(run_dir) == 3
    plan = class_image_plan(config, workspace)
    assert plan.folder.parent == workspace.root / "class-images" and plan.folder.name.startswith("a-shape-64px-")
    made = sorted(plan.folder.glob("class_*.png"))
    assert [p.name for p in made] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert all(p.with_suffix(".txt").read_text() == "a shape" for p in made)
    assert sorted(p.relative_to(dataset) for p in dataset.rglob("*")) == before  # the dataset is untouched
    assert prepare_class_images(run_dir) == 0
    later = config.model_copy(deep=True)
    later.seed, later.dataset.num_class_images = 7, 4  # another seed shares the pictures; one more is drawn
    assert prepare_class_images(create_run(later, workspace)) == 1
    assert [p.read_bytes() for p in made] == [p.read_bytes() for p in sorted(plan.folder.glob("class_*.png"))[:3]]
    assert AdapterTrainer(run_dir, show_progress=False).run().is_file()
