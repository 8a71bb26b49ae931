"""A config is checked before it becomes a run, reading the dataset the way the trainer
does: every problem at once, one line each, naming the field; nothing queued that cannot train."""
from __future__ import annotations

import pytest
from PIL import Image

from studio.errors import StudioError
from tests.conftest import demo_config, run_cli

MISSING_MODEL = "/nonexistent/model.safetensors"


def fake_png_dataset(workspace, name="notes"):
    """A dataset whose only "image" is a text file named .png (the studio's own import may
    refuse such a file: it is written here directly)."""
    folder = workspace.dataset_dir(name)
    folder.mkdir(parents=True)
    (folder / "notes.png").write_text("shopping list, not a picture")
    (folder / "notes.txt").write_text("sks, a star")
    return folder


def workspace_config(name="notes", **fields):
    config = demo_config()
    config.dataset.path = None
    config.dataset.name = name
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def test_every_problem_at_once_and_no_run_is_made(workspace):
    from studio.jobs import enqueue, list_jobs
    from studio.jobs.runs import check_training, create_run

    fake_png_dataset(workspace)
    config = workspace_config(base_model=MISSING_MODEL)
    check = check_training(config, workspace)
    assert [p.field for p in check.problems] == ["base_model", "dataset.name"]
    assert "not found" in check.problems[0].message
    assert "'notes' has no training image that can be read (notes.png:" in check.problems[1].message
    assert "Datasets tab" in check.problems[1].message

    with pytest.raises(StudioError) as refused:
        create_run(config, workspace)
    lines = str(refused.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("base_model: ") and lines[1].startswith("dataset.name: ")
    with pytest.raises(StudioError, match="notes.png"):
        enqueue(workspace, config, start_supervisor=False)
    assert list_jobs(workspace) == [] and not any(workspace.runs_dir.iterdir())


def test_usable_datasets_pass_with_warnings_for_what_training_skips(workspace):
    from studio.jobs.runs import check_training

    folder = fake_png_dataset(workspace, "mixed")
    Image.new("RGB", (64, 64), "purple").save(folder / "star.png")
    config = workspace_config("mixed")
    config.dataset.resolution = 128
    check = check_training(config, workspace)
    assert check.problems == [] and check.images == 1 and check.images_per_epoch == 1
    skipped, small = check.warnings
    assert skipped.startswith("1 file(s) cannot be read and will be skipped: notes.png")
    assert small.startswith("1 of 1 training image(s) are smaller than the 128 px resolution") and "star.png" in small

    config.dataset.resolution = 64
    config.dataset.class_prompt, config.dataset.num_class_images = "a shape", 5
    check = check_training(config, workspace)
    assert check.warnings == [skipped] and check.missing_class_images == 5


def test_resume_refuses_a_run_that_still_cannot_train(workspace):
    from studio.jobs import queue as jobs

    folder = workspace.dataset_dir("stars")
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "purple").save(folder / "star.png")
    job = jobs.enqueue(workspace, workspace_config("stars"), start_supervisor=False)
    jobs._update(workspace, job.id, state="failed", message="the dataset broke")
    (folder / "star.png").write_text("no longer a picture")
    with pytest.raises(StudioError, match="'stars' has no training image that can be read"):
        jobs.resume(workspace, job.id, start_supervisor=False)
    assert jobs.get_job(workspace, job.id).state == "failed"

    Image.new("RGB", (64, 64), "purple").save(folder / "star.png")  # fixed: it can go again
    assert jobs.resume(workspace, job.id, start_supervisor=False).state == "queued"


def test_a_run_whose_dataset_broke_after_queueing_fails_with_the_same_line(workspace):
    from studio.jobs import queue as jobs
    from studio.jobs.runs import iter_events
    from trainers.trainer import AdapterTrainer

    folder = workspace.dataset_dir("stars")
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "purple").save(folder / "star.png")
    job = jobs.enqueue(workspace, workspace_config("stars"), start_supervisor=False)
    (folder / "star.png").write_text("no longer a picture")
    with pytest.raises(StudioError, match="^dataset.name: 'stars' has no training image that can be read"):
        AdapterTrainer(job.run_dir(workspace), show_progress=False).run()
    errors = [e["message"] for e in iter_events(job.run_dir(workspace)) if e["type"] == "error"]
    assert len(errors) == 1 and "star.png" in errors[0]


@pytest.mark.slow(seconds=6)
def test_cli_train_prints_each_problem_on_its_own_line(tmp_path):
    from studio.config import save_config
    from studio.workspace import Workspace

    workspace = Workspace.open(tmp_path / "ws")
    fake_png_dataset(workspace)
    save_config(workspace_config(base_model=MISSING_MODEL), tmp_path / "bad.toml")
    result = run_cli("train", tmp_path / "bad.toml", "--workspace", workspace.root, "--quiet", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "base_model:" in lines[0] and "notes.png" in lines[1]
    assert not any(workspace.runs_dir.iterdir())


@pytest.mark.slow(seconds=30)
def test_check_settings_on_the_page_names_the_fields_and_logs_no_traceback(tmp_path):
    from studio.workspace import Workspace
    from tests.live_server import Api, running_server

    workspace = Workspace.open(tmp_path / "ws")
    fake_png_dataset(workspace)
    with running_server(workspace.root) as server:
        api = Api(server.url)
        try:
            result = api.call("check_settings", {"train-dataset": "notes", "train-base-model": MISSING_MODEL})
        finally:
            api.close()
        assert result.skipped and result.error is None, result
        messages = [message for _, message in result.warnings]
        assert len(messages) == 2, messages
        assert messages[0].startswith("Base model: ") and "not found" in messages[0]
        assert messages[1].startswith("Dataset: 'notes' has no training image that can be read (notes.png:")
        assert server.alive() and "Traceback" not in server.log_text()
    assert not any(workspace.runs_dir.iterdir())
