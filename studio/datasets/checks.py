"""The bad-file report: `check_dataset` reads a dataset exactly as training does and lists
what it cannot use or may not mean (`Issue`, `DatasetReport`)."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from studio.datasets.captions import MAX_CAPTION_BYTES, _read_caption_file
from studio.datasets.images import DEFAULT_MAX_PIXELS, ImageLoadError, _ORIENTATION_TEXT, _load_image
from studio.datasets.layout import CAPTION_EXTENSION, _IMAGE_TYPES, _ImageEntry, _scan
from studio.datasets.masks import mask_path
from studio.errors import StudioError

#: Captions longer than this are reported: kohya's longest text window is 225 tokens.
HUGE_CAPTION_CHARS = 1000


ISSUE_SEVERITY: dict[str, str] = {
    "missing": "error",
    "empty_file": "error",
    "unreadable": "error",
    "truncated": "error",
    "decompression_bomb": "error",
    "too_small": "warning",
    "missing_caption": "warning",
    "empty_caption": "warning",
    "caption_not_utf8": "warning",
    "huge_caption": "warning",
    "multiline_caption": "warning",
    "shared_caption": "warning",
    "caption_unreadable": "warning",
    "caption_without_image": "warning",
    "mask_unusable": "warning",
    "ignored_folder": "warning",
    "non_image": "info",
    "converted": "info",
    "exif_rotated": "info",
}


@dataclass(frozen=True)
class Issue:
    path: str       # relative to the dataset folder, posix
    kind: str       # a key of ISSUE_SEVERITY
    message: str

    @property
    def severity(self) -> str:
        return ISSUE_SEVERITY.get(self.kind, "warning")

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "severity": self.severity, "message": self.message}


@dataclass
class DatasetReport:
    """Result of `check_dataset`. `ok` lists the images training can use (possibly with
    warnings); `issues` has one entry per problem found."""

    folder: Path
    image_count: int = 0
    ok: list[str] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    def add(self, path: str, kind: str, message: str) -> None:
        self.issues.append(Issue(path, kind, message))

    def paths(self, kind: str) -> list[str]:
        """The files with an issue of `kind` (e.g. "truncated", "missing_caption")."""
        return [issue.path for issue in self.issues if issue.kind == kind]

    def counts(self) -> dict[str, int]:
        return dict(Counter(issue.kind for issue in self.issues))

    @property
    def errors(self) -> list[Issue]:
        return [issue for issue in self.issues if issue.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [issue for issue in self.issues if issue.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "images": self.image_count,
            "ok": list(self.ok),
            "unusable": self.image_count - len(self.ok),
            "counts": self.counts(),
            "issues": [issue.to_dict() for issue in self.issues],
        }

    def summary(self, *, examples: int = 3) -> str:
        """A headline, then one line per kind of problem with a few example files."""
        counts = self.counts()
        head = f"{self.folder.name}: {self.image_count} images, {len(self.ok)} usable"
        for severity in ("error", "warning", "info"):
            parts = [f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(counts.items())
                     if ISSUE_SEVERITY.get(kind, "warning") == severity]
            if parts:
                head += f"; {severity}s: " + ", ".join(parts)
        lines = [head]
        for kind in sorted(counts):
            if ISSUE_SEVERITY.get(kind) == "info":
                continue
            found = [i for i in self.issues if i.kind == kind]
            for issue in found[:examples]:
                lines.append(f"  {kind}: {issue.path}: {issue.message}")
            if len(found) > examples:
                lines.append(f"  {kind}: ... and {len(found) - examples} more")
        return "\n".join(lines)


def check_dataset(folder: str | os.PathLike, *, resolution: int | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> DatasetReport:
    """Validate every file of a dataset without changing anything; problems are reported,
    never raised (only a missing dataset folder raises). With a training `resolution`,
    images smaller than it are reported: training enlarges them. (Without one, size is
    no problem: a 64-px picture is right for a 64-px model.)"""
    scan = _scan(folder)
    report = DatasetReport(scan.folder, image_count=len(scan.images))
    for entry in scan.images:
        try:
            loaded = _load_image(entry.path, max_pixels)
        except ImageLoadError as exc:
            report.add(entry.rel, exc.kind, str(exc))
            continue
        report.ok.append(entry.rel)
        width, height = loaded.image.size
        loaded.image.close()
        if resolution and min(width, height) < resolution:
            report.add(entry.rel, "too_small", f"{width}x{height} is below the {resolution} px training "
                                               "resolution; it will be upscaled and look soft - use a larger "
                                               "original")
        if loaded.conversions:
            report.add(entry.rel, "converted", "; ".join(loaded.conversions))
        if loaded.orientation != 1:
            report.add(entry.rel, "exif_rotated", f"EXIF orientation {loaded.orientation} applied "
                                                  f"({_ORIENTATION_TEXT[loaded.orientation]})")
        _check_caption(report, entry)
        _check_mask(report, entry, (width, height), max_pixels)
    for cap_rel, image_rels in scan.shared_captions.items():
        report.add(cap_rel, "shared_caption", f"used by {len(image_rels)} images ({', '.join(image_rels)}); "
                                              "give each image its own name")
    for rel in scan.orphan_captions:
        report.add(rel, "caption_without_image", "no image with this name; rename it to match an image or delete it")
    for rel in scan.non_images:
        report.add(rel, "non_image", f"not an image ({_IMAGE_TYPES}) or .txt caption; ignored")
    for rel, reason in scan.ignored_folders:
        report.add(rel, "ignored_folder", f"not used for training: {reason}")
    return report


def _check_mask(report: DatasetReport, entry: _ImageEntry, size: tuple[int, int], max_pixels: int) -> None:
    """A mask file (mask_path) that masked-loss training would refuse: undecodable, or of
    another size than its picture."""
    found = mask_path(entry.path)
    if found is None:
        return
    rel = str(PurePosixPath(entry.rel).with_name(found.name))
    try:
        mask = _load_image(found, max_pixels).image
    except ImageLoadError as exc:
        report.add(rel, "mask_unusable", f"{exc} Masked-loss training refuses it.")
        return
    if mask.size != size:
        report.add(rel, "mask_unusable", f"{mask.size[0]}x{mask.size[1]} but its picture is {size[0]}x{size[1]}; "
                                         "save the mask at the picture's size")


def _check_caption(report: DatasetReport, entry: _ImageEntry) -> None:
    if entry.caption is None:
        report.add(entry.rel, "missing_caption", f"no caption; add {Path(entry.rel).stem}{CAPTION_EXTENSION} "
                                                 "or the trigger word alone will be trained")
        return
    cap_rel = str(PurePosixPath(entry.rel).with_name(entry.caption.name))
    try:
        info = _read_caption_file(entry.caption)
    except StudioError as exc:
        report.add(cap_rel, "caption_unreadable", str(exc))
        return
    if info.too_big:
        report.add(cap_rel, "huge_caption", f"{info.size} bytes, not read (limit {MAX_CAPTION_BYTES}); "
                                            "check that this is really a caption")
        return
    if info.encoding == "utf-8-sig":
        report.add(cap_rel, "caption_not_utf8", "starts with a UTF-8 byte-order mark, which kohya reads into "
                                                "the first tag; re-save it as UTF-8 without BOM "
                                                "(editing it in the studio does this)")
    elif info.encoding != "utf-8":
        report.add(cap_rel, "caption_not_utf8", f"not UTF-8; read as {info.encoding} - check the text and "
                                                "re-save it as UTF-8 (editing it in the studio does this)")
    text = info.text.strip()
    if not text:
        report.add(cap_rel, "empty_caption", "caption is empty; write one or delete the file")
    elif len(text) > HUGE_CAPTION_CHARS:
        report.add(cap_rel, "huge_caption", f"{len(text)} characters; the text encoder sees at most 225 "
                                            "tokens, the rest is cut - shorten it")
    if len([line for line in text.split("\n") if line.strip()]) > 1:
        report.add(cap_rel, "multiline_caption", "has several lines; training uses only the first - "
                                                 "join them with commas")
