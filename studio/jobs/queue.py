"""Training jobs: a queue in workspace/studio.db and a supervisor process that runs them.

The UI and the CLI only write rows (enqueue, cancel, resume) and read them back; the
supervisor (`python -m studio.jobs WORKSPACE`, started detached by `ensure_supervisor`)
starts each queued job as `python -m trainers RUN_DIR` in its own process session, one
after another. Neither a closed page nor a killed UI stops a job. A job whose process
dies without finishing is resumed from its last checkpoint (up to MAX_ATTEMPTS times).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from studio.config import TrainConfig
from studio.errors import StudioError
from studio.jobs.runs import (EventLog, check_training, create_run, prepare_class_images, run_config, run_outcome,
                              worker_command)
from studio.workspace import Workspace

log = logging.getLogger(__name__)

STATES = ("queued", "running", "cancelling", "done", "failed", "cancelled")
ACTIVE = ("queued", "running", "cancelling")
MAX_ATTEMPTS = 5
POLL_S = 0.5
#: A supervisor with nothing to do exits after this long; every enqueue or resume starts one.
IDLE_EXIT_S = 5.0
WORKER_LOG = "worker.log"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    message TEXT NOT NULL DEFAULT '',
    adapter TEXT
);
"""


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    state: str
    pid: int | None
    attempts: int
    created: float
    started: float | None
    finished: float | None
    message: str
    adapter: str | None

    def run_dir(self, workspace: Workspace) -> Path:
        return workspace.run_dir(self.id)


@contextlib.contextmanager
def connect(workspace: Workspace):
    """A short-lived connection; WAL lets the UI read while the supervisor writes."""
    conn = sqlite3.connect(workspace.db_path, timeout=30, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(_SCHEMA)
        conn.row_factory = sqlite3.Row
        yield conn
    finally:
        conn.close()


def _job(row) -> Job:
    return Job(**{k: row[k] for k in row.keys()})


def list_jobs(workspace: Workspace) -> list[Job]:
    with connect(workspace) as conn:
        return [_job(r) for r in conn.execute("SELECT * FROM jobs ORDER BY created DESC")]


def get_job(workspace: Workspace, job_id: str) -> Job:
    with connect(workspace) as conn:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise StudioError(f"No job {job_id!r} in {workspace.db_path}.")
    return _job(row)


def _update(workspace: Workspace, job_id: str, **fields) -> None:
    assignments = ", ".join(f"{k} = ?" for k in fields)
    with connect(workspace) as conn:
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))


def enqueue(workspace: Workspace, config: TrainConfig, *, start_supervisor: bool = True) -> Job:
    """Create a run folder for `config`, queue it, and make sure a supervisor runs."""
    run_dir = create_run(config, workspace)
    with connect(workspace) as conn:
        conn.execute("INSERT INTO jobs (id, name, state, created) VALUES (?, ?, 'queued', ?)",
                     (run_dir.name, config.name, time.time()))
    log.info("queued job %s", run_dir.name)
    if start_supervisor:
        ensure_supervisor(workspace)
    return get_job(workspace, run_dir.name)


def cancel(workspace: Workspace, job_id: str) -> Job:
    """Queued jobs are cancelled at once; a running one is asked to save a checkpoint and stop."""
    job = get_job(workspace, job_id)
    if job.state == "queued":
        _update(workspace, job_id, state="cancelled", finished=time.time(), message="cancelled before start")
    elif job.state == "running":
        _update(workspace, job_id, state="cancelling")
        if job.pid and _alive(job.pid):
            # The worker leads its own session: the signal reaches every process of a
            # data-parallel run (accelerate's launcher and its workers) at once.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, signal.SIGTERM)
    else:
        raise StudioError(f"Job {job_id} is {job.state}; only queued or running jobs can be cancelled.")
    return get_job(workspace, job_id)


def resume(workspace: Workspace, job_id: str, *, start_supervisor: bool = True) -> Job:
    """Queue a failed or cancelled job again; it continues from its last checkpoint. A job
    that still cannot train (its dataset broken, its model gone) stays where it is."""
    job = get_job(workspace, job_id)
    if job.state not in ("failed", "cancelled"):
        raise StudioError(f"Job {job_id} is {job.state}; only failed or cancelled jobs can be resumed.")
    check_training(run_config(job.run_dir(workspace)), workspace).raise_problems()
    _update(workspace, job_id, state="queued", attempts=0, message="", finished=None)
    if start_supervisor:
        ensure_supervisor(workspace)
    return get_job(workspace, job_id)


# ------------------------------------------------------------------------ processes
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie has exited; only its parent has not reaped it
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    return True


def _worker_of(pid: int, run_dir: Path) -> bool:
    """True when `pid` is alive and is the worker of `run_dir` (guards against pid reuse)."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return str(run_dir).encode() in cmdline


class Supervisor:
    """Runs queued jobs one after another; one supervisor per workspace (a file lock)."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._children: dict[str, subprocess.Popen] = {}

    def reconcile(self) -> None:
        """After a (re)start: jobs marked running whose worker died are queued to resume."""
        for job in list_jobs(self.workspace):
            if job.state in ("running", "cancelling") and not (job.pid and _worker_of(job.pid, job.run_dir(self.workspace))):
                self._finish(job)

    def _finish(self, job: Job) -> None:
        state, message, adapter = run_outcome(job.run_dir(self.workspace))
        if job.state == "cancelling" and state != "done":
            state = "cancelled"
            message = message or "cancelled; resume continues from the last checkpoint"
        if not state:  # died without a word (kill -9, power loss): resume it
            if job.attempts >= MAX_ATTEMPTS:
                state, message = "failed", f"the worker died {job.attempts} times; see {WORKER_LOG} in the run folder"
            else:
                log.warning("job %s: worker died; resuming from its last checkpoint", job.id)
                _update(self.workspace, job.id, state="queued", pid=None,
                        message="worker died; resuming from the last checkpoint")
                return
        _update(self.workspace, job.id, state=state, pid=None, finished=time.time(), message=message,
                adapter=adapter)
        log.info("job %s: %s %s", job.id, state, message)

    def _start(self, job: Job) -> None:
        run_dir = job.run_dir(self.workspace)
        try:  # the worker only reads its inputs: class pictures are made here first
            prepare_class_images(run_dir)
        except StudioError as error:
            EventLog(run_dir).emit("error", message=str(error))
            _update(self.workspace, job.id, state="failed", finished=time.time(), message=str(error))
            return
        if get_job(self.workspace, job.id).state != "queued":  # cancelled meanwhile
            return
        with open(run_dir / WORKER_LOG, "ab") as out:
            proc = subprocess.Popen(worker_command(run_dir, run_config(run_dir)), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._children[job.id] = proc
        _update(self.workspace, job.id, state="running", pid=proc.pid, attempts=job.attempts + 1,
                started=job.started or time.time(), message="")
        log.info("job %s: started worker pid %d", job.id, proc.pid)

    def tick(self) -> bool:
        """One pass: reap finished workers, start the next queued job. True while busy."""
        jobs = list_jobs(self.workspace)
        busy = False
        for job in jobs:
            if job.state not in ("running", "cancelling"):
                continue
            child = self._children.get(job.id)
            running = child.poll() is None if child else bool(job.pid and _worker_of(job.pid, job.run_dir(self.workspace)))
            if running:
                busy = True
            else:
                self._children.pop(job.id, None)
                self._finish(get_job(self.workspace, job.id))
        if not busy:
            queued = [j for j in list_jobs(self.workspace) if j.state == "queued"]
            if queued:
                self._start(min(queued, key=lambda j: j.created))
                busy = True
        return busy

    def serve(self, *, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.reconcile()
        idle_since = time.time()
        while True:
            if self.tick():
                idle_since = time.time()
            elif time.time() - idle_since > idle_exit_s:
                return
            time.sleep(POLL_S)


def _lock_path(workspace: Workspace) -> Path:
    return workspace.root / "supervisor.lock"


def supervisor_running(workspace: Workspace) -> bool:
    with open(_lock_path(workspace), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def ensure_supervisor(workspace: Workspace) -> None:
    """Start a detached supervisor for the workspace unless one holds the lock."""
    if supervisor_running(workspace):
        return
    log_path = workspace.root / "supervisor.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "studio.jobs", str(workspace.root)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # Reap it when it exits, or it stays a zombie child of this (long-lived UI) process.
    threading.Thread(target=proc.wait, name=f"reap-supervisor-{proc.pid}", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m studio.jobs", description="Run queued training jobs.")
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--idle-exit", type=float, default=IDLE_EXIT_S, help="seconds idle before exiting")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s supervisor: %(message)s")
    workspace = Workspace.open(args.workspace)
    while True:
        with open(_lock_path(workspace), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another supervisor runs this workspace; exiting")
                return 0
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "started": time.time()}))
            handle.flush()
            Supervisor(workspace).serve(idle_exit_s=args.idle_exit)
        # A job queued while this one was stopping saw the lock held and started no supervisor:
        # look once more now that the lock is free, and serve it.
        if not any(job.state == "queued" for job in list_jobs(workspace)):
            return 0
