"""What training reads: one `DatasetItem` per usable picture (path, caption, repeats,
regularisation or not), skipping what `check_dataset` reports."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from studio.datasets.captions import MAX_CAPTION_BYTES, _read_caption_file, _training_caption
from studio.datasets.checks import Issue
from studio.datasets.images import DEFAULT_MAX_PIXELS, ImageLoadError, _load_image
from studio.datasets.layout import _scan
from studio.errors import StudioError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetItem:
    path: Path
    caption: str                # first non-empty line of the caption file, "" when none
    repeats: int
    is_regularisation: bool
    subset: str                 # kohya dir name (ss_dataset_dirs key)
    size: tuple[int, int]       # (width, height) after EXIF orientation


def training_items(folder: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS
                   ) -> tuple[list[DatasetItem], list[Issue]]:
    """What training reads from a dataset: (the usable images sorted by relative path, the
    images it skips and why). Each image is decoded once to prove it loads."""
    scan = _scan(folder)
    items: list[DatasetItem] = []
    skipped: list[Issue] = []
    for entry in scan.images:
        try:
            loaded = _load_image(entry.path, max_pixels)
        except ImageLoadError as exc:
            skipped.append(Issue(entry.rel, exc.kind, str(exc)))
            continue
        size = loaded.image.size
        loaded.image.close()
        caption = ""
        if entry.caption is not None:
            try:
                info = _read_caption_file(entry.caption)
            except StudioError as exc:
                skipped.append(Issue(entry.rel, "caption_unreadable", str(exc)))
                continue
            if info.too_big:
                skipped.append(Issue(entry.rel, "huge_caption", f"caption {entry.caption.name} is {info.size} "
                                                                f"bytes (limit {MAX_CAPTION_BYTES})"))
                continue
            if info.encoding != "utf-8":
                log.info("caption %s read as %s", entry.caption, info.encoding)
            caption = _training_caption(info.text)
        items.append(DatasetItem(entry.path, caption, entry.subset.repeats, entry.subset.is_reg,
                                 entry.subset.key, size))
    return items, skipped


def load_items(folder: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[DatasetItem]:
    """The usable images of a dataset (`training_items`); bad files are skipped with a
    logged warning."""
    items, skipped = training_items(folder, max_pixels=max_pixels)
    for issue in skipped:
        log.warning("skipping %s: %s", issue.path, issue.message)
    return items
