"""Datasets: import, the one image loader, validation, training items, captions, stats.

Layout of `workspace/datasets/<name>/` (kohya convention):

- images (.png .jpg .jpeg .webp .bmp, any case) with a same-stem `.txt` caption beside them;
- images at the top level have 1 repeat;
- a top-level `N_concept/` folder (e.g. `10_sks dog/`) holds images repeated N times;
- regularisation (class / prior-preservation) images live in a top-level `reg/` folder
  (1 repeat; its own `N_class/` subfolders give repeats, like kohya's `reg_data_dir`) or
  in a top-level `N_reg/` folder (N repeats). "reg" is matched case-insensitively.
- other folders (no `N_` prefix, or nested deeper) are not used; `check_dataset` says so.
  Hidden files and folders (leading '.') are ignored everywhere.

Captions are comma-separated tags (booru style); a caption without commas is one tag.
Training uses the first non-empty line of a caption file (kohya reads one line).

Loss masks (dataset.masked_loss): `<stem>-masklabel.png` beside an image is its mask
(OneTrainer's name; white trains, black is ignored, grey in between, read from the red
channel as kohya reads its mask images), else the image's own alpha channel (kohya's
alpha_mask). A `-masklabel` file is never a training picture itself.
"""
from __future__ import annotations

import codecs
import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterable, Literal, Sequence

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from studio.errors import StudioError
from studio.fsutil import NotAFile, PathInTheWay, atomic_path, atomic_write_text, name_max, open_regular
from studio.limits import IMPORT_IMAGES
from studio.workspace import Workspace

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CAPTION_EXTENSION = ".txt"
MASK_SUFFIX = "-masklabel"
REG_FOLDER = "reg"
#: Largest image accepted, in pixels (8192 x 8192). PIL's own bomb limit also applies.
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Captions longer than this are reported: kohya's longest text window is 225 tokens.
HUGE_CAPTION_CHARS = 1000
#: Highest repeat count of an `N_name` folder: kohya datasets use up to a few hundred, and
#: every repeat is an entry in each epoch's shuffled order.
MAX_REPEATS = 1000
#: Caption files larger than this are not read at all (a caption is a line of text).
MAX_CAPTION_BYTES = 1024 * 1024

_REPEATS_RE = re.compile(r"^(\d+)_(.+)$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_SYSTEM_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_ORIENTATION_TEXT = {
    2: "mirrored", 3: "rotated 180°", 4: "flipped vertically", 5: "mirrored and rotated 90° counter-clockwise",
    6: "rotated 90° clockwise", 7: "mirrored and rotated 90° clockwise", 8: "rotated 90° counter-clockwise",
}
_IMAGE_TYPES = " ".join(sorted(IMAGE_EXTENSIONS))


# --------------------------------------------------------------------------- image loading
class ImageLoadError(StudioError):
    """An image that cannot be used. `kind` is one of: missing, empty_file, unreadable,
    truncated, decompression_bomb."""

    def __init__(self, message: str, *, kind: str, path: Path):
        super().__init__(message)
        self.kind = kind
        self.path = path


@dataclass
class _Loaded:
    image: Image.Image
    conversions: list[str]
    orientation: int
    alpha: Image.Image | None = None  # the alpha channel ("L", oriented) when not fully opaque


def open_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image as 8-bit RGB with its EXIF orientation applied: alpha is composited on
    white; CMYK, palette, grayscale and 16-bit images are converted. Raises `ImageLoadError`
    (a StudioError) for missing, empty, unreadable, truncated or oversized (> max_pixels) files."""
    return _load_image(Path(path), max_pixels).image


def _load_image(path: Path, max_pixels: int, *, shown_as: str | None = None) -> _Loaded:
    """The image at `path` decoded as training uses it; messages name it `shown_as` (default:
    the path), e.g. the name a person uploaded rather than a temporary copy."""
    name = shown_as or str(path)
    try:
        handle = open_regular(path, "Image")
    except NotAFile as exc:
        kind = "missing" if not os.path.lexists(path) else "unreadable"
        raise ImageLoadError(str(exc), kind=kind, path=path) from None
    with handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise ImageLoadError(f"Image {name} is empty (0 bytes); copy it again from the original or delete it.",
                                 kind="empty_file", path=path)
        return _decode_image(handle, path, name, max_pixels)


def _decode_image(handle: IO[bytes], path: Path, name: str, max_pixels: int) -> _Loaded:
    suffix = Path(name).suffix or "an image"
    try:
        with Image.open(handle) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    f"Image {name} claims {width}x{height} pixels ({width * height / 1e6:.0f} MP), over the "
                    f"{max_pixels / 1e6:.0f} MP limit: a decompression bomb or a huge image. Resize it "
                    "(e.g. to 2048 px on the long side) or delete it.", kind="decompression_bomb", path=path)
            rawmode = _tile_rawmode(im)
            im.load()
            return _to_rgb(im, rawmode)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"Image {name} is too large to decode safely ({exc}); it is a decompression "
                             "bomb or a huge image. Resize it or delete it.",
                             kind="decompression_bomb", path=path) from None
    except MemoryError:
        raise ImageLoadError(f"Image {name} needs more memory than is available to decode; resize it or "
                             "delete it.", kind="decompression_bomb", path=path) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name} is not an image PIL can read (damaged, or not really {suffix}); "
                             "re-export it as PNG or JPEG, or delete it.", kind="unreadable", path=path) from None
    except Exception as exc:  # PIL raises many types on damaged data; none may escape as a crash
        text = str(exc).lower()
        truncated = isinstance(exc, EOFError) or any(
            marker in text for marker in ("truncat", "end of file", "broken data stream", "premature end"))
        if truncated:
            raise ImageLoadError(f"Image {name} is truncated (the file ends early: {exc}); copy it again "
                                 "from the original or delete it.", kind="truncated", path=path) from None
        raise ImageLoadError(f"Image {name} is damaged and cannot be decoded ({type(exc).__name__}: {exc}); "
                             "re-export it or delete it.", kind="unreadable", path=path) from None


def _tile_rawmode(im: Image.Image) -> str:
    try:
        args = im.tile[0][3] if im.tile else ""
    except (IndexError, TypeError):
        return ""
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _to_rgb(im: Image.Image, rawmode: str) -> _Loaded:
    conversions: list[str] = []
    mode = im.mode
    has_key = "transparency" in im.info
    alpha = None
    if mode in _ALPHA_MODES or (has_key and mode in ("P", "L", "RGB")):
        out, opaque = _on_white(im)
        alpha = None if opaque else (im.convert("RGBA") if im.mode != "RGBA" else im).getchannel("A")
        what = "palette" if mode in ("P", "PA") else mode
        conversions.append(f"{what} -> RGB (alpha channel fully opaque)" if opaque else
                           f"{what} with transparency -> RGB (alpha composited on white)")
    elif mode == "RGB":
        out = im.convert("RGB")
    elif mode == "P":
        out = im.convert("RGB")
        conversions.append("palette -> RGB")
    elif mode == "CMYK":
        out = im.convert("RGB")
        conversions.append("CMYK -> RGB")
    elif mode.startswith("I") or mode == "F":
        out = _high_depth_to_l(im).convert("RGB")
        conversions.append(f"{'16-bit' if mode.startswith('I;16') else mode} grayscale -> 8-bit RGB")
    elif mode == "L":
        out = im.convert("RGB")
        conversions.append("grayscale -> RGB")
    elif mode == "1":
        out = im.convert("RGB")
        conversions.append("1-bit -> RGB")
    else:
        out = im.convert("RGB")
        conversions.append(f"{mode} -> RGB")
    if ";16" in rawmode and not mode.startswith("I"):
        conversions.append("16 bits per channel -> 8 bits")

    orientation = 1
    try:
        orientation = int(im.getexif().get(ExifTags.Base.Orientation, 1) or 1)
    except Exception:  # malformed EXIF: keep the pixels as stored
        conversions.append("EXIF data unreadable; orientation ignored")
    if orientation in _ORIENTATION_TEXT:
        out = _apply_orientation(out, orientation)
        alpha = None if alpha is None else _apply_orientation(alpha, orientation)
    else:
        orientation = 1
    return _Loaded(out, conversions, orientation, alpha)


def _on_white(im: Image.Image) -> tuple[Image.Image, bool]:
    """Composite on white; also says whether the alpha was fully opaque."""
    rgba = im.convert("RGBA") if im.mode != "RGBA" else im
    alpha = rgba.getchannel("A")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=alpha)
    return out, alpha.getextrema()[0] == 255


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float pixels to 0..255 (PIL's convert would clip)."""
    if im.mode == "F":
        _, high = im.getextrema()
        scale = 255.0 if high <= 1.0 else 1.0
        return im.point(lambda v: v * scale + 0.5).convert("L")
    wide = im.convert("I")
    _, high = wide.getextrema()
    if im.mode.startswith("I;16") or 255 < high <= 65535:
        scale = 1 / 257
    elif high > 65535:
        scale = 255 / high
    else:
        scale = 1.0
    return wide.point(lambda v: v * scale + 0.5).convert("L")


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    t = Image.Transpose
    steps = {
        2: [t.FLIP_LEFT_RIGHT], 3: [t.ROTATE_180], 4: [t.FLIP_TOP_BOTTOM], 5: [t.TRANSPOSE],
        6: [t.ROTATE_270], 7: [t.TRANSVERSE], 8: [t.ROTATE_90],
    }[orientation]
    for step in steps:
        im = im.transpose(step)
    return im


# --------------------------------------------------------------------------- layout scan
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


# --------------------------------------------------------------------------- loss masks
def mask_path(image: str | os.PathLike) -> Path | None:
    """The mask file of a picture: `<stem>-masklabel` with an image extension beside it
    (.png first), or None."""
    image = Path(image)
    # a picture whose name is near the file system's limit has no room for the suffix: no mask
    room = name_max(image.parent) - len(os.fsencode(image.stem + MASK_SUFFIX))
    for suffix in (".png", *sorted(IMAGE_EXTENSIONS - {".png"})):
        if len(os.fsencode(suffix)) > room:
            continue
        for candidate in (image.with_name(f"{image.stem}{MASK_SUFFIX}{suffix}"),
                          image.with_name(f"{image.stem}{MASK_SUFFIX}{suffix.upper()}")):
            if candidate.is_file():
                return candidate
    return None


def open_mask(image: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | None:
    """The loss mask of a picture as 8-bit grey ("L": 255 trains fully, 0 not at all), its
    EXIF orientation applied as to the picture: the red channel of its mask file (mask_path),
    else its alpha channel; None when it has neither (the whole picture trains). A mask file
    of another size than the picture, or one that does not decode, raises a StudioError."""
    picture = _load_image(Path(image), max_pixels)
    found = mask_path(image)
    if found is None:
        return picture.alpha
    mask = _load_image(found, max_pixels).image
    if mask.size != picture.image.size:
        raise StudioError(f"Mask {found} is {mask.size[0]}x{mask.size[1]} but its picture {Path(image).name} is "
                          f"{picture.image.size[0]}x{picture.image.size[1]}; save the mask at the picture's size.")
    return mask.getchannel("R")


# --------------------------------------------------------------------------- captions
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


# --------------------------------------------------------------------------- validation
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


# --------------------------------------------------------------------------- training items
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


# --------------------------------------------------------------------------- listing, stats
def list_datasets(workspace: Workspace) -> list[str]:
    """Names of the datasets in a workspace, sorted case-insensitively."""
    folder = workspace.datasets_dir
    if not folder.is_dir():
        return []
    return sorted((e.name for e in _sorted_dirs(folder) if e.is_dir() and not _is_hidden(e.name)),
                  key=lambda n: (n.casefold(), n))


@dataclass(frozen=True)
class SubsetStats:
    folder: str               # relative to the dataset, posix ("" = top level)
    key: str                  # kohya dir name
    repeats: int
    image_count: int
    is_regularisation: bool


@dataclass(frozen=True)
class DatasetStats:
    folder: Path
    subsets: tuple[SubsetStats, ...]
    image_count: int              # training images (not regularisation)
    reg_image_count: int
    steps_per_epoch: int          # sum(images * repeats) over training subsets, at batch size 1
    ss_dataset_dirs: dict[str, dict[str, int]]
    ss_reg_dataset_dirs: dict[str, dict[str, int]]
    ss_tag_frequency: dict[str, dict[str, int]]

    @property
    def samples_per_epoch(self) -> int:
        """kohya pairs every training sample with a regularisation one when reg images exist."""
        return self.steps_per_epoch * (2 if self.reg_image_count else 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "image_count": self.image_count,
            "reg_image_count": self.reg_image_count,
            "steps_per_epoch": self.steps_per_epoch,
            "samples_per_epoch": self.samples_per_epoch,
            "subsets": [dataclasses.asdict(s) for s in self.subsets],
            "ss_dataset_dirs": self.ss_dataset_dirs,
            "ss_reg_dataset_dirs": self.ss_reg_dataset_dirs,
            "ss_tag_frequency": self.ss_tag_frequency,
        }


def dataset_stats(folder: str | os.PathLike, items: Sequence[DatasetItem] | None = None) -> DatasetStats:
    """Image counts and repeats per subfolder, and the kohya `ss_dataset_dirs`,
    `ss_reg_dataset_dirs` and `ss_tag_frequency` metadata. Without `items` every image file
    is counted (fast, nothing decoded); pass `load_items(folder)` to count what trains.
    Tag frequency follows kohya: tags lower-cased, every occurrence counted."""
    scan = _scan(folder)
    counts: Counter[Path] = Counter()
    captions: dict[Path, list[str]] = {}
    if items is None:
        for entry in scan.images:
            key = entry.subset.path.resolve()
            counts[key] += 1
            captions.setdefault(key, []).append(_training_caption(_caption_for_stats(entry)))
    else:
        for item in items:
            key = item.path.parent.resolve()
            counts[key] += 1
            captions.setdefault(key, []).append(item.caption)
    subsets: list[SubsetStats] = []
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    tag_freq: dict[str, dict[str, int]] = {}
    for subset in scan.subsets:
        where = subset.path.resolve()
        n = counts.get(where, 0)
        if subset.rel == "" and n == 0:
            continue
        subsets.append(SubsetStats(subset.rel, subset.key, subset.repeats, n, subset.is_reg))
        if n == 0:
            continue
        (reg_dirs if subset.is_reg else dirs)[subset.key] = {"n_repeats": subset.repeats, "img_count": n}
        freq = tag_freq.setdefault(subset.key, {})
        for caption in captions.get(where, []):
            for tag in caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    freq[tag] = freq.get(tag, 0) + 1
    train = [s for s in subsets if not s.is_regularisation]
    return DatasetStats(
        folder=scan.folder,
        subsets=tuple(subsets),
        image_count=sum(s.image_count for s in train),
        reg_image_count=sum(s.image_count for s in subsets if s.is_regularisation),
        steps_per_epoch=sum(s.image_count * s.repeats for s in train),
        ss_dataset_dirs=dirs,
        ss_reg_dataset_dirs=reg_dirs,
        ss_tag_frequency=tag_freq,
    )


# --------------------------------------------------------------------------- import
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
