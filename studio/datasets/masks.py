"""Loss masks (dataset.masked_loss): `<stem>-masklabel.png` beside an image is its mask
(OneTrainer's name; white trains, black is ignored, grey in between, read from the red
channel as kohya reads its mask images), else the image's own alpha channel (kohya's
alpha_mask). A `-masklabel` file is never a training picture itself.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from studio.datasets.images import DEFAULT_MAX_PIXELS, _load_image
from studio.datasets.layout import IMAGE_EXTENSIONS, MASK_SUFFIX
from studio.errors import StudioError
from studio.fsutil import name_max


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
