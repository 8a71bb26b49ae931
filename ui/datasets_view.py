"""The Datasets tab's presentation: stats, the bad-file report, the gallery. No Gradio here,
and torch only inside the functions that need it, so this is quick to import and to test
without a browser."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from studio.datasets.captioning import BUILTIN_CAPTIONER, caption_dataset, captioner_kind
from studio.workspace import Workspace
from ui import models_view as mv


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


def trigger_placeholder(word: str) -> str:
    """The trigger-word boxes' placeholder: the word the dataset's captions use for their
    subject (studio.datasets.infer_trigger_word, as the Train tab's trigger word), else an
    example of one."""
    return word or "a rare word, e.g. sks"


def import_note(report) -> str:
    """The note under Import (a studio.datasets.ImportReport): what came in, each file left
    out and why. The bad-file report below the gallery is checked at once, so no advice to
    run a check."""
    lines = [f"**Imported {report.image_count} image(s) and {report.caption_count} caption(s)** into "
             f"*{report.name}*" + (f", replacing {len(report.replaced)} file(s)" if report.replaced else "")
             + ". Any problem with them shows under *Problems* below."]
    lines += [f"- skipped `{s.source}`: {s.reason}" for s in report.skipped[:IMPORT_NOTE_SKIPPED]]
    if len(report.skipped) > IMPORT_NOTE_SKIPPED:
        lines.append(f"- … and {len(report.skipped) - IMPORT_NOTE_SKIPPED} more skipped")
    return "\n".join(lines)


#: Skipped files the import note names, one line each.
IMPORT_NOTE_SKIPPED = 10

#: The captioning model field's help: the built-in captioner is a toy's.
CAPTIONER_INFO = ("'builtin' knows only the toy world's flat shapes on plain backgrounds (a photo of a cat gets "
                  "'a red star'): for photos pick BLIP or Florence-2 (below; pulled once, then offline), for "
                  "anime and illustration a WD14 tagger, or give a folder of one on this computer.")


def captioner_choices(names: Sequence[str]) -> list[tuple[str, str]]:
    """The captioning field's (label, value) choices: the built-in toy captioner says what it
    knows, the pulled and curated names (BLIP, Florence-2, WD14) as they are."""
    return [("builtin — toy shapes only, not photos", BUILTIN_CAPTIONER), *((name, name) for name in names)]


#: The Datasets tab's captioning modes: (label, mode of studio.datasets.captioning).
CAPTION_MODES = [
    ("Only pictures without a caption", "fill"),
    ("Replace every caption", "overwrite"),
    ("Add before the caption", "prepend"),
    ("Add after the caption", "append"),
]


def auto_caption(folder: Path, model: str, mode: str, threshold: float, include_regularisation: bool,
                 trigger: str, progress: Callable[..., object], *, workspace: Workspace | None = None) -> str:
    """Caption the dataset in `folder` with `studio.datasets.captioning.caption_dataset`, the
    CLI's function; `threshold` (the tab's slider, which always has a value) is passed on
    only to a WD14 tagger; `progress(share, desc=...)` is gradio's progress bar. A model name
    not in `workspace` yet is pulled first (ui.models_view). Returns the report, for the note
    under the button."""
    def show(done: int, total: int) -> None:
        progress(done / total if total else 1.0, desc=f"Captioning {done}/{total} pictures")

    model = (model or "").strip() or BUILTIN_CAPTIONER
    if workspace is not None:
        mv.pull_for_field(workspace, model, "captioner", progress)
    threshold = threshold if captioner_kind(model, workspace=workspace)[0] == "tagger" else None
    report = caption_dataset(folder, model, mode=mode, threshold=threshold,
                             trigger=(trigger or "").strip() or None,
                             include_regularisation=include_regularisation, progress=show, workspace=workspace)
    return "```\n" + report.summary() + "\n```"
