"""The one image loader: any picture a dataset may hold as 8-bit RGB with its EXIF orientation
applied, or an `ImageLoadError` (a StudioError) saying why it cannot be used."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from PIL import ExifTags, Image, UnidentifiedImageError

from studio.errors import StudioError
from studio.fsutil import NotAFile, open_regular

#: Largest image accepted, in pixels (8192 x 8192). PIL's own bomb limit also applies.
DEFAULT_MAX_PIXELS = 8192 * 8192
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_ORIENTATION_TEXT = {
    2: "mirrored", 3: "rotated 180°", 4: "flipped vertically", 5: "mirrored and rotated 90° counter-clockwise",
    6: "rotated 90° clockwise", 7: "mirrored and rotated 90° clockwise", 8: "rotated 90° counter-clockwise",
}


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


#: how the report names a picture mode it converts (others by their PIL name)
_MODE_NAMES = {"P": "palette", "L": "grayscale", "1": "1-bit"}


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
    elif mode.startswith("I") or mode == "F":
        out = _high_depth_to_l(im).convert("RGB")
        conversions.append(f"{'16-bit' if mode.startswith('I;16') else mode} grayscale -> 8-bit RGB")
    else:
        out = im.convert("RGB")
        conversions.append(f"{_MODE_NAMES.get(mode, mode)} -> RGB")
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
