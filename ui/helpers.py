"""Presentation helpers for the Gradio app: turn studio data into what the page shows, and
what the page sends back into studio inputs; and the work behind the Generate and Library
events, calling the same studio functions as the CLI. No Gradio here, and torch only inside
the functions that need it, so this is quick to import and to test without a browser."""
from __future__ import annotations

import base64
import datetime
import html
import io
import math
import random
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from studio.errors import StudioError
from studio.models.families import FAMILIES

# --------------------------------------------------------------------------- formatting
def humanize(name: str) -> str:
    """`gradient_accumulation_steps` -> `Gradient accumulation steps`."""
    text = name.replace("_", " ").strip()
    for short, long in (("lr", "LR"), ("snr", "SNR"), ("vae", "VAE"), ("adamw", "AdamW"), ("n", "N")):
        text = " ".join(long if w == short else w for w in text.split(" "))
    return text[:1].upper() + text[1:]


def format_duration(seconds: float | None) -> str:
    """A short human duration: `45 s`, `3 min 05 s`, `2 h 10 min`; `—` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def format_time(stamp: float | None) -> str:
    if not stamp:
        return ""
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


def format_size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GB"


# --------------------------------------------------------------------------- config form
#: Settings shown in the Train tab's first block; everything else goes in "All settings".
MAIN_FIELDS: tuple[tuple[str, ...], ...] = (
    ("name",), ("base_model",), ("dataset", "name"), ("dataset", "path"),
    ("training", "max_steps"), ("network", "rank"), ("network", "alpha"), ("training", "learning_rate"),
    ("dataset", "resolution"), ("dataset", "trigger_word"), ("training", "batch_size"), ("sampling", "prompts"),
)

SECTION_TITLES = {"": "General", "dataset": "Dataset", "network": "Network (LoRA)", "training": "Training",
                  "checkpoints": "Checkpoints", "sampling": "Sample images"}


@dataclass(frozen=True)
class FieldSpec:
    """One TrainConfig field as a form input."""

    path: tuple[str, ...]
    label: str
    kind: str                   # bool | choice | int | float | text | list | lines
    info: str | None
    default: Any
    choices: tuple = ()
    optional: bool = False      # None allowed (an empty box means "default")
    minimum: float | None = None
    maximum: float | None = None

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def section(self) -> str:
        return self.path[0] if len(self.path) > 1 else ""


def _constraints(field) -> tuple[float | None, float | None]:
    low = high = None
    for item in field.metadata:
        for attr in ("ge", "gt"):
            if getattr(item, attr, None) is not None:
                low = getattr(item, attr)
        for attr in ("le", "lt"):
            if getattr(item, attr, None) is not None:
                high = getattr(item, attr)
    return low, high


def _spec(path: tuple[str, ...], field) -> FieldSpec:
    from pydantic_core import PydanticUndefined

    annotation = field.annotation
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
        origin = typing.get_origin(annotation)
    choices: tuple = ()
    if origin is typing.Literal:
        kind, choices = "choice", typing.get_args(annotation)
    elif origin is list:
        kind = "lines" if path == ("sampling", "prompts") else "list"
    elif annotation is bool:
        kind = "bool"
    elif annotation is int:
        kind = "int"
    elif annotation is float:
        kind = "float"
    else:
        kind = "text"
    if field.default_factory is not None:
        default = field.default_factory()
    else:
        default = None if field.default is PydanticUndefined else field.default
    low, high = _constraints(field)
    info = field.description
    if optional:
        info = (info + " " if info else "") + "Leave empty for the default."
    if kind == "list":
        info = (info + " " if info else "") + "Comma-separated."
    return FieldSpec(path, humanize(path[-1]), kind, info, default, choices, optional, low, high)


def config_fields(exclude: Iterable[tuple[str, ...]] = ()) -> list[FieldSpec]:
    """Every settable TrainConfig field (sections flattened), in declaration order."""
    from pydantic import BaseModel

    from studio.config import TrainConfig

    skip = set(exclude)
    specs: list[FieldSpec] = []

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            path = (*prefix, name)
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, path)
            elif path not in skip:
                specs.append(_spec(path, field))

    walk(TrainConfig, ())
    return specs


def to_form_value(spec: FieldSpec, value: Any) -> Any:
    if value is None:
        return None if spec.kind not in ("text", "list", "lines") else ""
    if spec.kind == "list":
        return ", ".join(value)
    if spec.kind == "lines":
        return "\n".join(value)
    return value


def from_form_value(spec: FieldSpec, value: Any) -> Any:
    """A form value as the config wants it; bad input is left for pydantic to name."""
    if spec.kind == "bool":
        return bool(value)
    if spec.kind in ("int", "float"):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, (int, float)) and spec.kind == "int" and float(value).is_integer():
            return int(value)
        return value
    if spec.kind == "list":
        return [part.strip() for part in str(value or "").split(",") if part.strip()]
    if spec.kind == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if spec.kind == "choice":
        return value
    text = str(value or "").strip()
    return None if spec.optional and not text else text


def form_to_config_dict(specs: Sequence[FieldSpec], values: Sequence[Any]) -> dict:
    """Nested config dict from form values (empty optional numbers are left out)."""
    data: dict = {}
    for spec, raw in zip(specs, values, strict=True):
        value = from_form_value(spec, raw)
        if value is None and spec.optional:
            continue
        node = data
        for part in spec.path[:-1]:
            node = node.setdefault(part, {})
        node[spec.path[-1]] = value
    return data


def config_to_form(specs: Sequence[FieldSpec], config) -> list[Any]:
    """Form values for a TrainConfig, in the order of `specs`."""
    out = []
    for spec in specs:
        node: Any = config
        for part in spec.path:
            node = getattr(node, part)
        out.append(to_form_value(spec, node))
    return out


# --------------------------------------------------------------------------- training hint
def resource_hint(*, family: str | None, builtin: bool, steps: int, batch_size: int, resolution: int,
                  grad_accum: int = 1, gradient_checkpointing: bool = False, mixed_precision: str = "no",
                  speed=None, plan=None, steps_per_epoch: int | None = None, sample_prompts: int = 0) -> str:
    """A time/memory estimate for a training run, as Markdown. The time comes from `plan`
    (studio.jobs.speed.Estimate at the measured `speed`); without one the built-in model's speed
    is being measured, and full-size models get rough planning figures."""
    lines: list[str] = []
    work = max(1, batch_size) * max(1, grad_accum)
    pixels = resolution * resolution * work
    if plan is not None:
        parts = [f"training {format_duration(plan.training_s)}"]
        if plan.setup_s is not None:
            parts.insert(0, f"loading {format_duration(plan.setup_s)}")
        if plan.samples_s:
            parts.append(f"{plan.sample_pictures} sample picture(s) {format_duration(plan.samples_s)}")
        if plan.class_images_s:
            parts.append(f"class images {format_duration(plan.class_images_s)}")
        lines.append(f"**Time:** about {format_duration(plan.total_s)} for {steps} steps on this machine "
                     f"({', '.join(parts)}), from {speed.source} ({speed.steps_per_s:.2f} steps/s).")
    elif builtin:
        lines.append("**Time:** this machine's speed is not measured yet (a few training steps of these "
                     "settings, timed when the dataset can train; *Check settings* says what stops it).")
    if builtin:
        lines.append("**Memory:** the built-in model is tiny — well under 1 GB of RAM, no GPU needed.")
    elif family in FAMILIES:
        guide = FAMILIES[family].gpu  # rough guide values for planning, not measurements
        scale = pixels / (guide.resolution ** 2)
        act = guide.activations_gb * scale * (0.4 if gradient_checkpointing else 1.0)
        base = guide.base_gb * (1.6 if mixed_precision == "no" else 1.0)
        if plan is None:
            lines.append(f"**Time:** roughly {format_duration(steps / (guide.it_s / scale))} for {steps} steps on "
                         "a recent 24 GB GPU (a planning figure; your first run measures this machine); training "
                         "a full-size model on a CPU is not practical.")
        lines.append(f"**VRAM:** roughly {base + act:.0f} GB ({FAMILIES[family].label}, "
                     f"{resolution} px, batch {work}"
                     + (", gradient checkpointing" if gradient_checkpointing else "")
                     + (", fp32" if mixed_precision == "no" else f", {mixed_precision}") + ").")
        if not gradient_checkpointing and base + act > 12:
            lines.append("Short of memory? Turn on *Gradient checkpointing* and mixed precision in All settings.")
    else:
        lines.append("Pick a base model to see an estimate.")
    if steps_per_epoch:
        epochs = steps * work / steps_per_epoch
        lines.append(f"**Dataset:** {steps_per_epoch} images per epoch (repeats counted) → "
                     f"{steps} steps ≈ {epochs:.1f} epochs.")
    if sample_prompts and plan is not None:
        lines.append(f"**Samples:** {sample_prompts} prompt(s), {plan.sample_pictures} picture(s) in all.")
    lines.append("<small>The Runs tab shows the real speed as the run goes.</small>")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- runs
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
    from studio.jobs.runs import read_events

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
        text += f"\n\n── worker.log, newest first ──\n" + "\n".join(reversed(worker_lines))
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
    from studio.jobs.runs import iter_events

    newest = None
    for event in iter_events(run_dir):
        if event.get("type") == "sample":
            for path in event.get("paths") or []:
                if Path(path).is_file():
                    newest = Path(path)
    return newest


# --------------------------------------------------------------------------- generate
SIZE_DEFAULT = "Model default"
SIZE_CHOICES = [SIZE_DEFAULT, "64 × 64", "128 × 128", "256 × 256", "512 × 512", "512 × 768", "768 × 512",
                "768 × 768", "1024 × 1024", "832 × 1216", "1216 × 832"]


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """`512 × 768` (or `512x768`) -> (512, 768); the default choice or empty -> (None, None)."""
    if not text or text == SIZE_DEFAULT:
        return None, None
    cleaned = text.replace("×", "x").replace("X", "x").replace(" ", "")
    try:
        width, height = (int(v) for v in cleaned.split("x"))
    except ValueError:
        raise StudioError(f"Size {text!r} is not WIDTH x HEIGHT; write e.g. 512 x 768.") from None
    return width, height


class AdapterRow(NamedTuple):
    """One adapter row of the Generate tab as the page sends it: library name, weight,
    text-encoder weight (empty = the weight), LoRA Block Weights (a preset or values;
    empty = every block 1) and, for T-LoRA files, whether the timestep mask is on."""

    name: str | None
    weight: float | None = 1.0
    te_weight: float | str | None = None
    block_weights: str | None = None
    tlora_masked: bool = True


def _optional_number(value, what: str) -> float | None:
    """A number from a form field; None when it is empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise StudioError(f"{what} {value!r} is not a number; write e.g. 0.8, or leave the box empty.") from None


def row_uses(rows: Sequence[Sequence], resolve: Callable[[str], Path], *,
             keep_rows: Iterable[int] = ()) -> dict[int, Any]:
    """Row index -> AdapterUse for the rows with an adapter. Rows whose weights are all 0
    are left out, except those in `keep_rows` (a grid axis sets their weight)."""
    from studio.generation.engine import AdapterUse

    keep = set(keep_rows)
    uses = {}
    for index, values in enumerate(rows):
        row = AdapterRow(*values)
        if not row.name:
            continue
        weight = _optional_number(row.weight, f"Adapter {index + 1}: the weight")
        weight = 1.0 if weight is None else weight
        te_weight = _optional_number(row.te_weight, f"Adapter {index + 1}: the text-encoder weight")
        if weight == 0 and te_weight in (None, 0) and index not in keep:
            continue
        uses[index] = AdapterUse(resolve(row.name), weight, te_weight=te_weight,
                                 block_weights=(row.block_weights or "").strip() or None,
                                 tlora_masked=bool(row.tlora_masked))
    return uses


def merge_uses(*groups: Sequence) -> list:
    """Adapters from the rows and from `<lora:...>` tags; each file at most once."""
    merged, seen = [], {}
    for group in groups:
        for use in group:
            key = Path(use.path).resolve()
            if key in seen:
                raise StudioError(f"Adapter {use.path.stem!r} is used twice (in the adapter rows and/or a "
                                  "<lora:...> tag in the prompt); keep one and set its weight there.")
            seen[key] = use
            merged.append(use)
    return merged


_REQUIRED = object()


def _plain(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


class FormProblems:
    """What is wrong with a form's fields, collected so that one message names them all,
    each by the label the page shows."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def number(self, value, label: str, low: float | None = None, high: float | None = None, *,
               whole: bool = False, empty: Any = _REQUIRED) -> Any:
        """`value` as a finite number within [low, high] (an int when `whole`); an empty field
        gives `empty`. A bad value is noted, and None (or `empty`) returned."""
        fallback = None if empty is _REQUIRED else empty
        if value is None or (isinstance(value, str) and not value.strip()):
            if empty is _REQUIRED:
                self.problems.append(f"{label}: empty; give a number")
            return fallback
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            self.problems.append(f"{label}: {value!r} is not a number")
            return fallback
        in_range = (low is None or number >= low) and (high is None or number <= high)
        if math.isfinite(number) and in_range and (number.is_integer() or not whole):
            return int(number) if whole else number
        wanted = "a whole number" if whole else "a finite number"
        if low is not None and high is not None:
            wanted += f" from {_plain(low)} to {_plain(high)}"
        self.problems.append(f"{label}: {value!r} is not {wanted}")
        return fallback

    def raise_if_any(self) -> None:
        if self.problems:
            fix = "Fix it" if len(self.problems) == 1 else f"Fix these {len(self.problems)} fields"
            raise StudioError(f"{'; '.join(self.problems)}. {fix} and try again.")


def parse_seed(value, problems: FormProblems | None = None) -> int | None:
    """The seed field: a whole number >= 0, or -1 (or empty) for a random one."""
    from studio.generation.engine import MAX_SEED

    own = problems or FormProblems()
    number = own.number(value, "Seed", -1, MAX_SEED, whole=True, empty=-1)
    if problems is None:
        own.raise_if_any()
    if number is None:
        return None
    return random.randrange(2**31) if number < 0 else number


@dataclass(frozen=True)
class GenerateSettings:
    """The Generate tab's fields other than the adapter rows, as the page sends them."""

    prompt: str
    negative: str = ""
    model: str = "builtin"
    scheduler: str = "ddim"
    size: str = SIZE_DEFAULT
    steps: float = 20
    cfg: float = 5.0
    seed: Any = -1
    count: float = 1


def mix_request(studio, settings: GenerateSettings, rows: Sequence[Sequence], *,
                weight_axis_rows: Iterable[int] = ()) -> tuple[Any, dict[int, int]]:
    """The GenerateRequest of the fields, the rows and the prompt's `<lora:...>` tags, and
    the position in its adapter list of each row's adapter."""
    from studio.generation.engine import MAX_BATCH_COUNT, MAX_GUIDANCE, MAX_STEPS, GenerateRequest, parse_prompt_loras
    from studio.adapters.library import find_adapter

    if not (settings.prompt or "").strip():
        raise StudioError("Write a prompt first.")
    problems = FormProblems()
    steps = problems.number(settings.steps, "Steps", 1, MAX_STEPS, whole=True)
    cfg = problems.number(settings.cfg, "CFG scale", 0, MAX_GUIDANCE)
    count = problems.number(settings.count, "Images", 1, MAX_BATCH_COUNT, whole=True)
    seed = parse_seed(settings.seed, problems)
    for index, values in enumerate(rows):
        row = AdapterRow(*values)
        if row.name:
            problems.number(row.weight, f"Adapter {index + 1} · Weight", empty=1.0)
            problems.number(row.te_weight, f"Adapter {index + 1} · Text-encoder weight", empty=None)
    problems.raise_if_any()
    resolve = lambda name: find_adapter(studio.workspace, name)  # noqa: E731
    prompt, tagged = parse_prompt_loras(settings.prompt, resolve)
    by_row = row_uses(rows, resolve, keep_rows=weight_axis_rows)
    width, height = parse_size(settings.size)
    request = GenerateRequest(prompt=prompt, model=settings.model or "builtin",
                              negative_prompt=settings.negative or "", adapters=merge_uses(by_row.values(), tagged),
                              seed=seed, steps=steps, guidance_scale=cfg, width=width, height=height,
                              scheduler=settings.scheduler, batch_count=count)
    request.validate()
    return request, {row: position for position, row in enumerate(by_row)}


def _outputs_folder(studio) -> tuple[Path, datetime.datetime]:
    now = datetime.datetime.now()
    return studio.outputs_dir / now.strftime("%Y-%m-%d"), now


def generate_images(studio, settings: GenerateSettings, rows: Sequence[Sequence]) -> tuple[list, str]:
    """Generate tab: the images, saved in workspace/outputs/<day>/ with their A1111
    `parameters`; returns (gallery items, Markdown note)."""
    from studio.generation.engine import save_new_png

    request, _ = mix_request(studio, settings, rows)
    images = studio.engine().generate(request)
    folder, now = _outputs_folder(studio)
    gallery, saved = [], []
    for index, image in enumerate(images):
        seed_used = request.seed + index
        path = save_new_png(image, folder, f"{now.strftime('%H%M%S')}-{seed_used}")
        gallery.append((str(path), f"seed {seed_used}"))
        saved.append(path)
    params = images[0].info.get("parameters", "")
    where = saved[0].parent.relative_to(studio.workspace.root).as_posix()
    text = (f"Saved {len(saved)} image(s) in `{where}/` — "
            f"{', '.join(f'`{p.name}`' for p in saved)}\n\n```\n{params}\n```")
    return gallery, text


GRID_NO_AXIS = ""
_GRID_VALUE_HINTS = {"weight": "numbers separated by commas, e.g. 0, 0.5, 1",
                     "seed": "whole numbers separated by commas, e.g. 1, 2, 3",
                     "prompt": "prompts separated by |, e.g. a red star | a blue star"}


def grid_axis_choices(adapter_rows: int, *, optional: bool = False) -> list[tuple[str, str]]:
    """(label, value) of the axes a mix grid can vary: each row's adapter weight, seed, prompt."""
    choices = [(f"Adapter {i + 1} weight", f"adapter{i}") for i in range(adapter_rows)]
    choices += [("Seed", "seed"), ("Prompt", "prompt")]
    return [("(none)", GRID_NO_AXIS), *choices] if optional else choices


def _axis_row(choice: str) -> int | None:
    return int(choice[len("adapter"):]) if choice.startswith("adapter") else None


def grid_axis(choice: str, values: str, row_positions: dict[int, int], which: str):
    """A studio.generation.grid.Axis from an axis choice and its values text; None for no axis."""
    from studio.generation.grid import Axis

    if not choice:
        return None
    row = _axis_row(choice)
    kind = "weight" if row is not None else choice
    if kind not in _GRID_VALUE_HINTS:
        raise StudioError(f"{which} axis {choice!r} is not one the grid knows; pick an adapter weight, Seed or Prompt.")
    text = (values or "").strip()
    if row is not None:
        if row not in row_positions:
            raise StudioError(f"The {which} axis is the weight of adapter {row + 1}, but row {row + 1} has no "
                              "adapter; pick one there first.")
        choice = f"adapter{row_positions[row]}"
    try:
        axis = Axis.parse(f"{choice}={text}")
    except StudioError:
        raise StudioError(f"{which} values {text!r}: write {_GRID_VALUE_HINTS[kind]}.") from None
    if not axis.values:
        raise StudioError(f"{which} values {text!r}: write {_GRID_VALUE_HINTS[kind]}.")
    return axis


def mix_grid(studio, settings: GenerateSettings, rows: Sequence[Sequence], x_choice: str, x_values: str,
             y_choice: str = GRID_NO_AXIS, y_values: str = "") -> tuple[str, list, str]:
    """Generate tab's mix grid: an X/Y plot of the mix (studio.generation.grid), the labelled sheet and
    every single image saved in workspace/outputs/<day>/ as the CLI's `grid` names them;
    returns (sheet path, gallery items, Markdown note)."""
    from studio.generation.engine import save_new_png, save_png
    from studio.generation.grid import xy_grid

    if not x_choice:
        raise StudioError("Pick what the X axis varies.")
    if x_choice == y_choice:
        raise StudioError("The X and Y axes are the same; pick another Y axis, or (none).")
    axis_rows = [row for row in (_axis_row(x_choice), _axis_row(y_choice or "")) if row is not None]
    request, positions = mix_request(studio, replace(settings, count=1), rows, weight_axis_rows=axis_rows)
    x = grid_axis(x_choice, x_values, positions, "X")
    y = grid_axis(y_choice, y_values, positions, "Y")
    sheet, cells = xy_grid(studio.engine(), request, x, y)
    folder, now = _outputs_folder(studio)
    sheet_path = save_new_png(sheet, folder, f"grid-{now.strftime('%H%M%S')}")
    gallery = []
    for j, row in enumerate(cells):
        for i, image in enumerate(row):
            path = save_png(image, sheet_path.with_name(f"{sheet_path.stem}-{j}-{i}.png"))
            label = x.label(x.values[i], request) + (f" · {y.label(y.values[j], request)}" if y else "")
            gallery.append((str(path), label))
    where = sheet_path.parent.relative_to(studio.workspace.root).as_posix()
    text = (f"Saved the grid as `{where}/{sheet_path.name}` and its {len(gallery)} single image(s) beside it "
            f"(`{sheet_path.stem}-ROW-COLUMN.png`).")
    return str(sheet_path), gallery, text


SUGGESTION_HEADERS = ["Adapter", "Weight", "Why"]


def suggest_adapters(studio, prompt: str, model: str, *, top: int = 3) -> list[list]:
    """Generate tab: [adapter, weight, why] proposed by studio.generation.suggest for the prompt;
    adapters its `<lora:...>` tags already use are not proposed again."""
    from studio.generation.engine import parse_prompt_loras
    from studio.adapters.library import find_adapter, list_adapters
    from studio.generation.suggest import suggest

    clean_prompt, tagged = parse_prompt_loras(prompt or "", lambda name: find_adapter(studio.workspace, name))
    used = {Path(use.path).resolve() for use in tagged}
    candidates = [path for path in list_adapters(studio.workspace) if path.resolve() not in used]
    found = suggest(studio.engine(), clean_prompt, candidates, model=model or "builtin", top=top)
    return [[s.path.stem, s.weight, s.reason] for s in found]


def accept_suggestions(suggested: Sequence[Sequence], names: Sequence[str | None],
                       weights: Sequence[float | None]) -> tuple[list[str], list[float | None], list[str]]:
    """The adapter rows with the suggestions put in: an adapter already in a row gets the
    suggested weight there, the others take the first empty rows. Returns (names, weights,
    the suggested adapters that found no empty row)."""
    names, weights = [name or "" for name in names], list(weights)
    proposals = [row for row in suggested or [] if row and row[0]]
    if not proposals:
        raise StudioError("Nothing to accept: press 'Suggest adapters for the prompt' first.")
    left_out = []
    for name, weight, *_ in proposals:
        if name in names:
            slot = names.index(name)
        elif "" in names:
            slot = names.index("")
        else:
            left_out.append(name)
            continue
        names[slot], weights[slot] = name, float(weight)
    return names, weights, left_out


def is_tlora_adapter(workspace, name: str | None) -> bool:
    """Whether the library adapter `name` is a native T-LoRA file (False when unknown)."""
    from studio.adapters import read_checked_header
    from studio.adapters.library import find_adapter
    from studio.adapters.methods.tlora_layers import is_tlora_metadata

    if not name:
        return False
    try:
        return is_tlora_metadata(read_checked_header(find_adapter(workspace, name))[1])
    except StudioError:
        return False


# --------------------------------------------------------------------------- library
def thumbnail_from_metadata(metadata: dict) -> Any:
    """The `modelspec.thumbnail` data URL as a PIL image, or None."""
    value = (metadata or {}).get("modelspec.thumbnail", "")
    if not value.startswith("data:image/") or "," not in value:
        return None
    try:
        from PIL import Image

        data = base64.b64decode(value.split(",", 1)[1], validate=False)
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception:  # a broken thumbnail must never break the library page
        return None


LIBRARY_HEADERS = ["Name", "Family", "Rank", "Alpha", "Trigger", "Size", "Modified"]


def _family_text(name: str | None, unknown: str) -> str:
    return FAMILIES[name].label if name in FAMILIES else (name or unknown)


def _numbers(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def library_row(path: Path, info: dict | None, error: str | None = None) -> list[str]:
    stat = path.stat()
    if info is None:
        return [path.stem, "?", "", "", f"unreadable: {error}" if error else "", format_size(stat.st_size),
                format_time(stat.st_mtime)]
    meta = info.get("metadata") or {}
    family = info.get("family")
    return [path.stem, _family_text(family, "?"), _numbers(info.get("ranks") or []),
            _numbers(info.get("alphas") or []), meta.get("modelspec.trigger_phrase", ""),
            format_size(stat.st_size), format_time(stat.st_mtime)]


def adapter_markdown(path: Path, info: dict) -> str:
    meta = info.get("metadata") or {}
    lines = [f"### {path.stem}"]
    modules = f"{info.get('modules', '?')}"
    if "unet_modules" in info:
        modules += f" ({info['unet_modules']} UNet, {info.get('text_encoder_modules', 0)} text encoder)"
    hash_ok = info.get("sshs_model_hash_matches")
    facts = [
        ("Family", _family_text(info.get("family"), "unknown")),
        ("Type", str(info.get("type", ""))),
        ("Rank", _numbers(info.get("ranks") or [])),
        ("Alpha", _numbers(info.get("alphas") or [])),
        ("Modules", modules),
        ("Parameters", f"{info['parameters']:,}" if info.get("parameters") else ""),
        ("Hash", "" if hash_ok is None else ("matches the data" if hash_ok else "does NOT match the data "
                                             "(the file was changed after it was written)")),
        ("Trigger", meta.get("modelspec.trigger_phrase", "")),
        ("Base model", meta.get("ss_sd_model_name", "")),
        ("Steps", meta.get("ss_steps", "")),
        ("Resolution", meta.get("modelspec.resolution", "")),
        ("Trained", meta.get("modelspec.date", "")),
        ("File", f"`{path.name}` ({format_size(path.stat().st_size)})"),
    ]
    lines += [f"- **{k}:** {v}" for k, v in facts if v]
    lines.append(f"\nUse it in a prompt as `<lora:{path.stem}:0.8>` (A1111 / Forge syntax).")
    return "\n".join(lines)


def metadata_for_display(metadata: dict) -> dict:
    """Metadata with JSON strings opened up and the (huge) thumbnail left out."""
    import json

    out = {}
    for key, value in sorted((metadata or {}).items()):
        if key == "modelspec.thumbnail":
            out[key] = f"<image, {len(value)} characters>"
            continue
        if isinstance(value, str) and value[:1] in "{[":
            try:
                out[key] = json.loads(value)
                continue
            except ValueError:
                pass
        out[key] = value
    return out


# --------------------------------------------------------------------------- library: bake, fuse, resize
PRECISION_CHOICES = ["fp16", "bf16", "fp32"]
RESIZE_RULES = [("Rank N", "rank"), ("sv-ratio: keep σ ≥ σmax / X", "sv_ratio"),
                ("sv-fro: keep share X of the Frobenius norm", "sv_fro"),
                ("sv-cumulative: keep share X of Σσ", "sv_cumulative")]
ENERGY_HEADERS = ["Module", "Energy kept"]


def library_mix(workspace, rows: Sequence[tuple[str | None, float | None]]) -> list[tuple[Path, float]]:
    """(file, weight) of the mix rows with an adapter picked; an empty weight is 1."""
    from studio.adapters.library import find_adapter

    mix = []
    for name, weight in rows:
        if not name:
            continue
        value = _optional_number(weight, f"The weight of {name!r}")
        value = 1.0 if value is None else value
        if not math.isfinite(value):
            raise StudioError(f"The weight of {name!r} is {value}; give a finite number such as 0.8 or -0.5.")
        mix.append((find_adapter(workspace, name), value))
    if not mix:
        raise StudioError("Pick at least one adapter for the mix.")
    return mix


def parse_rank(value, what: str, hint: str = "") -> int:
    number = _optional_number(value, what)
    if number is None or not math.isfinite(number) or not number.is_integer() or number < 1:
        raise StudioError(f"{what} must be a whole number of at least 1 (got {value!r}){hint}.")
    return int(number)


def new_file(folder: Path, name: str | None, what: str) -> Path:
    """folder/<name>.safetensors for a file to be written: a valid name not taken yet."""
    from studio.workspace import check_name

    stem = (name or "").strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem:
        raise StudioError(f"Give the new {what} a name.")
    target = folder / f"{check_name(stem, what + ' name')}.safetensors"
    if target.exists():
        raise StudioError(f"{target.name} already exists in {folder}; choose another name or delete the old "
                          "file first.")
    return target


def _ranks_text(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}"


def _energy_text(energy: dict[str, float]) -> str:
    values = list(energy.values())
    return f"energy kept per module: min {min(values):.4f}, mean {sum(values) / len(values):.4f}"


def bake_mix(studio, rows: Sequence[tuple[str | None, float | None]], name: str | None, rank,
             precision: str) -> tuple[str, str]:
    """Library tab: the mix as one LoRA file in the library (exact, or rank N when `rank`
    is given); returns (the new adapter's name, Markdown note)."""
    from studio.adapters.formats.files import PRECISIONS
    from studio.adapters.mixing import bake

    mix = library_mix(studio.workspace, rows)
    target = new_file(studio.workspace.adapters_dir, name, "adapter")
    exact = _optional_number(rank, "Rank") is None
    rank_n = None if exact else parse_rank(rank, "Rank", "; leave it empty for an exact bake")
    report = bake(mix, target, rank=rank_n, dtype=PRECISIONS[precision])
    sources = ", ".join(f"{path.stem} × {weight:g}" for path, weight in mix)
    text = (f"Baked **{target.stem}** from {sources}: {report.modules} modules, {_ranks_text(report.ranks)}"
            + (f"; {_energy_text(report.energy_kept)}" if report.energy_kept else " (exact)") + ".")
    return target.stem, text


def fuse_mix(studio, model: str | None, rows: Sequence[tuple[str | None, float | None]], name: str | None) -> str:
    """Library tab: the base model with the mix merged in, as a single-file checkpoint in
    workspace/models; returns a Markdown note."""
    from studio.adapters.mixing import fuse

    mix = library_mix(studio.workspace, rows)
    target = new_file(studio.workspace.models_dir, name, "checkpoint")
    path = fuse(model or "builtin", mix, target, allow_pickle=studio.allow_pickle)
    sources = ", ".join(f"{source.stem} × {weight:g}" for source, weight in mix)
    return (f"Fused {sources} into {model or 'builtin'}: `models/{path.name}` ({format_size(path.stat().st_size)}). "
            "Pick it as the base model in Generate or Train.")


def resize_rule(rule: str, value) -> dict[str, float]:
    """The keyword for studio.adapters.mixing.resize from the rule picked and its value."""
    if rule not in dict((v, k) for k, v in RESIZE_RULES):
        raise StudioError(f"Unknown resize rule {rule!r}; pick one of {', '.join(v for _, v in RESIZE_RULES)}.")
    if rule == "rank":
        return {"rank": parse_rank(value, "Rank")}
    number = _optional_number(value, rule.replace("_", "-"))
    if number is None or not math.isfinite(number):
        raise StudioError(f"Give the value X for {rule.replace('_', '-')} (got {value!r}).")
    return {rule: number}


def resize_adapter(studio, source: str | None, rule: str, value, name: str | None,
                   precision: str) -> tuple[str, str, list[list]]:
    """Library tab: the adapter squeezed to a lower rank, saved in the library (default
    name `<source>-<rule><value>`); returns (the new adapter's name, Markdown note, energy
    kept per module, least kept first)."""
    from studio.adapters.formats.files import PRECISIONS
    from studio.adapters.library import find_adapter
    from studio.adapters.mixing import resize

    if not source:
        raise StudioError("Pick the adapter to resize.")
    path = find_adapter(studio.workspace, source)
    keyword = resize_rule(rule, value)
    default_name = f"{path.stem}-r{keyword['rank']}" if rule == "rank" else f"{path.stem}-{rule}{keyword[rule]:g}"
    target = new_file(studio.workspace.adapters_dir, (name or "").strip() or default_name, "adapter")
    report = resize(path, target, dtype=PRECISIONS[precision], **keyword)
    energy = sorted(report.energy_kept.items(), key=lambda item: item[1])
    text = (f"Saved **{target.stem}**: {report.modules} modules, {_ranks_text(report.ranks)}; "
            f"{_energy_text(report.energy_kept)}. The table lists the modules that lost most first.")
    return target.stem, text, [[module, round(kept, 6)] for module, kept in energy]


# --------------------------------------------------------------------------- datasets
def stats_markdown(stats, report=None) -> str:
    """Counts, repeats per folder and regularisation images of a dataset."""
    lines = [f"**{stats.image_count}** training image(s)"
             + (f", **{stats.reg_image_count}** class/regularisation image(s)" if stats.reg_image_count else "")
             + f" · **{stats.steps_per_epoch}** images per epoch (repeats counted)"]
    if report is not None:
        unusable = report.image_count - len(report.ok)
        warnings = len(report.warnings)
        if unusable or warnings:
            lines.append(f"**Check:** {unusable} unusable file(s), {warnings} warning(s) — see *Problems* below.")
        else:
            lines.append("**Check:** no problems found.")
    if len(stats.subsets) > 1 or any(s.repeats != 1 for s in stats.subsets):
        lines.append("| Folder | Repeats | Images | Kind |\n|---|---|---|---|")
        for s in stats.subsets:
            lines[-1] += (f"\n| `{s.folder or '(top level)'}` | {s.repeats} | {s.image_count} | "
                          f"{'class / regularisation' if s.is_regularisation else 'training'} |")
    return "\n\n".join(lines)


ISSUE_HEADERS = ["Severity", "File", "Problem", "Details"]
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def issue_rows(report) -> list[list[str]]:
    issues = sorted(report.issues, key=lambda i: (_SEVERITY_ORDER.get(i.severity, 3), i.path))
    return [[i.severity, i.path, i.kind.replace("_", " "), i.message] for i in issues]


def gallery_items(items: Sequence, folder: Path, *, limit: int = 500) -> list[tuple[str, str]]:
    """(image path, caption shown under it) for the dataset gallery: the training pictures
    first, then the class images (reg/ sorts before most names, yet matters less)."""
    out = []
    for item in sorted(items, key=lambda item: item.is_regularisation)[:limit]:
        rel = Path(item.path).relative_to(folder).as_posix()
        tags = []
        if item.is_regularisation:
            tags.append("class image")
        if item.repeats != 1:
            tags.append(f"×{item.repeats}")
        prefix = f"[{', '.join(tags)}] " if tags else ""
        out.append((str(item.path), f"{prefix}{item.caption or '(no caption)'} · {rel}"))
    return out
