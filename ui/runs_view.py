"""The Runs tab's presentation: run views tailed from events.jsonl, the loss chart, status,
queue rows, logs. No Gradio here, and torch only inside the functions that need it, so this
is quick to import and to test without a browser."""
from __future__ import annotations

import datetime
import html
import math
from pathlib import Path
from typing import Iterable, Sequence

from studio.jobs.runs import iter_events, read_events
from ui.format import format_duration, format_size, shorten


def new_view(run_id: str | None) -> dict:
    """Per-page state of the run being watched; extended by `tail_events`."""
    return {"run": run_id, "offset": 0, "points": [], "samples": [], "lines": [], "last": None,
            "max_steps": None, "adapter": None, "error": None, "log_size": -1, "state": None}


def event_line(event: dict) -> str:
    """One event as a log line."""
    stamp = datetime.datetime.fromtimestamp(event.get("time", 0)).strftime("%H:%M:%S")
    kind = event.get("type", "?")
    if kind == "progress":
        parts = [f"step {event.get('step')}/{event.get('max_steps')}"]
        if event.get("loss") is not None:
            parts.append(f"loss {event['loss']:.4f}")
        if event.get("lr") is not None:
            parts.append(f"lr {event['lr']:.2e}")
        if event.get("it_s"):
            parts.append(f"{event['it_s']:.2f} it/s")
        if event.get("eta_s") is not None:
            parts.append(f"ETA {format_duration(event['eta_s'])}")
        text = ", ".join(parts)
    elif kind == "sample":
        text = f"step {event.get('step')}: {len(event.get('paths', []))} sample image(s)"
    elif kind == "validation":
        text = f"step {event.get('step')}: validation loss {event.get('loss', float('nan')):.4f}"
    elif kind == "checkpoint":
        text = f"step {event.get('step')}: checkpoint {Path(str(event.get('path', ''))).name}"
    elif kind == "done":
        text = f"finished: {event.get('adapter')} ({format_duration(event.get('seconds'))})"
    elif kind == "error":
        text = f"ERROR: {event.get('message')}"
    elif kind == "cancelled":
        text = f"cancelled at step {event.get('step')} (a checkpoint was saved)"
    elif kind == "start":
        text = f"started: {event.get('max_steps')} steps, {event.get('images', '?')} images"
    elif kind == "resume":
        text = f"resumed at step {event.get('step')} from {event.get('checkpoint')}"
    elif kind == "cache":
        text = (f"{event.get('from_disk')} latent/caption encoding(s) read from the cache, {event.get('encoded')} "
                f"made; the cache holds {event.get('entries')} ({format_size(event.get('bytes') or 0)}) in "
                f"{event.get('folder')}: delete that folder to clear it")
    else:
        extra = {k: v for k, v in event.items() if k not in ("type", "time")}
        text = " ".join(f"{k}={v}" for k, v in extra.items())
    return f"{stamp} {kind:<10} {text}"


def apply_events(view: dict, events: Iterable[dict], *, max_lines: int = 300) -> bool:
    """Fold new events into the view; True when something changed."""
    changed = False
    for event in events:
        changed = True
        kind = event.get("type")
        if kind == "progress":
            if event.get("loss") is not None:
                view["points"].append([event["step"], float(event["loss"])])
            view["last"] = event
            view["max_steps"] = event.get("max_steps") or view["max_steps"]
        elif kind == "sample":
            prompts = event.get("prompts") or []
            for i, path in enumerate(event.get("paths") or []):
                prompt = prompts[i] if i < len(prompts) else ""
                view["samples"].append([path, f"step {event.get('step')}: {prompt}".strip()])
        elif kind == "start":
            view["max_steps"] = event.get("max_steps")
        elif kind == "resume":  # steps after the checkpoint are trained again: drop their old points
            step = event.get("step", 0)
            view["points"] = [p for p in view["points"] if p[0] <= step]
            view["error"] = None
        elif kind == "done":
            view["adapter"] = event.get("adapter")
            view["last"] = {**(view["last"] or {}), "step": event.get("step"), "eta_s": 0}
        elif kind == "error":
            view["error"] = event.get("message")
        view["latest"] = kind
        view["lines"].append(event_line(event))
    del view["lines"][:-max_lines]
    return changed


def tail_events(view: dict, run_dir: Path) -> bool:
    """Read the events appended since the last call; True when the view changed."""
    events, offset = read_events(run_dir, view["offset"])
    view["offset"] = offset
    return apply_events(view, events)


def ema(values: Sequence[float], smoothing: float = 0.6) -> list[float]:
    """TensorBoard-style exponential moving average (debiased)."""
    out, last, weight = [], 0.0, 0.0
    for value in values:
        last = smoothing * last + (1 - smoothing) * value
        weight = smoothing * weight + (1 - smoothing)
        out.append(last / weight)
    return out


def loss_series(points: Sequence[Sequence[float]], *, max_points: int = 1500) -> list[dict]:
    """Rows {step, loss, series} for the loss chart: the raw loss and a smoothed line;
    long runs are thinned to at most `max_points` per series."""
    if not points:
        return []
    stride = max(1, math.ceil(len(points) / max_points))
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    smooth = ema(losses)
    rows = []
    for i in range(0, len(points), stride):
        rows.append({"step": steps[i], "loss": losses[i], "series": "loss"})
    for i in range(0, len(points), stride):
        rows.append({"step": steps[i], "loss": smooth[i], "series": "smoothed"})
    if (len(points) - 1) % stride:  # always show the newest point
        rows.append({"step": steps[-1], "loss": losses[-1], "series": "loss"})
        rows.append({"step": steps[-1], "loss": smooth[-1], "series": "smoothed"})
    return rows


def loss_frame(points: Sequence[Sequence[float]]):
    """The loss chart's data; typed even when empty, so the chart's axes stay numeric."""
    import pandas as pd

    rows = loss_series(points)
    return pd.DataFrame({
        "step": pd.Series([r["step"] for r in rows], dtype="int64"),
        "loss": pd.Series([r["loss"] for r in rows], dtype="float64"),
        "series": pd.Series([r["series"] for r in rows], dtype="str"),
    })


_STATE_TEXT = {
    "queued": "waiting in the queue", "running": "training", "cancelling": "stopping (saving a checkpoint)",
    "done": "finished", "failed": "failed", "cancelled": "cancelled",
}


def status_html(job, view: dict, *, queue_position: int | None = None) -> str:
    """The run header: state, step/max, speed, ETA, loss and a progress bar."""
    if job is None:
        return "<div class='run-status empty'>Pick a run on the left, or start one in the Train tab.</div>"
    last = view.get("last") or {}
    max_steps = view.get("max_steps") or last.get("max_steps")
    step = last.get("step") or 0
    state = job.state
    text = _STATE_TEXT.get(state, state)
    if state == "queued" and queue_position:
        text += f" ({queue_position} ahead)" if queue_position > 0 else " (next)"
    # a worker (re)starting after a cancel or an error has not reported anything yet
    live = bool(last) and view.get("latest") not in ("cancelled", "error", "done")
    if state == "running" and not live:
        text = "starting (loading the model)"
    facts = []
    if max_steps:
        facts.append(f"<b>Step</b> {step} / {max_steps}")
    if last.get("it_s") and state in ("running", "cancelling") and live:
        facts.append(f"<b>Speed</b> {last['it_s']:.2f} it/s")
    if state in ("running", "cancelling") and live and last.get("eta_s") is not None:
        facts.append(f"<b>ETA</b> {format_duration(last['eta_s'])}")
    if last.get("loss") is not None:
        facts.append(f"<b>Loss</b> {last['loss']:.4f}")
    if last.get("lr") is not None:
        facts.append(f"<b>LR</b> {last['lr']:.2e}")
    if job.started and job.finished:
        facts.append(f"<b>Took</b> {format_duration(job.finished - job.started)}")
    fraction = min(1.0, step / max_steps) if max_steps else 0.0
    if state == "done":
        fraction = 1.0
    message = view.get("error") if state == "failed" and view.get("error") else job.message
    parts = [
        f"<div class='run-status state-{html.escape(state)}'>",
        f"<div class='run-title'><span class='run-name'>{html.escape(job.id)}</span>"
        f"<span class='badge'>{html.escape(text)}</span></div>",
        f"<div class='run-facts'>{' · '.join(facts) or '&nbsp;'}</div>",
        f"<div class='bar'><div style='width:{fraction * 100:.1f}%'></div></div>",
    ]
    if message:
        parts.append(f"<div class='run-message'>{html.escape(message)}</div>")
    parts.append("</div>")
    return "".join(parts)


JOB_HEADERS = ["Run", "State", "Queued", "Took", "Note"]
#: The queue table's note is a glimpse; the whole message is shown above the run's chart.
JOB_NOTE_CHARS = 40


def job_rows(jobs: Sequence) -> list[list[str]]:
    rows = []
    for job in jobs:
        took = format_duration(job.finished - job.started) if job.started and job.finished else ""
        queued = datetime.datetime.fromtimestamp(job.created).strftime("%m-%d %H:%M") if job.created else ""
        rows.append([job.id, job.state, queued, took, shorten(job.message or "", JOB_NOTE_CHARS)])
    return rows


def run_log(event_lines: Sequence[str], worker_output: str) -> str:
    """The Runs tab's log, newest lines first: the run's events, then the worker's output."""
    text = "\n".join(reversed(event_lines))
    worker_lines = worker_output.splitlines()
    if worker_lines:
        text += "\n\n── worker.log, newest first ──\n" + "\n".join(reversed(worker_lines))
    return text


def tail_text(path: Path, *, max_lines: int = 40, max_bytes: int = 32 * 1024) -> str:
    """The last lines of a text file (progress-bar carriage returns folded)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    if lines and not lines[-1]:
        lines.pop()
    if size > max_bytes and lines:
        lines = lines[1:]  # first line is probably cut
    return "\n".join(lines[-max_lines:])


def last_sample(run_dir: Path) -> Path | None:
    """The newest sample image of a run that still exists."""
    newest = None
    for event in iter_events(run_dir):
        if event.get("type") == "sample":
            for path in event.get("paths") or []:
                if Path(path).is_file():
                    newest = Path(path)
    return newest
