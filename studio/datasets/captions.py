"""Captions: reading (any common encoding, size-capped), writing, and the bulk edits (one
trigger-word rule: `caption_with_trigger`).

Captions are comma-separated tags (booru style); a caption without commas is one tag.
Training uses the first non-empty line of a caption file (kohya reads one line).
"""
from __future__ import annotations

import codecs
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from studio.datasets.layout import CAPTION_EXTENSION, _ImageEntry, _scan
from studio.errors import StudioError
from studio.fsutil import atomic_write_text, open_regular

log = logging.getLogger(__name__)

#: Caption files larger than this are not read at all (a caption is a line of text).
MAX_CAPTION_BYTES = 1024 * 1024


@dataclass(frozen=True)
class _CaptionText:
    text: str
    encoding: str      # "utf-8", "utf-8-sig", "utf-16", "cp1252" or "latin-1"
    size: int
    too_big: bool


def _decode_caption(data: bytes) -> tuple[str, str]:
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8):].decode("utf-8", errors="replace"), "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace"), "utf-16"
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"


def _read_caption_file(path: Path) -> _CaptionText:
    try:
        with open_regular(path, "Caption") as handle:
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(MAX_CAPTION_BYTES + 1)
    except OSError as exc:
        raise StudioError(f"Cannot read caption {path}: {exc}; check its permissions.") from None
    too_big = size > MAX_CAPTION_BYTES
    text, encoding = _decode_caption(data[:MAX_CAPTION_BYTES])
    return _CaptionText(text.replace("\r\n", "\n").replace("\r", "\n"), encoding, size, too_big)


def caption_path(path: str | os.PathLike) -> Path:
    """The caption file for an image (same stem, `.txt`); a `.txt` path is returned as is.
    An existing `.TXT` spelling is preferred over creating a second file."""
    p = Path(path)
    if p.suffix.lower() == CAPTION_EXTENSION:
        return p
    target = p.with_suffix(CAPTION_EXTENSION)
    if not target.exists():
        upper = p.with_suffix(CAPTION_EXTENSION.upper())
        if upper.exists():
            return upper
    return target


def read_caption(path: str | os.PathLike) -> str:
    """The caption of an image (or a caption file), whitespace-stripped; "" when there is
    none. Non-UTF-8 files are decoded with a fallback (cp1252, then latin-1)."""
    cap = caption_path(path)
    if not cap.exists():
        return ""
    info = _read_caption_file(cap)
    if info.too_big:
        raise StudioError(f"Caption {cap} is {info.size} bytes (limit {MAX_CAPTION_BYTES}); a caption is a "
                          "line of text - check that this is the right file and shorten it.")
    return info.text.strip()


def write_caption(path: str | os.PathLike, text: str) -> Path:
    """Atomically write the caption of an image (or a caption file) as UTF-8; returns its path."""
    cap = caption_path(path)
    clean = text.strip()
    if len(clean.encode("utf-8")) > MAX_CAPTION_BYTES:
        raise StudioError(f"Caption for {cap} is over {MAX_CAPTION_BYTES} bytes; shorten it.")
    try:
        atomic_write_text(cap, clean)
    except OSError as exc:
        raise StudioError(f"Cannot write caption {cap}: {exc}; "
                          "check the folder's permissions and free space.") from None
    return cap


def _training_caption(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def _edit_captions(folder: str | os.PathLike, edit: Callable[[str], str | None], *,
                   include_regularisation: bool, create_missing: bool) -> int:
    """Apply `edit` to every caption (new text, or None for no change); all new texts are
    computed first, so a bad pattern changes nothing. Returns the number of files written."""
    scan = _scan(folder)
    plans: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for entry in scan.images:
        if entry.subset.is_reg and not include_regularisation:
            continue
        if entry.caption is None and not create_missing:
            continue
        cap = entry.caption or entry.path.with_suffix(CAPTION_EXTENSION)
        if cap in seen:
            continue
        seen.add(cap)
        old = ""
        if entry.caption is not None:
            info = _read_caption_file(cap)
            if info.too_big:
                log.warning("skipping caption %s: %d bytes is over the %d-byte limit",
                            cap, info.size, MAX_CAPTION_BYTES)
                continue
            old = info.text.strip()
        new = edit(old)
        if new is not None and new.strip() != old:
            plans.append((cap, new.strip()))
    for cap, new in plans:
        write_caption(cap, new)
    return len(plans)


def caption_with_trigger(caption: str, trigger: str) -> str:
    """The one trigger-word rule, for the dataset's bulk edit and for training: a caption
    whose first tag holds the trigger as whole words ("sks dog", "a sks shape", "sks,dog")
    stays as it is; a trigger that is a tag further on moves to the front; otherwise it is
    put first ("sks, a dog"). An empty caption becomes the trigger."""
    words = trigger.split()
    tags = split_tags(caption)
    if not words:
        return caption
    first = tags[0].split() if tags else []
    if any(first[i:i + len(words)] == words for i in range(len(first))):
        return caption
    word = " ".join(words)
    if word in tags:
        return ", ".join([word] + [t for t in tags if t != word])
    return f"{word}, {caption.strip()}" if caption.strip() else word


def add_trigger_word(folder: str | os.PathLike, trigger: str, *, include_regularisation: bool = False) -> int:
    """Put `trigger` first in every caption by caption_with_trigger's rule (images without a
    caption get one); never duplicated. Returns files changed."""
    word = _one_tag(trigger, "trigger word")

    def edit(old: str) -> str | None:
        new = caption_with_trigger(old, word)
        return None if new == old else new

    return _edit_captions(folder, edit, include_regularisation=include_regularisation, create_missing=True)


def remove_tag(folder: str | os.PathLike, tag: str, *, include_regularisation: bool = False) -> int:
    """Remove every tag equal to `tag` (exact, case-sensitive). Returns files changed."""
    target = _one_tag(tag, "tag")

    def edit(old: str) -> str | None:
        tags = split_tags(old)
        if target not in tags:
            return None
        return ", ".join(t for t in tags if t != target)

    return _edit_captions(folder, edit, include_regularisation=include_regularisation, create_missing=False)


def find_replace(folder: str | os.PathLike, find: str, replace: str, *, regex: bool = False,
                 case_sensitive: bool = True, include_regularisation: bool = False) -> int:
    """Replace `find` with `replace` in every caption: plain text by default, a Python regular
    expression (with \\1 group references) when `regex`. Returns files changed."""
    if not find:
        raise StudioError("Find text is empty; give the text (or pattern) to replace.")
    flags = 0 if case_sensitive else re.IGNORECASE
    try:
        pattern = re.compile(find if regex else re.escape(find), flags)
    except re.error as exc:
        raise StudioError(f"Invalid regular expression {find!r}: {exc}; fix it or search as plain text.") from None

    def edit(old: str) -> str | None:
        try:
            return pattern.sub(replace, old) if regex else pattern.sub(lambda _m: replace, old)
        except (re.error, IndexError) as exc:
            raise StudioError(f"Invalid replacement {replace!r} for {find!r}: {exc}; "
                              "check its group references (\\1, \\g<name>).") from None

    return _edit_captions(folder, edit, include_regularisation=include_regularisation, create_missing=False)


def add_prefix(folder: str | os.PathLike, prefix: str, *, separator: str = ", ",
               include_regularisation: bool = False) -> int:
    """Start every caption with `prefix` + `separator` (captions already starting with it are
    left alone; images without a caption get `prefix`). Returns files changed."""
    text = _non_empty(prefix, "prefix")
    return _edit_captions(
        folder, lambda old: None if old.startswith(text) else (f"{text}{separator}{old}" if old else text),
        include_regularisation=include_regularisation, create_missing=True)


def add_suffix(folder: str | os.PathLike, suffix: str, *, separator: str = ", ",
               include_regularisation: bool = False) -> int:
    """End every caption with `separator` + `suffix` (captions already ending with it are left
    alone; images without a caption get `suffix`). Returns files changed."""
    text = _non_empty(suffix, "suffix")
    return _edit_captions(
        folder, lambda old: None if old.endswith(text) else (f"{old}{separator}{text}" if old else text),
        include_regularisation=include_regularisation, create_missing=True)


def tag_frequency(folder: str | os.PathLike, *, include_regularisation: bool = False) -> dict[str, int]:
    """How many images' captions contain each tag (stripped, case kept), most frequent first."""
    counts: Counter[str] = Counter()
    for entry in _scan(folder).images:
        if entry.subset.is_reg and not include_regularisation:
            continue
        text = _caption_for_stats(entry)
        counts.update(set(split_tags(text)))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _caption_for_stats(entry: _ImageEntry) -> str:
    if entry.caption is None:
        return ""
    try:
        info = _read_caption_file(entry.caption)
    except StudioError as exc:
        log.warning("%s", exc)
        return ""
    return "" if info.too_big else info.text.strip()


def _one_tag(value: str, what: str) -> str:
    text = _non_empty(value, what)
    if "," in text:
        raise StudioError(f"The {what} {value!r} contains a comma, which separates tags; give one tag.")
    return text


def _non_empty(value: str, what: str) -> str:
    text = (value or "").strip()
    if not text:
        raise StudioError(f"The {what} is empty; give some text.")
    return text
