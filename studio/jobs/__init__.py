"""Training jobs: the queue and its supervisor (queue.py; `python -m studio.jobs WORKSPACE`),
the run folder (run_folder.py: the contract between the studio and the worker), making runs
(runs.py) and time estimates from measured speed (speed.py)."""
from __future__ import annotations

from studio.jobs.queue import (ACTIVE, IDLE_EXIT_S, MAX_ATTEMPTS, POLL_S, STATES, WORKER_LOG, Job, Supervisor, cancel,
                               connect, enqueue, ensure_supervisor, get_job, list_jobs, main, resume,
                               supervisor_running)

__all__ = [
    "ACTIVE", "IDLE_EXIT_S", "MAX_ATTEMPTS", "POLL_S", "STATES", "WORKER_LOG", "Job", "Supervisor", "cancel",
    "connect", "enqueue", "ensure_supervisor", "get_job", "list_jobs", "main", "resume", "supervisor_running",
]
