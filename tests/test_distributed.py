"""Data-parallel training through accelerate's launcher, on the CPU with gloo: two processes
with batch 1 train what one process with batch 2 trains; events are written once; a killed
process and a cancel leave a run that resumes to the uninterrupted result."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import demo_config

STEPS = 6


def _config(**training):
    config = demo_config(max_steps=STEPS, learning_rate=2e-2, log_every_n_steps=1, num_threads=1,
                         lr_scheduler="cosine", **training)
    config.checkpoints.every_n_steps = 2
    config.sampling.steps = 2
    return config


def _launch(run_dir) -> subprocess.Popen:
    from studio.jobs.runs import run_config, worker_command

    return subprocess.Popen(worker_command(run_dir, run_config(run_dir)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _relative_l2(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    norm = sum(float(a[k].double().square().sum()) for k in a)
    return (diff / norm) ** 0.5


def _events(run_dir) -> list[dict]:
    from studio.jobs.runs import iter_events

    return list(iter_events(run_dir))


def _losses(run_dir) -> list[float]:
    return [e["loss"] for e in _events(run_dir) if e["type"] == "progress"]


def _workers(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the launcher's training processes."""
    import psutil

    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "trainers" in " ".join(child.cmdline()):
            found[int(rank)] = child.pid
    return found


def _wait_for(predicate, timeout: float = 240):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-process run (batch 1 each) and a one-process run with batch 2."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    workspace = Workspace.open(tmp_path_factory.mktemp("dp") / "ws")
    two = create_run(_config(batch_size=1, num_processes=2), workspace)
    output = _finish(_launch(two))
    (done,) = [e for e in _events(two) if e["type"] == "done"]
    one = create_run(_config(batch_size=2), workspace)
    adapter = AdapterTrainer(one, show_progress=False).run()
    return {"workspace": workspace, "two": two, "two_adapter": done["adapter"], "output": output,
            "one": one, "one_adapter": adapter}


@pytest.mark.slow(seconds=70)
def test_two_processes_train_what_one_process_with_the_whole_batch_trains(reference):
    two, one = reference["two"], reference["one"]
    assert _relative_l2(_tensors(reference["one_adapter"]), _tensors(reference["two_adapter"])) < 1e-4
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4) and len(_losses(two)) == STEPS
    kinds = [e["type"] for e in _events(two)]
    assert kinds.count("start") == 1 and kinds.count("done") == 1 and kinds.count("sample") == 1
    assert [e["step"] for e in _events(two) if e["type"] == "checkpoint"] == [2, 4]
    assert [e["step"] for e in _events(two) if e["type"] == "progress"] == list(range(1, STEPS + 1))
    # the scheduler steps once per optimizer step, not once per process
    lrs = [e["lr"] for e in _events(two) if e["type"] == "progress"]
    assert lrs == pytest.approx([e["lr"] for e in _events(one) if e["type"] == "progress"])


@pytest.mark.slow(seconds=60)
def test_a_killed_process_then_resume_ends_with_the_uninterrupted_adapter(reference):
    from studio.jobs.runs import create_run

    run_dir = create_run(_config(batch_size=1, num_processes=2), reference["workspace"])
    launcher = _launch(run_dir)
    _wait_for(lambda: any(e["type"] == "checkpoint" for e in _events(run_dir)))
    workers = _workers(launcher)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGKILL)
    _finish(launcher)
    assert not any(e["type"] == "done" for e in _events(run_dir))
    errors = [e for e in _events(run_dir) if e["type"] == "error"]
    assert len(errors) <= 1 and all("Another process of this run stopped" in e["message"] for e in errors)

    _finish(_launch(run_dir))
    kinds = [e["type"] for e in _events(run_dir)]
    assert kinds.count("resume") == 1 and kinds.count("done") == 1
    (done,) = [e for e in _events(run_dir) if e["type"] == "done"]
    assert _relative_l2(_tensors(reference["two_adapter"]), _tensors(done["adapter"])) < 1e-6


@pytest.mark.slow(seconds=40)
def test_a_cancel_stops_every_process_at_the_same_step_with_one_checkpoint(reference):
    from studio.jobs.runs import create_run
    from trainers.checkpoints import list_checkpoints

    config = _config(batch_size=1, num_processes=2)
    config.checkpoints.every_n_steps = 0
    config.training.max_steps = 400
    run_dir = create_run(config, reference["workspace"])
    launcher = _launch(run_dir)
    _wait_for(lambda: any(e["type"] == "progress" for e in _events(run_dir)))
    os.kill(_workers(launcher)[1], signal.SIGTERM)  # one process asked: both stop
    _finish(launcher)
    cancelled = [e for e in _events(run_dir) if e["type"] == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["step"] < 400
    checkpoints = list_checkpoints(run_dir)
    assert [p.name for p in checkpoints] == [f"step-{cancelled[0]['step']:06d}.pt"]
    assert not any(e["type"] == "error" for e in _events(run_dir))


@pytest.mark.slow(seconds=70)
def test_two_processes_with_shuffled_captions_ema_and_validation_match_one_process(tmp_path):
    """Caption dropout and tag order come from the per-sample generators, so two processes
    train what one does; the EMA, the validation loss and TensorBoard are written once."""
    import shutil

    from studio import ASSETS_DIR
    from studio.jobs.runs import TENSORBOARD_DIR, create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    folder = tmp_path / "tagged"
    shutil.copytree(ASSETS_DIR / "demo-dataset", folder, ignore=shutil.ignore_patterns("reg"))
    for i, caption in enumerate(sorted(folder.glob("*.txt"))):
        caption.write_text(f"a sks shape, purple, {'white' if i % 2 else 'black'} background, centered, small")
    workspace = Workspace.open(tmp_path / "ws")

    def config(**training):
        c = _config(ema_decay=0.5, ema_start_step=2, validate_every_n_steps=3, **training)
        c.dataset.path, c.dataset.shuffle_tags, c.dataset.caption_dropout_rate = str(folder), True, 0.3
        c.dataset.validation_split = 0.2
        return c

    two = create_run(config(batch_size=1, num_processes=2), workspace)
    _finish(_launch(two))
    (done,) = [e for e in _events(two) if e["type"] == "done"]
    one = create_run(config(batch_size=2), workspace)
    one_adapter = AdapterTrainer(one, show_progress=False).run()
    assert _relative_l2(_tensors(one_adapter), _tensors(done["adapter"])) < 1e-4
    ema_one = one_adapter.with_name(one_adapter.stem + "-ema.safetensors")
    ema_two = Path(done["adapter"]).with_name(Path(done["adapter"]).stem + "-ema.safetensors")
    assert _relative_l2(_tensors(ema_one), _tensors(ema_two)) < 1e-4
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    validation = [(e["step"], e["loss"]) for e in _events(two) if e["type"] == "validation"]
    assert [step for step, _ in validation] == [3, 6]
    assert [loss for _, loss in validation] == pytest.approx(
        [e["loss"] for e in _events(one) if e["type"] == "validation"], rel=1e-4)
    assert len(list((two / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1


def test_deepspeed_and_fsdp_configs_are_refused_with_the_reason(tmp_path):
    from studio.config import check_device_support
    from studio.errors import StudioError

    for kind in ("DEEPSPEED", "FSDP"):
        path = tmp_path / f"{kind}.yaml"
        path.write_text(f"distributed_type: {kind}\nnum_processes: 2\n")
        with pytest.raises(StudioError, match="exact resume"):
            check_device_support(_config(accelerate_config=str(path)))
    plain = tmp_path / "multi.yaml"
    plain.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\n")
    check_device_support(_config(accelerate_config=str(plain)))
