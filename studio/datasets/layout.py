"""The layout of `workspace/datasets/<name>/` (kohya convention), and the scan that reads it:

- images (.png .jpg .jpeg .webp .bmp, any case) with a same-stem `.txt` caption beside them;
- images at the top level have 1 repeat;
- a top-level `N_concept/` folder (e.g. `10_sks dog/`) holds images repeated N times;
- regularisation (class / prior-preservation) images live in a top-level `reg/` folder
  (1 repeat; its own `N_class/` subfolders give repeats, like kohya's `reg_data_dir`) or
  in a top-level `N_reg/` folder (N repeats). "reg" is matched case-insensitively.
- `<stem>-masklabel.<image extension>` beside a picture is its loss mask (masks.py), never a
  training picture itself.
- other folders (no `N_` prefix, or nested deeper) are not used; `check_dataset` says so.
  Hidden files and folders (leading '.') are ignored everywhere.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CAPTION_EXTENSION = ".txt"
MASK_SUFFIX = "-masklabel"
REG_FOLDER = "reg"
#: Highest repeat count of an `N_name` folder: kohya datasets use up to a few hundred, and
#: every repeat is an entry in each epoch's shuffled order.
MAX_REPEATS = 1000
_REPEATS_RE = re.compile(r"^(\d+)_(.+)$")
_SYSTEM_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})
_IMAGE_TYPES = " ".join(sorted(IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class _Subset:
    path: Path
    rel: str          # relative folder, posix ("" for the top level)
    key: str          # kohya's dir name for ss_* metadata
    repeats: int
    is_reg: bool


@dataclass(frozen=True)
class _ImageEntry:
    path: Path
    rel: str
    subset: _Subset
    caption: Path | None


@dataclass
class _Scan:
    folder: Path
    subsets: list[_Subset] = field(default_factory=list)
    images: list[_ImageEntry] = field(default_factory=list)
    orphan_captions: list[str] = field(default_factory=list)
    shared_captions: dict[str, list[str]] = field(default_factory=dict)
    non_images: list[str] = field(default_factory=list)
    ignored_folders: list[tuple[str, str]] = field(default_factory=list)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SYSTEM_NAMES


def _repeats_of(name: str) -> tuple[int, str] | None:
    match = _REPEATS_RE.match(name)
    if not match:
        return None
    return int(match.group(1)), match.group(2)


def _repeats_problem(repeats: int, rest: str) -> str | None:
    """Why an `N_name` folder's repeat count cannot be used; None when it can."""
    if repeats < 1:
        return f"repeat count {repeats} is not allowed; rename it to '1_{rest}' (1 or more repeats)"
    if repeats > MAX_REPEATS:
        return (f"repeat count {repeats} is over the limit of {MAX_REPEATS}; rename it to "
                f"'{MAX_REPEATS}_{rest}' or fewer (raise the training steps instead)")
    return None


def _is_subset_name(name: str) -> bool:
    """A folder name that carries meaning in the layout (`N_name` or `reg`)."""
    parsed = _repeats_of(name)
    return name.lower() == REG_FOLDER or (parsed is not None and parsed[0] >= 1)


def _dataset_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise StudioError(f"Dataset folder {path} does not exist or is not a folder; "
                          "import one with `lora-studio dataset import` or check the path.")
    return path


def _sorted_dirs(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise StudioError(f"Cannot list {path}: {exc}; check its permissions.") from None


def _scan(folder: str | os.PathLike) -> _Scan:
    root = _dataset_folder(folder)
    scan = _Scan(root)
    top_entries = _sorted_dirs(root)
    dir_names = {e.name for e in top_entries if e.is_dir()}
    own_name = root.resolve().name
    top_key = own_name if own_name and own_name not in dir_names else "."
    subsets = [_Subset(root, "", top_key, 1, False)]
    for entry in top_entries:
        if not entry.is_dir() or _is_hidden(entry.name):
            continue
        name = entry.name
        parsed = _repeats_of(name)
        if name.lower() == REG_FOLDER:
            subsets.append(_Subset(Path(entry.path), name, name, 1, True))
            for sub in _sorted_dirs(Path(entry.path)):
                if not sub.is_dir() or _is_hidden(sub.name):
                    continue
                sub_parsed = _repeats_of(sub.name)
                if sub_parsed and _repeats_problem(*sub_parsed):
                    scan.ignored_folders.append((f"{name}/{sub.name}", _repeats_problem(*sub_parsed)))
                elif sub_parsed:
                    subsets.append(_Subset(Path(sub.path), f"{name}/{sub.name}", sub.name, sub_parsed[0], True))
                else:
                    scan.ignored_folders.append((f"{name}/{sub.name}", (
                        f"folders inside {name}/ need a repeat count; rename it to '1_{sub.name}' "
                        "or move its images up into reg/")))
        elif parsed and _repeats_problem(*parsed):
            scan.ignored_folders.append((name, _repeats_problem(*parsed)))
        elif parsed:
            subsets.append(_Subset(Path(entry.path), name, name, parsed[0], parsed[1].lower() == REG_FOLDER))
        else:
            scan.ignored_folders.append((name, f"folder name has no repeat count; rename it to '1_{name}' "
                                               "(kohya 'N_concept' = N repeats) to train on it"))
    scan.subsets = subsets

    for subset in subsets:
        images: list[Path] = []
        captions: dict[str, Path] = {}
        for entry in _sorted_dirs(subset.path):
            if _is_hidden(entry.name):
                continue
            rel = f"{subset.rel}/{entry.name}" if subset.rel else entry.name
            if entry.is_dir():
                if subset.rel and subset.rel.lower() != REG_FOLDER:  # top level and reg/ handled above
                    scan.ignored_folders.append((rel, f"nested folders are not used; move its images up into "
                                                      f"{subset.rel}/ or to a top-level 'N_name' folder"))
                continue
            suffix = Path(entry.name).suffix
            if suffix.lower() in IMAGE_EXTENSIONS and Path(entry.name).stem.endswith(MASK_SUFFIX):
                continue  # a loss mask (mask_path), not a picture
            if suffix.lower() in IMAGE_EXTENSIONS:
                images.append(Path(entry.path))
            elif suffix.lower() == CAPTION_EXTENSION:
                stem = Path(entry.name).stem
                if stem not in captions or suffix == CAPTION_EXTENSION:
                    captions[stem] = Path(entry.path)
            else:
                scan.non_images.append(rel)
        used_stems: dict[str, list[str]] = {}
        for image in images:
            rel = f"{subset.rel}/{image.name}" if subset.rel else image.name
            caption = captions.get(image.stem)
            scan.images.append(_ImageEntry(image, rel, subset, caption))
            used_stems.setdefault(image.stem, []).append(rel)
        for stem, cap in captions.items():
            cap_rel = f"{subset.rel}/{cap.name}" if subset.rel else cap.name
            if stem not in used_stems:
                scan.orphan_captions.append(cap_rel)
            elif len(used_stems[stem]) > 1:
                scan.shared_captions[cap_rel] = used_stems[stem]
    scan.images.sort(key=lambda e: e.rel)
    return scan
