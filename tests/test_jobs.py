"""The job queue and supervisor: runs outlive the UI, dead workers resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, demo_config

ENQUEUE = """
import sys
from studio.config import load_config
from studio.jobs import enqueue
from studio.workspace import Workspace
job = enqueue(Workspace.open(sys.argv[1]), load_config(sys.argv[2]))
print(job.id, flush=True)
import time
time.sleep(600)  # stands in for the UI process staying up until it is killed
"""


def _wait(predicate, timeout=300, every=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def _events(run_dir):
    path = run_dir / "events.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_job_outlives_ui_and_resumes_after_kill(tmp_path):
    from studio.jobs import queue as jobs
    from studio.config import save_config
    from studio.workspace import Workspace

    config = demo_config(max_steps=60, every_n_steps=10)
    config.sampling.prompts = []
    config_path = tmp_path / "job.toml"
    save_config(config, config_path)
    workspace = Workspace.open(tmp_path / "ws")

    ui = subprocess.Popen([sys.executable, "-c", ENQUEUE, str(workspace.root), str(config_path)],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
    job_id = ui.stdout.readline().strip()
    run_dir = workspace.run_dir(job_id)

    # The "UI" dies while the job runs; the job goes on.
    _wait(lambda: jobs.get_job(workspace, job_id).state == "running")
    ui.send_signal(signal.SIGKILL)
    ui.wait()

    # kill -9 the worker after its first checkpoint: the supervisor resumes it.
    _wait(lambda: any(e["type"] == "checkpoint" for e in _events(run_dir)))
    first_pid = jobs.get_job(workspace, job_id).pid
    os.kill(first_pid, signal.SIGKILL)

    final = _wait(lambda: (j := jobs.get_job(workspace, job_id)).state in ("done", "failed") and j)
    assert final.state == "done", final.message
    assert final.attempts == 2 and final.adapter and os.path.exists(final.adapter)
    kinds = [e["type"] for e in _events(run_dir)]
    assert "resume" in kinds and kinds[-1] == "done"

    # A "restarted UI" reading the workspace sees the final state.
    restarted = subprocess.run([sys.executable, "-c",
                                "import sys; from studio.jobs import list_jobs; from studio.workspace import Workspace;"
                                "print(list_jobs(Workspace.open(sys.argv[1]))[0].state)", str(workspace.root)],
                               cwd=ROOT, capture_output=True, text=True)
    assert restarted.stdout.strip() == "done"


def test_cancel_and_resume_states(tmp_path):
    from studio.jobs import queue as jobs
    from studio.errors import StudioError
    from studio.workspace import Workspace

    workspace = Workspace.open(tmp_path / "ws")
    job = jobs.enqueue(workspace, demo_config(), start_supervisor=False)
    assert job.state == "queued" and (workspace.run_dir(job.id) / "config.toml").is_file()
    assert jobs.cancel(workspace, job.id).state == "cancelled"
    with pytest.raises(StudioError, match="only queued or running"):
        jobs.cancel(workspace, job.id)
    assert jobs.resume(workspace, job.id, start_supervisor=False).state == "queued"
    with pytest.raises(StudioError, match="only failed or cancelled"):
        jobs.resume(workspace, job.id, start_supervisor=False)


def test_supervisor_marks_dead_running_job_for_resume(tmp_path):
    """A job left 'running' by a crashed supervisor, whose worker is gone, is queued again."""
    from studio.jobs import queue as jobs
    from studio.workspace import Workspace

    workspace = Workspace.open(tmp_path / "ws")
    job = jobs.enqueue(workspace, demo_config(), start_supervisor=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    jobs._update(workspace, job.id, state="running", pid=dead.pid, attempts=1)
    jobs.Supervisor(workspace).reconcile()
    again = jobs.get_job(workspace, job.id)
    assert again.state == "queued" and "resuming" in again.message


def test_an_idle_supervisor_exits_soon_and_is_reaped(tmp_path):
    """Started by a long-lived process (the UI), the supervisor leaves no zombie behind and
    does not linger for minutes once the queue is empty."""
    from studio.jobs import queue as jobs
    from studio.workspace import Workspace

    workspace = Workspace.open(tmp_path / "ws")
    jobs.ensure_supervisor(workspace)
    lock = workspace.root / "supervisor.lock"
    pid = _wait(lambda: lock.read_text() and json.loads(lock.read_text())["pid"], timeout=30)
    # gone from the process table: exited *and* reaped (a zombie keeps its /proc entry)
    _wait(lambda: not os.path.exists(f"/proc/{pid}"), timeout=jobs.IDLE_EXIT_S + 20)
    assert not jobs.supervisor_running(workspace)
