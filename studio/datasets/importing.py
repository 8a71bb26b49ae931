"""Importing a dataset: folders, zips and uploads through one reader for files and zip
members (regular files only), with caps on count and size; nothing is half-written."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterable, Literal

from studio.datasets.captions import MAX_CAPTION_BYTES, caption_path
from studio.datasets.images import DEFAULT_MAX_PIXELS, ImageLoadError, _load_image
from studio.datasets.layout import CAPTION_EXTENSION, IMAGE_EXTENSIONS, _IMAGE_TYPES, _is_hidden, _is_subset_name
from studio.errors import StudioError
from studio.fsutil import NotAFile, PathInTheWay, atomic_path, name_max, open_regular
from studio.limits import IMPORT_IMAGES
from studio.workspace import Workspace

log = logging.getLogger(__name__)

_DRIVE_RE = re.compile(r"^[A-Za-z]:")
ImportMode = Literal["new", "add", "overwrite"]


@dataclass(frozen=True)
class ZipLimits:
    """Limits that stop zip bombs before anything is extracted."""

    max_members: int = 20_000
    max_total_bytes: int = 8 * 1024**3      # sum of declared uncompressed sizes
    max_ratio: float = 100.0                # uncompressed / compressed, per member ...
    ratio_min_bytes: int = 1024**2          # ... checked for members at least this large


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


@dataclass
class ImportReport:
    name: str
    folder: Path
    imported: list[str] = field(default_factory=list)   # relative paths written
    replaced: list[str] = field(default_factory=list)   # subset of imported that replaced a file
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def image_count(self) -> int:
        return sum(Path(p).suffix.lower() in IMAGE_EXTENSIONS for p in self.imported)

    @property
    def caption_count(self) -> int:
        return sum(Path(p).suffix.lower() == CAPTION_EXTENSION for p in self.imported)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "folder": str(self.folder), "images": self.image_count,
            "captions": self.caption_count, "imported": list(self.imported), "replaced": list(self.replaced),
            "skipped": [{"source": s.source, "reason": s.reason} for s in self.skipped],
        }

    def summary(self, *, examples: int | None = None) -> str:
        """A headline, then each skipped file with the reason (the first `examples` of them
        when given)."""
        examples = len(self.skipped) if examples is None else examples
        lines = [f"Imported {self.image_count} images and {self.caption_count} captions into dataset "
                 f"{self.name!r} ({self.folder})"
                 + (f", replacing {len(self.replaced)} files" if self.replaced else "")
                 + (f"; skipped {len(self.skipped)}" if self.skipped else "") + "."]
        for s in self.skipped[:examples]:
            lines.append(f"  skipped {s.source}: {s.reason}")
        if len(self.skipped) > examples:
            lines.append(f"  ... and {len(self.skipped) - examples} more skipped")
        if self.imported:
            lines.append("Run `lora-studio dataset check` to validate the images.")
        return "\n".join(lines)


@dataclass
class _Candidate:
    rel: PurePosixPath
    origin: str
    open: Callable[[], IO[bytes]]
    size: int
    zipped: bool = False


def import_dataset(sources: str | os.PathLike | Iterable[str | os.PathLike], name: str, workspace: Workspace,
                   *, mode: ImportMode = "new", zip_limits: ZipLimits | None = None) -> ImportReport:
    """Copy images and `.txt` captions from folders, .zip files and/or single files into
    `workspace/datasets/<name>/`. Originals are only read.

    mode: "new" refuses a dataset folder that has files; "add" adds files and skips names
    already present; "overwrite" adds files and replaces those already present.
    Folder and zip structure is kept (a source folder or single zip root named `N_x` or `reg`
    becomes that subfolder; any other single zip root folder is dropped). Names that differ
    only by case are treated as the same name. Unsafe zip members (absolute, `..`, drive
    letters, symlinks, encrypted, extreme compression) are skipped; oversized zips refused."""
    if mode not in ("new", "add", "overwrite"):
        raise StudioError(f"Unknown import mode {mode!r}; use 'new', 'add' or 'overwrite'.")
    limits = zip_limits or ZipLimits()
    dest = workspace.dataset_dir(name)
    paths = [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(s) for s in sources]
    if not paths:
        raise StudioError("Nothing to import: give a folder, a .zip file or image files.")
    for src in paths:
        if not src.exists():
            raise StudioError(f"Import source {src} does not exist; check the path.")
        _check_not_nested(src, dest)
    if dest.exists() and not dest.is_dir():
        raise StudioError(f"{dest} exists and is not a folder; move it away or pick another dataset name.")
    existing_files = _existing_files(dest) if dest.exists() else []
    if mode == "new" and dest.exists() and any(dest.iterdir()):
        raise StudioError(f"Dataset {dest.name!r} already exists at {dest} with {len(existing_files)} files; "
                          "import with mode 'add' (keep existing files) or 'overwrite', or choose another name.")

    report = ImportReport(dest.name, dest)
    with contextlib.ExitStack() as stack:
        candidates: list[_Candidate] = []
        for src in paths:
            if src.is_dir():
                candidates += _gather_folder(src, report)
            elif src.suffix.lower() == ".zip":
                candidates += _gather_zip(src, stack, limits, report)
            else:
                candidates += _gather_file(src, paths, report)
        plan = _plan(candidates, existing_files, dest, mode, report)
        images = sum(rel.suffix.lower() in IMAGE_EXTENSIONS for _, rel, _ in plan)
        IMPORT_IMAGES.check(images, f"This import has {images} images")
        created = not dest.exists()
        made_dirs: list[Path] = []
        try:
            _make_dirs(dest, made_dirs)
            _copy_plan(plan, dest, existing_files, report, made_dirs)
        except BaseException:
            if created:  # the folder is this import's own: leave nothing of it behind
                shutil.rmtree(dest, ignore_errors=True)
            raise
        finally:
            for folder in reversed(made_dirs):  # folders that only skipped files would have filled
                with contextlib.suppress(OSError):
                    folder.rmdir()
    log.info("imported %d files into %s, skipped %d", len(report.imported), dest, len(report.skipped))
    return report


#: Write errors that stop the whole import (the disk, not the file, is the problem).
_PER_FILE_WRITE_ERRORS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL})


def _copy_plan(plan: list[tuple[_Candidate, PurePosixPath, bool]], dest: Path, existing: list[PurePosixPath],
               report: ImportReport, made_dirs: list[Path]) -> None:
    """Copy the planned files (images first): each image is decoded as training will decode
    it, and a file that cannot be read, decoded or written under its name is skipped with
    the reason. A caption whose image was skipped is skipped too."""
    root = dest.resolve()
    images_here = {(rel.parent, rel.stem) for rel in existing if rel.suffix.lower() in IMAGE_EXTENSIONS}
    for cand, target_rel, replaces in plan:
        is_image = target_rel.suffix.lower() in IMAGE_EXTENSIONS
        if not is_image and (target_rel.parent, target_rel.stem) not in images_here:
            report.skipped.append(Skipped(cand.origin, "its image was skipped, so the caption was too"))
            continue
        target = dest.joinpath(*target_rel.parts)
        if not target.resolve().is_relative_to(root):
            report.skipped.append(Skipped(cand.origin, "path would land outside the dataset folder"))
            continue
        try:
            _make_dirs(target.parent, made_dirs)
            with atomic_path(target) as tmp:
                with open(tmp, "wb") as out:
                    _copy_data(cand, out)
                if is_image:
                    _load_image(tmp, DEFAULT_MAX_PIXELS, shown_as=cand.origin).image.close()
        except (_Unreadable, ImageLoadError) as problem:
            report.skipped.append(Skipped(cand.origin, str(problem)))
            continue
        except (PathInTheWay, FileExistsError, NotADirectoryError):
            report.skipped.append(Skipped(cand.origin, "a file or folder of the same name is in the way"))
            continue
        except OSError as exc:
            if exc.errno not in _PER_FILE_WRITE_ERRORS:
                raise StudioError(f"Cannot write {target}: {exc.strerror}; check free space and permissions. "
                                  "Nothing of this import was kept in a new dataset; files added to an existing "
                                  f"one before this ({len(report.imported)}) were.") from None
            report.skipped.append(Skipped(cand.origin, f"cannot be written under this name ({exc.strerror}); "
                                                       "rename it"))
            continue
        if is_image:
            images_here.add((target_rel.parent, target_rel.stem))
        report.imported.append(target_rel.as_posix())
        if replaces:
            report.replaced.append(target_rel.as_posix())


def _make_dirs(folder: Path, made: list[Path]) -> None:
    """mkdir -p that records the folders it creates (parents first)."""
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    for parent in reversed(missing):
        parent.mkdir()
        made.append(parent)


def _check_not_nested(src: Path, dest: Path) -> None:
    s, d = src.resolve(), dest.resolve()
    if d.is_relative_to(s) or s.is_relative_to(d):
        raise StudioError(f"Cannot import {src} into dataset folder {dest}: one is inside the other; "
                          "import from a folder outside the dataset.")


def _existing_files(dest: Path) -> list[PurePosixPath]:
    out = []
    for dirpath, dirnames, filenames in os.walk(dest):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        base = Path(dirpath).relative_to(dest)
        out += [PurePosixPath(base.as_posix()) / f for f in filenames if not _is_hidden(f)]
    return out


_NOT_REGULAR = "not a regular file (a pipe, socket or device); only files are imported"


def _gather_folder(src: Path, report: ImportReport) -> list[_Candidate]:
    prefix = PurePosixPath(src.name) if _is_subset_name(src.name) else PurePosixPath()
    out: list[_Candidate] = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        kept = []
        for d in sorted(dirnames):
            if (here / d).is_symlink():
                report.skipped.append(Skipped(str(here / d), "link to a folder; not followed"))
            elif _is_hidden(d):
                report.skipped.append(Skipped(str(here / d), "hidden or system folder"))
            else:
                kept.append(d)
        dirnames[:] = kept
        rel_dir = prefix / here.relative_to(src).as_posix()
        for f in sorted(filenames):
            candidate = _file_candidate(here / f, PurePosixPath(os.path.normpath(rel_dir / f)), str(here / f), report)
            if candidate:
                out.append(candidate)
    return out


def _file_candidate(path: Path, rel: PurePosixPath, origin: str, report: ImportReport) -> _Candidate | None:
    """A regular file to copy; anything else (a pipe, a device, a broken link) is reported."""
    try:
        st = path.stat()
    except OSError:
        report.skipped.append(Skipped(origin, "cannot be read (broken link or no permission)"))
        return None
    if not stat.S_ISREG(st.st_mode):
        report.skipped.append(Skipped(origin, _NOT_REGULAR))
        return None
    return _Candidate(rel, origin, lambda: open_regular(path), st.st_size)


def _gather_file(src: Path, all_sources: list[Path], report: ImportReport) -> list[_Candidate]:
    """A single file (and the caption beside an image), reported by its name: the name a
    person uploaded, not the server's temporary copy."""
    found = [_file_candidate(src, PurePosixPath(src.name), src.name, report)]
    if found[0] and src.suffix.lower() in IMAGE_EXTENSIONS:
        cap = caption_path(src)
        if cap.is_file() and cap not in all_sources:
            found.append(_file_candidate(cap, PurePosixPath(cap.name), cap.name, report))
    return [c for c in found if c]


#: Compression methods Python's zipfile reads (bzip2 and LZMA when Python has those modules).
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ZIP_METHOD_NAMES = {9: "Deflate64 (as Windows writes large zips)", 10: "PKWARE DCL Implode", 12: "bzip2",
                     14: "LZMA", 93: "Zstandard", 95: "xz", 96: "JPEG (WinZip)", 97: "WavPack", 98: "PPMd",
                     99: "AES encryption"}


def _zip_member_problem(info: zipfile.ZipInfo, limits: ZipLimits) -> str | None:
    name = info.filename.replace("\\", "/")
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link in the zip; links are never extracted"
    if name.startswith("/") or _DRIVE_RE.match(name):
        return "absolute path in the zip; it would be written outside the dataset folder"
    parts = name.split("/")
    if ".." in parts:
        return "path with '..' in the zip; it would be written outside the dataset folder"
    if any("\x00" in p or ":" in p or any(ord(c) < 32 for c in p) for p in parts):
        return "path with unsafe characters (':' or control characters)"
    if info.flag_bits & 0x1:
        return "encrypted member; unzip it yourself with the password and import the folder"
    if info.compress_type not in _ZIP_METHODS:
        method = _ZIP_METHOD_NAMES.get(info.compress_type, f"compression method {info.compress_type}")
        return (f"compressed with {method}, which cannot be unpacked here; unzip it yourself (or re-zip it "
                "with ordinary Deflate) and import the result")
    if info.file_size >= limits.ratio_min_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        ratio = info.file_size / max(info.compress_size, 1)
        return (f"compression ratio {ratio:.0f}:1 (limit {limits.max_ratio:.0f}:1) looks like a zip bomb; "
                "images do not compress like that")
    return None


def _gather_zip(src: Path, stack: contextlib.ExitStack, limits: ZipLimits,
                report: ImportReport) -> list[_Candidate]:
    handle = stack.enter_context(open_regular(src, "Zip file"))
    try:
        zf = stack.enter_context(zipfile.ZipFile(handle))
        infos = zf.infolist()
    except Exception as exc:  # zipfile raises several types on a damaged directory; all mean the same
        raise StudioError(f"{src} is not a readable zip file ({exc}); re-download it or import the folder.") from None
    files = [i for i in infos if not i.is_dir()]
    if len(infos) > limits.max_members:
        raise StudioError(f"Zip {src} has {len(infos)} entries, over the limit of {limits.max_members}; "
                          "split it into smaller zips or unzip it and import the folder.")
    total = sum(i.file_size for i in files)
    if total > limits.max_total_bytes:
        raise StudioError(f"Zip {src} would unpack to {total / 1024**3:.2f} GiB, over the "
                          f"{limits.max_total_bytes / 1024**3:.2f} GiB limit (zip bomb?); "
                          "unzip it yourself and import the folder if it is genuine.")
    kept: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    for info in files:
        origin = f"{src.name}:{info.filename}"
        problem = _zip_member_problem(info, limits)
        if problem:
            report.skipped.append(Skipped(origin, problem))
            continue
        parts = [p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts:
            continue
        if any(_is_hidden(p) for p in parts):
            report.skipped.append(Skipped(origin, "hidden or system file"))
            continue
        kept.append((info, PurePosixPath(*parts)))
    roots = {rel.parts[0] for _, rel in kept}
    if len(roots) == 1 and all(len(rel.parts) > 1 for _, rel in kept):
        root = next(iter(roots))
        if not _is_subset_name(root):
            kept = [(info, PurePosixPath(*rel.parts[1:])) for info, rel in kept]
    return [_Candidate(rel, f"{src.name}:{info.filename}", lambda i=info: zf.open(i), info.file_size, zipped=True)
            for info, rel in kept]


def _plan(candidates: list[_Candidate], existing: list[PurePosixPath], dest: Path, mode: str,
          report: ImportReport) -> list[tuple[_Candidate, PurePosixPath, bool]]:
    """Decide what goes where: filter by type, canonicalise case, resolve name clashes, and
    keep captions only when their image is imported or already present."""
    dir_case: dict[str, PurePosixPath] = {}
    file_case: dict[str, PurePosixPath] = {}
    for rel in existing:
        _canonical_dir(rel.parent, dir_case)
        file_case[rel.as_posix().casefold()] = rel
    existing_keys = set(file_case)
    longest = name_max(dest if dest.is_dir() else dest.parent)

    images: list[tuple[_Candidate, PurePosixPath, bool]] = []
    captions: list[tuple[_Candidate, PurePosixPath, bool]] = []
    taken: dict[str, str] = {}
    for cand in candidates:
        if any(_is_hidden(p) for p in cand.rel.parts):
            report.skipped.append(Skipped(cand.origin, "hidden or system file"))
            continue
        too_long = [len(os.fsencode(p)) for p in cand.rel.parts if len(os.fsencode(p)) > longest]
        if too_long:
            report.skipped.append(Skipped(cand.origin, f"a name of {too_long[0]} bytes, over the file system's "
                                                       f"limit of {longest}; give it a shorter name"))
            continue
        suffix = cand.rel.suffix.lower()
        if suffix not in IMAGE_EXTENSIONS and suffix != CAPTION_EXTENSION:
            report.skipped.append(Skipped(cand.origin, f"not an image ({_IMAGE_TYPES}) or .txt caption"))
            continue
        if suffix == CAPTION_EXTENSION and cand.size > MAX_CAPTION_BYTES:
            report.skipped.append(Skipped(cand.origin, f"caption is {cand.size} bytes, over the "
                                                       f"{MAX_CAPTION_BYTES}-byte limit"))
            continue
        rel = _canonical_dir(cand.rel.parent, dir_case) / cand.rel.name
        key = rel.as_posix().casefold()
        if key in taken:
            first = taken[key]
            why = "same name as" if rel.as_posix() == first else "name differs only by case from"
            report.skipped.append(Skipped(cand.origin, f"{why} {first!r}, already taken by another file"))
            continue
        replaces = False
        if key in existing_keys:
            if mode != "overwrite":
                report.skipped.append(Skipped(cand.origin, f"{file_case[key].as_posix()!r} already exists in "
                                                           "the dataset; import with mode 'overwrite' to replace it"))
                continue
            rel, replaces = file_case[key], True
        taken[key] = rel.as_posix()
        (images if suffix in IMAGE_EXTENSIONS else captions).append((cand, rel, replaces))

    image_stems = {(rel.parent, rel.stem) for _, rel, _ in images}
    image_stems |= {(rel.parent, rel.stem) for rel in existing if rel.suffix.lower() in IMAGE_EXTENSIONS}
    plan = list(images)
    for cand, rel, replaces in captions:
        if (rel.parent, rel.stem) in image_stems:
            plan.append((cand, rel, replaces))
        else:
            report.skipped.append(Skipped(cand.origin, "caption without a matching image"))
    plan.sort(key=lambda t: (t[1].suffix.lower() not in IMAGE_EXTENSIONS, t[1].as_posix()))  # images first
    return plan


def _canonical_dir(rel_dir: PurePosixPath, dir_case: dict[str, PurePosixPath]) -> PurePosixPath:
    """The first-seen spelling of a folder path, so `10_Dog/` and `10_dog/` become one folder."""
    out = PurePosixPath()
    for part in rel_dir.parts:
        candidate = out / part
        out = dir_case.setdefault(candidate.as_posix().casefold(), candidate)
    return out


class _Unreadable(Exception):
    """A file or zip member whose data cannot be read; the message is the reason shown."""


def _copy_data(cand: _Candidate, out: IO[bytes]) -> None:
    """Copy a candidate's bytes to `out`, never more than it declared. Any failure to read
    (damaged deflate data, a compression method Python lacks, a bad CRC, an I/O error)
    raises _Unreadable with the reason; write errors pass through."""
    written = 0
    try:
        source = cand.open()
    except NotAFile as exc:
        raise _Unreadable(str(exc)) from None
    except Exception as exc:
        raise _Unreadable(_read_failure(cand, exc)) from None
    with source:
        while True:
            try:
                chunk = source.read(1024 * 1024)
            except Exception as exc:
                raise _Unreadable(_read_failure(cand, exc)) from None
            if not chunk:
                return
            written += len(chunk)
            if written > cand.size:
                raise _Unreadable("more data than its declared size (changing while copied, or a forged zip entry)")
            out.write(chunk)


def _read_failure(cand: _Candidate, exc: Exception) -> str:
    if cand.zipped:
        return (f"cannot be unpacked ({type(exc).__name__}: {exc}): the zip is damaged here; unzip it yourself "
                "to recover what you can, or re-create the zip")
    return f"cannot be read ({type(exc).__name__}: {exc}); copy it again from the original"
