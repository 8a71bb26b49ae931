"""Formatting shared by the tabs: durations, sizes, times, names. No Gradio here, and torch
only inside the functions that need it, so this is quick to import and to test without a
browser."""
from __future__ import annotations

import datetime
import math


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
