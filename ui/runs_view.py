"""The Runs tab's presentation: run views tailed from events.jsonl, the loss chart, status,
queue rows, logs. No Gradio here, and torch only inside the functions that need it, so this
is quick to import and to test without a browser."""
from __future__ import annotations

import datetime
import html
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from studio.jobs import ACTIVE
from studio.jobs.runs import iter_events, read_events
from ui.format import format_duration, format_size, shorten


def new_view(run_id: str | None) -> dict:
    """Per-page state of the run being watched; extended by `tail_events`."""
    return {"run": run_id, "offset": 0, "points": [], "samples": [], "lines": [], "last": None,
            "max_steps": None, "adapter": None, "error": None, "log_size": -1, "state": None, "phase": None,
            "latest": None}


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
    elif kind == "done":  # how long the run took is the Runs tab's "Took" (run_seconds), one figure
        text = f"finished: {event.get('adapter')}"
    elif kind == "phase":
        text = phase_text(event) + (f", ETA {format_duration(event['eta_s'])}" if event.get("eta_s") is not None
                                    else "")
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


_PHASES = {"loading": "loading the model", "caching": "caching latents", "sampling": "drawing samples",
           "class_images": "drawing class pictures"}


#: Events after which the run is no longer in the phase it reported last.
_ENDS_PHASE = ("progress", "start", "resume", "done", "error", "cancelled", "sample", "validation", "checkpoint")


def phase_text(event: dict) -> str:
    """A `phase` event as the Runs tab words it: `caching latents 12/36`."""
    text = _PHASES.get(event.get("phase"), str(event.get("phase")))
    if event.get("total"):
        text += f" {event.get('done', 0)}/{event['total']}"
    if event.get("phase") == "sampling" and event.get("step") is not None:
        text += f" at step {event['step']}"
    return text


def apply_events(view: dict, events: Iterable[dict], *, max_lines: int = 300) -> bool:
    """Fold new events into the view; True when something changed. A `phase` event (the
    worker loading, caching, drawing samples; the studio drawing class pictures) is what the
    run does until the next event of another kind."""
    changed = False
    for event in events:
        changed = True
        kind = event.get("type")
        if kind == "phase":
            view["phase"] = event
        elif kind in _ENDS_PHASE:
            view["phase"] = None
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


#: The loss chart's series, in the order of its rows, and their colours.
LOSS_COLOURS = {"loss": "#9ca3af", "smoothed": "#f97316"}


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


def shown_run(jobs: Sequence, wanted: str | None) -> str | None:
    """The run the Runs tab shows: `wanted` while it exists, else the one training now (a
    page opened mid-training follows it, not a run queued after it), else the newest."""
    ids = [job.id for job in jobs]
    if wanted in ids:
        return wanted
    running = next((job.id for job in jobs if job.state in ("running", "cancelling")), None)
    return running or (ids[0] if ids else None)


def loss_chart(points: Sequence[Sequence[float]]):
    """The loss chart's value, never None: Gradio removes a plot's container when its value
    becomes None, and a ResizeObserver its earlier draws left behind then reads the removed
    container (`offsetWidth` of null, in the console). A LinePlot draws lines, and a line
    needs two x values: while one step is logged, the rows go as the plot's payload marked
    `point` (a dict reaches the browser as it is), so the first logged loss shows as dots.
    (Not a patched postprocess: Gradio rebuilds the component from its constructor arguments
    when an update changes its title.)"""
    frame = loss_frame(points)
    if len({p[0] for p in points}) != 1:
        return frame
    return {"columns": list(frame.columns), "data": json.loads(frame.to_json(orient="split"))["data"],
            "datatypes": {"step": "quantitative", "loss": "quantitative", "series": "nominal"}, "mark": "point"}


def loss_title(points: Sequence[Sequence[float]]) -> str:
    """The loss chart's title; it differs while one step is logged, where the chart draws
    dots (loss_chart). Gradio redraws a chart whose title changes, and only updates the
    data of one whose title is the same: a chart drawn with lines would otherwise keep
    drawing a single point as a line (nothing), when the run shown changed."""
    return "Training loss" if len({p[0] for p in points}) != 1 else "Training loss (one step logged so far)"


def loss_frame(points: Sequence[Sequence[float]]):
    """The loss chart's data, typed even when empty so the axes stay numeric. Before a loss
    is logged, each series has one row without values (drawn as nothing): Gradio fixes the
    colour scale's domain to the series in the rows it first draws, and a chart first drawn
    without them never colours the lines its later data brings."""
    import pandas as pd

    rows = loss_series(points) or [{"step": math.nan, "loss": math.nan, "series": name} for name in LOSS_COLOURS]
    return pd.DataFrame({
        "step": pd.Series([r["step"] for r in rows], dtype="int64" if points else "float64"),
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
    restarted = view.get("latest") in (None, "cancelled", "error", "done")
    live = bool(last) and not restarted
    phase = view.get("phase") if state in ACTIVE else None
    if phase is not None:  # the studio draws class pictures while the job is still queued
        text = phase_text(phase)
    elif state == "running" and restarted:
        text = "starting the worker"
    elif state == "running" and view.get("latest") in ("start", "resume"):
        text = "training (the first steps)"
    facts = []
    if max_steps:
        facts.append(f"<b>Step</b> {step} / {max_steps}")
    if last.get("it_s") and state in ("running", "cancelling") and live:
        facts.append(f"<b>Speed</b> {last['it_s']:.2f} it/s")
    if phase is not None and phase.get("eta_s") is not None:
        facts.append(f"<b>ETA</b> {format_duration(phase['eta_s'])} ({_PHASES.get(phase.get('phase'), 'this')})")
    elif state in ("running", "cancelling") and live and last.get("eta_s") is not None:
        facts.append(f"<b>ETA</b> {format_duration(last['eta_s'])} (training)")
    if last.get("loss") is not None:
        facts.append(f"<b>Loss</b> {last['loss']:.4f}")
    if last.get("lr") is not None:
        facts.append(f"<b>LR</b> {last['lr']:.2e}")
    if run_seconds(job) is not None:
        facts.append(f"<b>Took</b> {format_duration(run_seconds(job))}")
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


def run_seconds(job) -> float | None:
    """How long a finished run took: from its worker's first start to its end, as the queue
    recorded them (class pictures drawn first and the model's loading included). The one
    figure the Runs tab shows for it, in the header and in the table."""
    return job.finished - job.started if job.started and job.finished else None


#: The queue table's columns; when a run was queued is in its id (<name>-<date>-<time>).
JOB_HEADERS = ["Run", "State", "Took", "Note"]
#: The queue table's note is a glimpse; the whole message is shown above the run's chart.
JOB_NOTE_CHARS = 40


def job_rows(jobs: Sequence) -> list[list[str]]:
    rows = []
    for job in jobs:
        took = format_duration(run_seconds(job)) if run_seconds(job) is not None else ""
        rows.append([job.id, job.state, took, shorten(job.message or "", JOB_NOTE_CHARS)])
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
